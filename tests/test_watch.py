"""The inbox daemon as a real subprocess: real files dropped in, real signals, kill -9, restart.
Every wait has a deadline; the daemon's JSON log lines are the evidence."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import ROOT, make_image, wait_until
from tests.test_cli import tagged_processes
from watcher.samples import picture
from watcher.watch import claiming, lifecycle

pytestmark = pytest.mark.integration

FATES = ("file.processed", "file.quarantined", "file.skipped", "file.vanished")


class Daemon:
    """``watcher watch`` on folders below ``root``, its JSON log lines collected as they come."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.root = root
        for d in ("inbox", "processed", "archive", "quarantine", "work"):
            (root / d).mkdir(exist_ok=True)
        self.tag = f"watcher-test-{uuid.uuid4().hex}"
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        cmd = [*(prefix or []), sys.executable, "-m", "watcher", "watch",
               "--inbox", str(root / "inbox"), "--output", str(root / "processed"),
               "--archive", str(root / "archive"), "--quarantine", str(root / "quarantine"),
               "--work", str(root / "work"), "--settle", "0.3", "--reconcile-interval", "1",
               "--log-format", "json", *args]
        self.stderr = open(root / f"stderr-{self.tag}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True,
            # the pictures these tests drop are often the same bytes under other names: each
            # is a new input here (tests/test_duplicates.py turns duplicates = "skip" back on)
            env={**os.environ, "PYTHONPATH": str(ROOT), "WATCHER_TEST_TAG": self.tag,
                 "WATCHER_DUPLICATES": "process", **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("daemon.started", timeout=30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with self._lock:
                    self.events.append(json.loads(line))

    def seen(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == event
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, event: str, count: int = 1, timeout: float = 30,
                 **match: Any) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            if self.proc.poll() is not None and len(self.seen(event, **match)) < count:
                self.stderr.seek(0)
                pytest.fail(f"daemon exited ({self.proc.returncode}) before {count} x {event}: "
                            f"{self.stderr.read()[-3000:]}")
            found = self.seen(event, **match)
            return found if len(found) >= count else None
        return wait_until(enough, timeout, f"{count} x {event} {match or ''}")

    def fates(self) -> Counter[str]:
        with self._lock:
            return Counter(e["input"] for e in self.events if e["event"] in FATES)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stderr.close()

    def exit_code(self, timeout: float = 60) -> int:
        """Wait for the daemon to exit by itself (after a signal already sent)."""
        try:
            return self.proc.wait(timeout)
        finally:
            self.stderr.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self.stderr.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


def drop(root: Path, name: str, **kw: Any) -> Path:
    """Write an image straight into the inbox (open, write, close: a close-write event)."""
    return make_image(root / "inbox" / name, **kw)


def files(folder: Path) -> list[str]:
    """Everything below ``folder`` but the daemon's own files (heartbeat, database of
    processed inputs) and claim records."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and not p.name.startswith(".watcher-")
                  and not p.name.endswith(".claim"))


def claimed(root: Path) -> list[str]:
    """The inputs claimed in the work folder, by their names in the inbox (from the records)."""
    return sorted(c.rel for c in claiming.leftover(
        lifecycle.Folders({k: str(root / v) for k, v in (
            ("inbox", "inbox"), ("output", "processed"), ("archive", "archive"),
            ("quarantine", "quarantine"), ("work", "work"))}), lambda: 0))


def assert_no_temps(root: Path) -> None:
    temps = list(root.rglob("*.watcher-tmp"))
    assert temps == []


def test_every_format_dropped_in_is_processed_and_archived(root: Path) -> None:
    d = Daemon(root)
    names = {"a.jpg": "JPEG", "b.png": "PNG", "c.webp": "WEBP", "d.avif": "AVIF", "e.gif": "GIF",
             "f.bmp": "BMP", "g.tif": "TIFF"}
    try:
        for name in names:
            drop(root, name, size=(300, 200))
        d.wait_for("file.processed", count=len(names))
    finally:
        assert d.stop() == 0
    assert files(root / "archive") == sorted(names)
    assert files(root / "processed") == sorted(
        f"{Path(n).stem}_thumbnail{Path(n).suffix}" for n in names)
    for n, fmt in names.items():
        with Image.open(root / "processed" / f"{Path(n).stem}_thumbnail{Path(n).suffix}") as im:
            assert im.format == fmt and im.size == (128, 85)
    assert files(root / "inbox") == [] and files(root / "work") == []
    assert set(d.fates().values()) == {1}  # exactly one fate per input
    assert_no_temps(root)


def test_slow_chunked_write_is_never_taken_half_written(root: Path) -> None:
    buf = io.BytesIO()
    picture(800, 600).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    d = Daemon(root)
    try:
        with open(root / "inbox" / "slow.jpg", "wb") as f:
            for i in range(6):  # pauses longer than the 0.3 s settle time, file kept open
                f.write(data[i * len(data) // 6: (i + 1) * len(data) // 6])
                f.flush()
                time.sleep(0.5)
        d.wait_for("file.processed", input="slow.jpg")
    finally:
        assert d.stop() == 0
    assert (root / "archive" / "slow.jpg").read_bytes() == data
    assert d.fates() == {"slow.jpg": 1}
    assert not d.seen("file.quarantined")


def test_renamed_into_inbox_is_processed_at_once(root: Path) -> None:
    (root / "staging").mkdir()
    src = make_image(root / "staging" / "r.png")
    d = Daemon(root, "--settle", "30")  # settling would take 30 s: the move must be enough
    try:
        os.rename(src, root / "inbox" / "r.png")
        d.wait_for("file.processed", input="r.png", timeout=10)
    finally:
        assert d.stop() == 0
    assert files(root / "archive") == ["r.png"]


def test_sub_folders_are_mirrored(root: Path) -> None:
    d = Daemon(root)
    try:
        (root / "inbox" / "2026" / "day1").mkdir(parents=True)
        drop(root, "2026/day1/x.png")
        drop(root, "top.png")
        d.wait_for("file.processed", count=2)
    finally:
        d.stop()
    assert files(root / "archive") == ["2026/day1/x.png", "top.png"]
    assert files(root / "processed") == ["2026/day1/x_thumbnail.png", "top_thumbnail.png"]


def test_ignored_names_are_left_alone(root: Path) -> None:
    ignored = ["x.jpg.part", ".hidden.jpg", "dl.crdownload", "~$doc.jpg", ".git/obj.jpg",
               "edit.swp", "y.tmp"]
    for name in ignored:
        (root / "inbox" / name).parent.mkdir(parents=True, exist_ok=True)
        make_image(root / "inbox" / name, fmt="PNG")
    d = Daemon(root, "--log-level", "debug")
    try:
        drop(root, "real.png")
        d.wait_for("file.processed", input="real.png")
        n = len(d.seen("reconcile.done"))
        d.wait_for("reconcile.done", count=n + 2, timeout=20)  # two more full scans
    finally:
        d.stop()
    assert files(root / "inbox") == sorted(ignored)
    assert d.fates() == {"real.png": 1}


def test_symlinks_are_quarantined_without_reading_the_target(root: Path) -> None:
    outside = make_image(root / "elsewhere" / "photo.png")
    before = outside.stat()
    d = Daemon(root)
    try:
        os.symlink("/etc/passwd", root / "inbox" / "passwd.jpg")
        os.symlink(outside, root / "inbox" / "photo.png")
        d.wait_for("file.quarantined", count=2)
    finally:
        d.stop()
    for name in ("passwd.jpg", "photo.png"):
        q = root / "quarantine" / name
        assert q.is_symlink()
        side = json.loads((root / "quarantine" / f"{name}.error.json").read_text())
        assert side["reason"] == "symlink"
    assert files(root / "processed") == []
    assert outside.stat().st_atime == before.st_atime and outside.exists()


def test_fifo_is_quarantined_and_the_line_keeps_moving(root: Path) -> None:
    d = Daemon(root)
    try:
        os.mkfifo(root / "inbox" / "pipe.jpg")
        d.wait_for("file.quarantined", input="pipe.jpg", reason="not-a-file")
        drop(root, "after.png")
        d.wait_for("file.processed", input="after.png")
    finally:
        assert d.stop() == 0


def test_bad_files_are_quarantined_with_sidecars_and_can_be_requeued(root: Path) -> None:
    d = Daemon(root)
    try:
        (root / "inbox" / "text.jpg").write_text("not an image")
        good = io.BytesIO()
        picture(300, 200).save(good, "JPEG")
        (root / "inbox" / "cut.jpg").write_bytes(good.getvalue()[:-3000])
        d.wait_for("file.quarantined", count=2)
        reasons = {e["input"]: e["reason"] for e in d.seen("file.quarantined")}
        assert reasons == {"text.jpg": "not-an-image", "cut.jpg": "truncated"}
        side = json.loads((root / "quarantine" / "cut.jpg.error.json").read_text())
        assert side["reason"] == "truncated" and side["attempts"] == 1
        assert side["worker_pid"] > 0 and side["pipelines"] == ["thumbnail"]
        # fix the file, then send it back
        (root / "quarantine" / "cut.jpg").write_bytes(good.getvalue())
        req = subprocess.run([sys.executable, "-m", "watcher", "requeue",
                              str(root / "quarantine" / "cut.jpg"), "--inbox",
                              str(root / "inbox"), "--quarantine", str(root / "quarantine")],
                             capture_output=True, text=True, timeout=30, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert req.returncode == 0, req.stderr
        d.wait_for("file.processed", input="cut.jpg")
    finally:
        d.stop()
    assert files(root / "quarantine") == ["text.jpg", "text.jpg.error.json"]
    assert files(root / "archive") == ["cut.jpg"]


def test_backlog_and_leftover_claims_are_processed_at_start(root: Path) -> None:
    for d_ in ("inbox", "work"):
        (root / d_).mkdir()
    make_image(root / "inbox" / "waiting.png")
    make_image(root / "work" / "claimed.png")  # left by a daemon that was killed
    d = Daemon(root)
    try:
        d.wait_for("file.processed", count=2)
    finally:
        d.stop()
    assert files(root / "archive") == ["claimed.png", "waiting.png"]
    started = d.seen("daemon.started")[0]
    assert started["recovered_claims"] == 1 and started["backlog"] == 1


def test_burst_of_2000_files(root: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 120, 200)).save(buf, "PNG")
    d = Daemon(root, "--max-in-flight", "64")
    try:
        for i in range(2000):
            (root / "inbox" / f"b{i:04d}.png").write_bytes(buf.getvalue())
        d.wait_for("file.processed", count=2000, timeout=240)
    finally:
        assert d.stop() == 0
    assert len(files(root / "archive")) == 2000
    assert len(files(root / "processed")) == 2000
    assert max(d.fates().values()) == 1 and len(d.fates()) == 2000


SLOW_TOML = """
[pipelines.slow]
steps = ["tests.crashers.slow", "thumbnail(64, 64)"]
[pipelines.killer]
steps = ["tests.crashers.kill_on_poison", "thumbnail(64, 64)"]
[output]
pipelines = ["slow"]
"""


def test_worker_killed_mid_file_is_replaced_and_the_file_retried(root: Path) -> None:
    (root / "watcher.toml").write_text(SLOW_TOML)
    (root / "inbox").mkdir()
    d = Daemon(root, "--config", str(root / "watcher.toml"), "--workers", "1")
    try:
        crashers.slow_image(str(root / "inbox" / "s.png"), 3.0)
        d.wait_for("file.queued", input="s.png")
        pid = d.seen("worker.started")[-1]["worker_pid"]
        time.sleep(0.5)  # let the worker take the file (it holds it for 3 s)
        os.kill(pid, signal.SIGKILL)
        done = d.wait_for("file.processed", input="s.png", timeout=30)
    finally:
        d.stop()
    assert done[0]["attempt"] == 2 and done[0]["worker_pid"] != pid
    assert d.seen("worker.died") and d.seen("file.retried")
    assert files(root / "archive") == ["s.png"]


def test_file_that_kills_every_worker_is_quarantined(root: Path) -> None:
    (root / "watcher.toml").write_text(SLOW_TOML)
    (root / "inbox").mkdir()
    d = Daemon(root, "--config", str(root / "watcher.toml"), "--pipeline", "killer")
    try:
        crashers.poison_image(str(root / "inbox" / "poison.png"))
        drop(root, "fine.png")
        q = d.wait_for("file.quarantined", input="poison.png")
        d.wait_for("file.processed", input="fine.png")
    finally:
        d.stop()
    assert q[0]["reason"] == "worker-crashed"
    side = json.loads((root / "quarantine" / "poison.png.error.json").read_text())
    assert side["attempts"] == 2 and side["reason"] == "worker-crashed"


def test_sigterm_drains_and_a_file_dropped_during_shutdown_waits(root: Path) -> None:
    (root / "watcher.toml").write_text(SLOW_TOML)
    (root / "inbox").mkdir()
    d = Daemon(root, "--config", str(root / "watcher.toml"), "--workers", "1")
    crashers.slow_image(str(root / "inbox" / "running.png"), 2.0)
    d.wait_for("file.queued", input="running.png")
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for("daemon.stopping")
    make_image(root / "inbox" / "late.png")  # arrives while the daemon drains
    assert d.exit_code() == 0
    assert files(root / "archive") == ["running.png"]  # the running file was finished
    assert files(root / "inbox") == ["late.png"]  # untouched, for the next start
    # the forkserver exits a moment after the daemon, when it sees its parent gone
    wait_until(lambda: not tagged_processes(d.tag), 10, "no process of the daemon left")
    d2 = Daemon(root, "--config", str(root / "watcher.toml"))
    try:
        d2.wait_for("file.processed", input="late.png")
    finally:
        assert d2.stop() == 0


def test_second_signal_stops_at_once_leaving_the_file_claimed(root: Path) -> None:
    (root / "watcher.toml").write_text(SLOW_TOML)
    (root / "inbox").mkdir()
    d = Daemon(root, "--config", str(root / "watcher.toml"), "--workers", "1")
    crashers.slow_image(str(root / "inbox" / "long.png"), 20.0)
    d.wait_for("file.queued", input="long.png")
    time.sleep(0.3)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for("daemon.stopping")
    d.proc.send_signal(signal.SIGTERM)
    assert d.exit_code() == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 15
    assert claimed(root) == ["long.png"]  # nothing lost: it is processed next time
    assert files(root / "processed") == []
    assert_no_temps(root)
    wait_until(lambda: not tagged_processes(d.tag), 10, "no process of the daemon left")


def test_kill_9_of_the_daemon_mid_burst_then_restart_loses_nothing(root: Path) -> None:
    (root / "inbox").mkdir()
    names = [f"k{i:03d}.png" for i in range(300)]
    d = Daemon(root)
    for n in names:
        make_image(root / "inbox" / n, size=(200, 150), seed=hash(n) % 50)
    d.wait_for("file.processed", count=40, timeout=60)
    d.kill()  # SIGKILL, mid-burst
    wait_until(lambda: not tagged_processes(d.tag), 15, "the killed daemon's workers to exit")
    d2 = Daemon(root)
    try:
        wait_until(lambda: not files(root / "inbox") and not files(root / "work"), 120,
                   "every input to be processed after the restart")
        wait_until(lambda: len(files(root / "archive")) == 300, 30, "300 archived")
    finally:
        assert d2.stop() == 0
    assert files(root / "archive") == names
    assert files(root / "processed") == sorted(n.replace(".png", "_thumbnail.png") for n in names)
    assert files(root / "quarantine") == []
    assert_no_temps(root)
    for n in names:  # every output is a complete image
        with Image.open(root / "processed" / n.replace(".png", "_thumbnail.png")) as im:
            im.load()


def test_sighup_reloads_pipelines(root: Path) -> None:
    cfg = root / "watcher.toml"
    cfg.write_text("[output]\npipelines = ['thumbnail']\n")
    (root / "inbox").mkdir()
    d = Daemon(root, "--config", str(cfg))
    try:
        drop(root, "before.png")
        d.wait_for("file.processed", input="before.png")
        cfg.write_text("[output]\npipelines = ['thumbnail', 'web']\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("config.reloaded")
        drop(root, "after.png")
        d.wait_for("file.processed", input="after.png")
        cfg.write_text("[output]\npipelines = ['nope']\n")  # a broken config is refused
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("config.reload_failed")
        drop(root, "still.png")
        d.wait_for("file.processed", input="still.png")
    finally:
        assert d.stop() == 0
    assert files(root / "processed") == ["after_thumbnail.png", "after_web.jpg",
                                        "before_thumbnail.png", "still_thumbnail.png",
                                        "still_web.jpg"]


def test_polling_observer(root: Path) -> None:
    d = Daemon(root, "--observer", "polling", "--poll-interval", "0.2", "--settle", "1.0")
    try:
        assert d.seen("observer.started")[0]["kind"] == "polling"
        buf = io.BytesIO()
        picture(400, 300).save(buf, "PNG")
        data = buf.getvalue()
        with open(root / "inbox" / "chunks.png", "wb") as f:
            for i in range(4):  # pauses shorter than the settle time
                f.write(data[i * len(data) // 4: (i + 1) * len(data) // 4])
                f.flush()
                time.sleep(0.3)
        drop(root, "plain.png")
        d.wait_for("file.processed", count=2)
    finally:
        d.stop()
    assert files(root / "archive") == ["chunks.png", "plain.png"]
    assert (root / "archive" / "chunks.png").read_bytes() == data


def test_unwritable_output_is_transient_and_nothing_is_quarantined(root: Path) -> None:
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root's permission override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                  "-dac_override,-dac_read_search"]
    (root / "processed").mkdir()
    (root / "processed").chmod(0o555)
    d = Daemon(root, prefix=prefix, env={"WATCHER_RETRY_BACKOFF": "0.2",
                                         "WATCHER_RETRY_BACKOFF_MAX": "0.5"})
    try:
        drop(root, "x.png")
        d.wait_for("file.retried", count=2, input="x.png")
        assert claimed(root) == ["x.png"]  # kept, not quarantined
        (root / "processed").chmod(0o755)
        d.wait_for("file.processed", input="x.png")
    finally:
        (root / "processed").chmod(0o755)
        d.stop()
    retried = d.seen("file.retried")
    assert all(e["reason"] == "write-failed" for e in retried)
    assert files(root / "quarantine") == [] and files(root / "archive") == ["x.png"]


@pytest.mark.parametrize("mode", ["delete", "keep"])
def test_on_success_delete_and_keep(root: Path, mode: str) -> None:
    d = Daemon(root, "--on-success", mode, "--log-level", "debug")
    try:
        drop(root, "a.png")
        d.wait_for("file.processed", input="a.png")
        if mode == "keep":
            n = len(d.seen("reconcile.done"))
            d.wait_for("reconcile.done", count=n + 2, timeout=20)
    finally:
        d.stop()
    assert files(root / "archive") == []
    assert files(root / "inbox") == (["a.png"] if mode == "keep" else [])
    assert d.fates() == {"a.png": 1}  # kept inputs are not processed again
    if mode == "keep":  # a restart skips it: its outputs exist
        d2 = Daemon(root, "--on-success", "keep")
        try:
            d2.wait_for("file.skipped", input="a.png")
        finally:
            d2.stop()


def test_fork_start_method_is_refused_in_watch_mode(root: Path) -> None:
    conf = root / "watcher.toml"
    conf.write_text('[engine]\nstart_method = "fork"\n')
    proc = subprocess.run([sys.executable, "-m", "watcher", "watch", "--config", str(conf),
                           "--inbox", str(root / "in"), "--output", str(root / "out")],
                          capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "engine.start_method" in proc.stderr and "not safe in watch mode" in proc.stderr


def test_config_with_output_inside_inbox_is_refused(root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "watcher", "watch", "--inbox",
                           str(root / "in"), "--output", str(root / "in" / "out")],
                          capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "watch.output" in proc.stderr and "inside the inbox" in proc.stderr
