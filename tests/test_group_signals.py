"""Signals sent to the whole process group (``kill -TERM -PGID``: ``docker stop`` on a shell
entry point, systemd's ``KillMode=control-group``, a terminal's Ctrl-C), against a real daemon
or batch started in a session of its own: the forkserver, the resource tracker and every worker
get the signal too. Running tasks must finish, nothing may be left half-done, and a restart must
take up the rest without rewriting anything. Also: the run lock's verdict on temp files whose
pid now belongs to an unrelated live process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import ROOT, _cmdline, wait_until
from tests.test_cli import tagged_processes
from watcher.fs.files import HOST

pytestmark = pytest.mark.integration

FATES = ("file.processed", "file.quarantined", "file.skipped", "file.vanished")
SLOW_TOML = """
[pipelines.slow]
steps = ["tests.crashers.slow", "thumbnail(64, 64)"]
[output]
pipelines = ["slow"]
"""


class Group:
    """A ``watcher`` command in a session (and process group) of its own; stdout and stderr go
    to one file, as under systemd or a container runtime; its JSON lines are read from it."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.tag = f"watcher-test-{uuid.uuid4().hex}"
        self.log = root / f"log-{self.tag}.txt"
        out = open(self.log, "wb")  # noqa: SIM115 - closed in wait()
        self._out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", *args], cwd=root, stdin=subprocess.DEVNULL,
            stdout=out, stderr=out, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "WATCHER_TEST_TAG": self.tag,
                 **(env or {})})
        self.pgid = os.getpgid(self.proc.pid)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def events(self) -> list[dict[str, Any]]:
        """The JSON lines written so far (a line being written is skipped)."""
        out = []
        for line in self.lines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def seen(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, event: str, count: int = 1, timeout: float = 60,
                 **match: Any) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            found = self.seen(event, **match)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"exited ({self.proc.returncode}) before {count} x {event}: "
                            f"{self.lines()[-30:]}")
            return None
        return wait_until(enough, timeout, f"{count} x {event} {match or ''}")

    def killpg(self, sig: int) -> None:
        os.killpg(self.pgid, sig)

    def wait(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.killpg(signal.SIGKILL)
            self.proc.wait(30)
        self._out.close()


def watch(root: Path, *args: str, env: dict[str, str] | None = None) -> Group:
    for d in ("inbox", "processed", "archive", "quarantine", "work"):
        (root / d).mkdir(exist_ok=True)
    g = Group(root, "watch", "--inbox", str(root / "inbox"), "--output", str(root / "processed"),
              "--archive", str(root / "archive"), "--quarantine", str(root / "quarantine"),
              "--work", str(root / "work"), "--settle", "0.3", "--reconcile-interval", "1",
              "--log-format", "json", *args,
              # its pictures are the same bytes under other names: each one a new input
              env={"WATCHER_DUPLICATES": "process", **(env or {})})
    try:
        g.wait_for("daemon.started", timeout=30)
    except BaseException:
        g.ensure_dead()
        raise
    return g


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".watcher-")
                  and not p.name.endswith(".claim"))


def temps(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.watcher-tmp"))


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every output: a rewritten output changes both."""
    return {name: ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns)
            for name in files(folder)}


def fates(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["input"] for e in events if e.get("event") in FATES)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_group_signal_mid_burst_drains_and_the_restart_rewrites_nothing(
        tmp_path: Path, sig: int) -> None:
    root = tmp_path
    (root / "watcher.toml").write_text(SLOW_TOML)
    names = [f"b{i:02d}.png" for i in range(40)]
    d = watch(root, "--config", str(root / "watcher.toml"), "--workers", "2")
    try:
        for n in names:  # each holds its worker 0.3 s: a burst that takes seconds
            crashers.slow_image(str(root / "inbox" / n), 0.3)
        d.wait_for("file.processed", count=4, timeout=60)
        d.killpg(sig)  # the daemon, its forkserver, resource tracker and workers, at once
        code = d.wait(60)
    finally:
        d.ensure_dead()
    events = d.events()
    assert code == 0, d.lines()[-30:]
    assert not [e for e in events if e.get("event") == "worker.died"], events
    assert not [e for e in events if e.get("event") == "file.left"
                and "grace" in str(e.get("why"))]
    first = fates(events)
    assert first and max(first.values()) == 1, first
    assert temps(root) == []
    # each input processed got its output, complete; the rest waits in the inbox or work folder
    outputs = stamps(root / "processed")
    assert sorted(outputs) == sorted(n.replace(".png", "_slow.png") for n in first)
    for name in outputs:
        with Image.open(root / "processed" / name) as im:
            im.load()
    assert len(first) < len(names)  # stopped mid-burst
    wait_until(lambda: not tagged_processes(d.tag), 10, "no process of the daemon left")

    d2 = watch(root, "--config", str(root / "watcher.toml"), "--workers", "2")
    try:
        wait_until(lambda: len(files(root / "archive")) == len(names), 90,
                   "every input to be archived after the restart")
        d2.killpg(signal.SIGTERM)
        assert d2.wait(60) == 0
    finally:
        d2.ensure_dead()
    second = fates(d2.events())
    assert max(second.values()) == 1 and not set(first) & set(second), (first, second)
    assert sorted([*first, *second]) == names
    after = stamps(root / "processed")
    assert {n: after[n] for n in outputs} == outputs  # nothing written before was rewritten
    assert len(after) == len(names)
    assert temps(root) == []
    wait_until(lambda: not tagged_processes(d2.tag), 10, "no process of the daemon left")


def removed_at_start(root: Path) -> set[str]:
    """Start a daemon on ``root``, stop it with a group SIGTERM (it must exit 0): the temp files
    it removed at start."""
    d = watch(root)
    try:
        removed = {e["path"] for e in d.seen("file.temp_removed")}
        d.killpg(signal.SIGTERM)
        assert d.wait(60) == 0
    finally:
        d.ensure_dead()
    return removed


def test_temp_files_whose_pid_is_alive_are_removed_under_the_run_lock(tmp_path: Path) -> None:
    root = tmp_path
    for d in ("processed", "archive", "work"):
        (root / d).mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])  # an unrelated process with a live pid
    try:
        left = [root / "processed" / f".a_thumbnail.png.{HOST}.{sleeper.pid}.watcher-tmp",
                root / "processed" / f".b_thumbnail.png.{HOST}.{os.getpid()}.watcher-tmp",
                root / "archive" / f".c.png.{HOST}.{sleeper.pid}.watcher-tmp"]
        for p in left:
            p.write_bytes(b"half an image")
        other = root / "processed" / f".d_thumbnail.png.otherhost.{sleeper.pid}.watcher-tmp"
        other.write_bytes(b"another machine's, fresh")  # left to the age rule
        removed = removed_at_start(root)
        assert removed == {str(p) for p in left}
        assert [p for p in left if p.exists()] == []
        assert other.exists()
        assert sleeper.poll() is None  # its pid was alive all along
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_a_second_daemon_on_the_same_folders_leaves_live_temps_alone(tmp_path: Path) -> None:
    # Without the run lock (another daemon of this host holds it), a temp file whose pid is
    # alive and started before the file was written may be that process's: it stays.
    root = tmp_path
    first = watch(root)
    try:
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            live = root / "processed" / f".x_thumbnail.png.{HOST}.{sleeper.pid}.watcher-tmp"
            live.write_bytes(b"being written")
            dead = root / "processed" / f".y_thumbnail.png.{HOST}.999999999.watcher-tmp"
            dead.write_bytes(b"left")
            second = watch(root)
            try:
                assert second.seen("daemon.run_lock_shared")
                removed = {e["path"] for e in second.seen("file.temp_removed")}
                second.killpg(signal.SIGTERM)
                assert second.wait(60) == 0
            finally:
                second.ensure_dead()
            assert removed == {str(dead)}
            assert live.exists()
        finally:
            sleeper.kill()
            sleeper.wait(10)
    finally:
        first.killpg(signal.SIGTERM)
        assert first.wait(60) == 0
        first.ensure_dead()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_group_signal_stops_a_batch_as_documented(tmp_path: Path, sig: int, code: int) -> None:
    (tmp_path / "in").mkdir()
    for i in range(12):
        crashers.slow_image(str(tmp_path / "in" / f"s{i:02d}.png"), 0.8)
    b = Group(tmp_path, "batch", "in", "-o", "out", "--workers", "2", "--ops",
              "tests.crashers.slow", "--suffix", "s", "--report", "r.json", "--no-progress",
              "--log-format", "json", "--log-level", "debug")
    try:
        b.wait_for("file.processed", count=2, timeout=60)
        b.killpg(sig)
        assert b.wait(60) == code, b.lines()[-30:]
    finally:
        b.ensure_dead()
    report = json.loads((tmp_path / "r.json").read_text())
    t = report["totals"]
    assert t["failed"] == 0, report["items"]
    assert t["succeeded"] >= 2 and t["cancelled"] >= 1
    assert t["succeeded"] + t["cancelled"] == 12
    written = sorted(os.listdir(tmp_path / "out"))
    assert len(written) == t["succeeded"]  # the finished ones, complete; no temp file
    for name in written:
        with Image.open(tmp_path / "out" / name) as im:
            im.load()
    events = b.events()
    assert not [e for e in events if e.get("event") == "worker.died"], events
    assert [e for e in events if e.get("event") == "batch.interrupted"]
    wait_until(lambda: not tagged_processes(b.tag), 10, "no process of the run to be left")


def test_a_group_sighup_reloads_and_kills_no_worker(tmp_path: Path) -> None:
    # A terminal that closes sends SIGHUP to its foreground process group: the daemon reloads;
    # the forkserver and the workers must not die of it.
    root = tmp_path
    (root / "watcher.toml").write_text(SLOW_TOML)
    d = watch(root, "--config", str(root / "watcher.toml"), "--workers", "2")
    try:
        crashers.slow_image(str(root / "inbox" / "a.png"), 1.0)  # running at the SIGHUP
        d.wait_for("file.queued", input="a.png")
        d.killpg(signal.SIGHUP)
        d.wait_for("config.reloaded")
        crashers.slow_image(str(root / "inbox" / "b.png"), 0.1)
        d.wait_for("file.processed", input="a.png")
        d.wait_for("file.processed", input="b.png")
        d.killpg(signal.SIGTERM)
        assert d.wait(60) == 0
    finally:
        d.ensure_dead()
    events = d.events()
    assert not [e for e in events if e.get("event") in ("worker.died", "file.retried")], events
    assert fates(events) == Counter({"a.png": 1, "b.png": 1})
    assert temps(root) == []


def test_the_resource_tracker_dying_changes_nothing(tmp_path: Path) -> None:
    # Workers recycled after each file: every new one registers a lock with the tracker.
    root = tmp_path
    d = watch(root, "--workers", "2", "--max-tasks-per-worker", "1")
    try:
        trackers = [p for p in tagged_processes(d.tag)
                    if "resource_tracker import main" in _cmdline(p)]
        assert len(trackers) == 1, [_cmdline(p) for p in tagged_processes(d.tag)]
        os.kill(trackers[0], signal.SIGKILL)
        names = [f"r{i}.png" for i in range(6)]
        for n in names:
            crashers.slow_image(str(root / "inbox" / n), 0.1)
        for n in names:
            d.wait_for("file.processed", input=n)
        d.killpg(signal.SIGTERM)
        assert d.wait(60) == 0
    finally:
        d.ensure_dead()
    events = d.events()
    assert fates(events) == Counter(dict.fromkeys(names, 1))
    assert not [e for e in events if e.get("event") in ("worker.died", "watcher.internal_error")]
    assert temps(root) == []
    wait_until(lambda: not tagged_processes(d.tag), 10, "no process of the daemon left")


def test_the_workers_hold_the_run_lock_until_they_are_gone(tmp_path: Path) -> None:
    # A worker of a killed daemon outlives it by a moment (until its parent-death signal): while
    # one lives, the next start must not call its temp files stale. Here it outlives the kill
    # -9 for sure: it and its forkserver are stopped (SIGSTOP) first.
    root = tmp_path
    d = watch(root, "--workers", "1")
    stopped: list[int] = []
    try:
        workers = [e["worker_pid"] for e in d.seen("worker.started")]
        forkserver = [p for p in tagged_processes(d.tag)
                      if "forkserver import main" in _cmdline(p) and p not in workers]
        assert len(workers) == 1 and len(forkserver) == 1
        stopped = [*forkserver, *workers]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)
        temp = root / "processed" / f".z_thumbnail.png.{HOST}.{workers[0]}.watcher-tmp"
        temp.write_bytes(b"being written by the old run's worker")
        d2 = watch(root)  # waits for the lock a moment, then settles for the pid rule
        try:
            assert d2.seen("daemon.run_lock_shared")
            assert not d2.seen("file.temp_removed")
            d2.killpg(signal.SIGTERM)
            assert d2.wait(60) == 0
        finally:
            d2.ensure_dead()
        assert temp.exists()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
        d.ensure_dead()
    wait_until(lambda: not tagged_processes(d.tag), 15, "the old run's processes to end")
    # every process of the old run is gone: the lock is free, the temp stale
    removed = removed_at_start(root)
    assert removed == {str(temp)} and not temp.exists()


MARKED_TOML = """
[pipelines.slow]
steps = ["tests.crashers.slow_marked", "thumbnail(64, 64)"]
[output]
pipelines = ["slow"]
"""


def _start_marked(root: Path, seconds: float, token: int) -> Group:
    """A daemon of one worker, holding a "slow" image of ``seconds`` that has started."""
    for m in crashers.started_markers(token):
        os.unlink(m)
    (root / "conf").mkdir()
    (root / "conf" / "slow.toml").write_text(MARKED_TOML)
    d = watch(root, "--workers", "1", "-c", str(root / "conf" / "slow.toml"))
    (root / "stage").mkdir()
    crashers.slow_marked_image(str(root / "stage" / "s.png"), seconds, token)
    os.rename(root / "stage" / "s.png", root / "inbox" / "s.png")
    wait_until(lambda: crashers.started_markers(token), 30, "the slow task to start")
    return d


def test_a_killed_daemon_takes_its_workers_with_it_at_once(tmp_path: Path) -> None:
    """kill -9 of the daemon in the middle of a 20 s task: its forkserver and worker end with it
    (long before the task would), nothing is published behind it, and the restart gives the
    input its one fate."""
    root, token = tmp_path, 201
    d = _start_marked(root, 20.0, token)
    try:
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)
        wait_until(lambda: not tagged_processes(d.tag), 10, "the run's processes to end")
        assert files(root / "processed") == []
        d2 = watch(root, "--workers", "1")  # the default pipeline now: no slow step
        try:
            d2.wait_for("file.processed", input="s.png", timeout=60)
            d2.killpg(signal.SIGTERM)
            assert d2.wait(60) == 0
        finally:
            d2.ensure_dead()
        assert not d2.seen("daemon.run_lock_shared")  # nothing of the old run held the lock
    finally:
        d.ensure_dead()
        for m in crashers.started_markers(token):
            os.unlink(m)
    assert files(root / "processed") == ["s_thumbnail.png"]
    assert temps(root) == []


def test_a_worker_that_outlives_its_daemon_publishes_nothing(tmp_path: Path) -> None:
    """With the forkserver stopped (SIGSTOP: its workers' parent-death signal cannot fire), kill
    -9 the daemon: the worker finishes decoding, sees its daemon gone before publishing, removes
    its temp files and ends."""
    root, token = tmp_path, 202
    d = _start_marked(root, 1.5, token)
    forkserver: list[int] = []
    try:
        workers = [e["worker_pid"] for e in d.seen("worker.started")]
        forkserver = [p for p in tagged_processes(d.tag)
                      if "forkserver import main" in _cmdline(p) and p not in workers]
        assert len(workers) == 1 and len(forkserver) == 1
        os.kill(forkserver[0], signal.SIGSTOP)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)
        wait_until(lambda: workers[0] not in tagged_processes(d.tag), 30,
                   "the orphaned worker to end")
        (line,) = d.seen("worker.orphaned")
        assert line["worker_pid"] == workers[0] and line["daemon_pid"] == d.proc.pid
        assert files(root / "processed") == []
        assert temps(root) == []
    finally:
        for pid in forkserver:
            os.kill(pid, signal.SIGKILL)
        d.ensure_dead()
        for m in crashers.started_markers(token):
            os.unlink(m)
