"""No thread can wedge a worker (issue 12): faults in the committer thread, commits that stall,
workers that stop, real over-long names. Real worker processes, real signals, deadlines (a hang
fails the test); the faults come from the worker's test-only hooks (WATCHER_DEBUG_COMMIT_FAIL,
WATCHER_DEBUG_COMMIT_STALL) or from the file system itself."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests import crashers
from tests.conftest import make_image, run_cli, wait_until
from tests.test_engine import engine_for, run_all, tasks_for
from watcher.engine import committer, handles
from watcher.engine import slot as slot_layout
from watcher.tasks import Result

pytestmark = pytest.mark.integration


def exit_on_poison(im: Any) -> Any:
    """A transform that ends the worker's main thread (sys.exit) on a poisoned image."""
    if im.convert("RGB").getpixel((0, 0)) == crashers.POISON:
        raise SystemExit(0)
    return im


def _inputs(folder: Path, names: list[str]) -> list[Path]:
    return [make_image(folder / n, size=(32, 24), seed=i) for i, n in enumerate(names)]


def _no_temps(out: Path) -> bool:
    return not [p for p in out.rglob(".*") if p.is_file()]


def test_a_commit_that_raises_fails_that_task_and_the_next_ten_are_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(committer.COMMIT_FAIL_HOOK, "bad_p")
    paths = _inputs(tmp_path / "in", ["bad.png", *(f"{i}.png" for i in range(10))])
    e = engine_for(["mirror"], workers=1, start_method="fork")
    e.start()
    try:
        first = e.pids[0]
        results = run_all(e, tasks_for(paths, tmp_path / "out"), timeout=60)
        after = e.pids[0]
    finally:
        e.close()
    bad = results[str(paths[0])]
    assert (bad.ok, bad.reason) == (False, "internal-error")
    assert committer.COMMIT_FAIL_HOOK in bad.error
    assert any("Traceback" in w for w in bad.warnings)  # the traceback is in the result
    assert all(results[str(p)].ok for p in paths[1:]), results
    assert after != first and e.stats.restarts >= 1  # the worker ended; a fresh one took over
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{p.stem}_p.png" for p in paths[1:])
    assert _no_temps(tmp_path / "out")


def test_a_commit_that_stalls_past_the_timeout_is_charged_and_the_others_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(committer.COMMIT_STALL_HOOK, "stall_p")
    paths = _inputs(tmp_path / "in", ["stall.png", *(f"{i}.png" for i in range(6))])
    e = engine_for(["mirror"], workers=2, task_timeout=1.5, start_method="fork")
    e.start()
    try:
        results = run_all(e, tasks_for(paths, tmp_path / "out"), timeout=60)
    finally:
        e.close()
    stalled = results[str(paths[0])]
    assert (stalled.ok, stalled.reason) == (False, "timeout")
    assert "writing its outputs" in stalled.error
    assert all(results[str(p)].ok and results[str(p)].attempt == 1 for p in paths[1:])
    assert e.stats.timeouts == 1
    with pytest.raises(ProcessLookupError):
        os.kill(stalled.worker, 0)  # killed and replaced
    assert _no_temps(tmp_path / "out")


def test_problems_reports_a_stalled_commit_until_it_is_settled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(committer.COMMIT_STALL_HOOK, "stall_p")
    [path] = _inputs(tmp_path / "in", ["stall.png"])
    e = engine_for(["mirror"], workers=1, task_timeout=1.0, start_method="fork")
    e.start()
    try:
        task = tasks_for([path], tmp_path / "out")[0]
        assert e.problems() == []
        e.submit(task)  # sent at once; no tick (poll) runs until the report is seen
        slot = e._slots[0]
        wait_until(lambda: slot.shared[slot_layout.COMMIT_SEQ] == task.seq, 20,
                   "the committer to start writing the output")
        found = wait_until(e.problems, 20, "problems() to report the stalled commit")
        assert any("past the 1 s timeout" in p and str(path) in p for p in found), found
        results: list[Result] = []
        deadline = time.monotonic() + 30
        while e.outstanding and time.monotonic() < deadline:
            results += e.poll(0.2)
        assert [(r.reason, r.path) for r in results] == [("timeout", str(path))]
        wait_until(lambda: not e.poll(0.1) and e.problems() == [], 20,
                   "problems() to clear once the killed worker is replaced")
    finally:
        e.close()


def test_a_stopped_worker_holding_tasks_is_reported_then_killed_and_its_tasks_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handles, "WEDGE_MARGIN", 1.0)
    paths = _inputs(tmp_path / "in", [f"{i}.png" for i in range(4)])
    e = engine_for(["mirror"], workers=1, task_timeout=1.0, start_method="fork")
    e.start()
    try:
        victim = e.pids[0]
        wait_until(lambda: e._slots[0].shared[slot_layout.COMMITTER_BEAT] > 0, 20,
                   "the worker to start")
        os.kill(victim, signal.SIGSTOP)  # it takes nothing any more, but is alive
        tasks = tasks_for(paths, tmp_path / "out")
        for t in tasks:
            e.submit(t)
        results: dict[str, Result] = {}

        def reported() -> list[str]:
            results.update((r.path, r) for r in e.poll(0.1))
            return e.problems()

        found = wait_until(reported, 20, "problems() to report the wedged worker")
        assert any(f"worker {victim} holds" in p and "no progress" in p for p in found), found
        deadline = time.monotonic() + 60
        while e.outstanding and time.monotonic() < deadline:
            results.update((r.path, r) for r in e.poll(0.2))
    finally:
        e.close()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    assert sorted(results) == sorted(str(p) for p in paths)
    assert all(r.ok and r.attempt == 1 for r in results.values()), results
    assert victim not in {r.worker for r in results.values()}


def test_a_task_whose_commit_keeps_killing_its_worker_is_not_run_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The committer stalls writing one output and its worker is SIGKILLed from outside (a
    # crash in the commit), each time: given back uncharged, it would be run again forever.
    monkeypatch.setenv(committer.COMMIT_STALL_HOOK, "doom_p")
    [path] = _inputs(tmp_path / "in", ["doom.png"])
    e = engine_for(["mirror"], workers=1, task_timeout=60.0,  # crash_retries: 1
                   start_method="fork")  # the hooks are in this environment
    e.start()
    task = tasks_for([path], tmp_path / "out")[0]
    results: list[Result] = []
    kills = 0
    try:
        e.submit(task)
        deadline = time.monotonic() + 60
        while e.outstanding and time.monotonic() < deadline:
            slot = next(iter(e._slots.values()), None)
            if slot is not None and slot.shared[slot_layout.COMMIT_SEQ] == task.seq and \
                    slot.proc.is_alive() and not slot.killed:
                os.kill(slot.proc.pid, signal.SIGKILL)
                kills += 1
                wait_until(lambda s=slot: not s.proc.is_alive(), 10, "the worker to die")
            results += e.poll(0.1)
    finally:
        e.close()
    assert [(r.path, r.reason) for r in results] == [(str(path), "worker-crashed")]
    assert "2 worker(s) died" in results[0].error
    assert kills == 2
    assert _no_temps(tmp_path / "out")


def _report(proc: Any) -> dict[str, Any]:
    return json.loads(proc.stdout)


def test_a_batch_with_commit_faults_reports_every_input_once(tmp_path: Path) -> None:
    names = ["bad.png", "stall.png", *(f"{i}.png" for i in range(10))]
    _inputs(tmp_path / "in", names)
    proc = run_cli("batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-j", "2",
                   "--timeout", "3", "--ops", "mirror", "--suffix", "m", "--report", "-",
                   "--no-progress", timeout=120,
                   env={committer.COMMIT_FAIL_HOOK: "bad_m",
                        committer.COMMIT_STALL_HOOK: "stall_m"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    items = _report(proc)["items"]
    by_name = {os.path.basename(i["input"]): i for i in items}
    assert sorted(by_name) == sorted(names) and len(items) == len(names)
    assert (by_name["bad.png"]["status"], by_name["bad.png"]["reason"]) == \
        ("failed", "internal-error")
    assert (by_name["stall.png"]["status"], by_name["stall.png"]["reason"]) == \
        ("failed", "timeout")
    assert all(by_name[n]["status"] == "ok" for n in names[2:]), items
    assert _no_temps(tmp_path / "out")


def test_a_240_byte_input_name_through_batch_ends_and_reports_it(tmp_path: Path) -> None:
    # Its temp name (".{name}.{host}.{pid}.watcher-tmp") may pass NAME_MAX (255 bytes): the
    # file system refuses it inside the committer thread. That input fails with a reason (or,
    # once temp names are kept short, succeeds); the batch ends and does the others.
    long_name = "L" * 236 + ".png"
    assert len(long_name.encode()) == 240
    names = [long_name, *(f"{i}.png" for i in range(10))]
    _inputs(tmp_path / "in", names)
    proc = run_cli("batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-j", "1",
                   "--timeout", "10", "--ops", "mirror", "--suffix", "m", "--report", "-",
                   "--no-progress", timeout=120)
    items = _report(proc)["items"]
    by_name = {os.path.basename(i["input"]): i for i in items}
    assert sorted(by_name) == sorted(names) and len(items) == len(names)
    assert all(by_name[n]["status"] == "ok" for n in names[1:]), items
    long = by_name[long_name]
    if long["status"] == "ok":
        assert proc.returncode == 0
        (out,) = long["outputs"]  # its name shortened within NAME_MAX, the readable start kept
        name = os.path.basename(out)
        assert Path(out).is_file() and name.startswith("L" * 100) and name.endswith("_m.png")
        assert len(name.encode()) <= 255
    else:
        assert (long["status"], long["reason"]) == ("failed", "path-too-long"), long
        assert "File name too long" in long["error"]
        assert proc.returncode == 1
    assert _no_temps(tmp_path / "out")


def test_a_main_thread_that_exits_mid_task_fails_that_task_and_the_others_are_done(
        tmp_path: Path) -> None:
    bad = tmp_path / "in" / "exit.png"
    bad.parent.mkdir(parents=True)
    crashers.poison_image(str(bad))
    paths = _inputs(tmp_path / "in", [f"{i}.png" for i in range(6)])
    e = engine_for([exit_on_poison], workers=1)
    e.start()
    try:
        results = run_all(e, tasks_for([bad, *paths], tmp_path / "out"), timeout=60)
    finally:
        e.close()
    r = results[str(bad)]
    assert (r.ok, r.reason, r.attempt) == (False, "worker-crashed", 2)
    assert "exit code 0" in r.error
    assert all(results[str(p)].ok for p in paths)
    assert _no_temps(tmp_path / "out")


def test_a_sync_that_stalls_past_the_timeout_charges_its_commit_group(tmp_path: Path) -> None:
    # A slow disk: the transform makes this worker's next fsync take 3 s, the one that makes
    # the task's output durable, a step its commit group shares. Past the 1 s timeout the
    # group (this task alone) is charged; the replacement worker does the others.
    first = tmp_path / "in" / "slowdisk.png"
    first.parent.mkdir(parents=True)
    crashers.slow_disk_image(str(first))
    paths = _inputs(tmp_path / "in", [f"{i}.png" for i in range(4)])
    e = engine_for([crashers.slow_disk_on_marker, "mirror"], workers=1, task_timeout=1.0)
    e.start()
    try:
        stalled = run_all(e, tasks_for([first], tmp_path / "out"), timeout=30)[str(first)]
        others = run_all(e, [replace(t, seq=t.seq + 1)
                             for t in tasks_for(paths, tmp_path / "out")], timeout=30)
    finally:
        e.close()
    assert (stalled.ok, stalled.reason) == (False, "timeout")
    assert "commit group" in stalled.error
    assert e.stats.timeouts == 1
    assert all(r.ok for r in others.values()), others
    assert _no_temps(tmp_path / "out")


def test_a_killed_forkserver_is_replaced_and_its_workers_respawned(
        tmp_path: Path) -> None:
    """The forkserver killed (by an operator, the OOM killer): its workers die with it, and the
    supervisor's respawn may reach it before it is gone for good (EOF on its socket); the next
    try starts a new one. Found by an attacker (the daemon exited 3 with EOFError)."""
    paths = _inputs(tmp_path / "in", [f"{i}.png" for i in range(6)])
    e = engine_for(["mirror"], workers=2, start_method="forkserver")
    e.start()
    try:
        wait_until(lambda: len(e.pids) == 2 and all(
            e._slots[i].shared[slot_layout.COMMITTER_BEAT] > 0 for i in e._slots), 20,
            "the workers to start")
        old = _parents(e.pids)
        assert len(old) == 1 and os.getpid() not in old
        os.kill(next(iter(old)), signal.SIGKILL)  # at once: its workers die with it
        results = run_all(e, tasks_for(paths, tmp_path / "out"))
        new = _parents(e.pids)
    finally:
        e.close()
    assert sorted(r.ok for r in results.values()) == [True] * 6
    assert len(new) == 1 and new != old  # served by a new forkserver


def _parents(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            out.add(int(f.read().rsplit(")", 1)[1].split()[1]))
    return out
