"""The engine with real worker processes: results, crashes (SIGKILL), timeouts, recycling,
idle workers killed from outside, draining on close. Deadlines everywhere, no bare sleeps."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import crashers
from tests.conftest import make_image, wait_until
from watcher import config
from watcher.config import EngineSettings
from watcher.engine.executor import EngineError
from watcher.engine.supervisor import Engine
from watcher.settings.schema import DecodeLimits
from watcher.tasks import OutputPlan, Result, Task

pytestmark = pytest.mark.integration


def engine_for(steps: list[Any], **settings: Any) -> Engine:
    p = config.pipeline_from(steps, "p", "p")
    s = EngineSettings(**{"workers": 2, "task_timeout": 30.0, "grace": 5.0, **settings})
    return Engine(s, {"p": p}, DecodeLimits())


@pytest.fixture
def images(tmp_path: Path) -> Iterator[list[Path]]:
    yield [make_image(tmp_path / "in" / f"{i}.png", seed=i) for i in range(6)]


def poison(path: Path, token: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    crashers.poison_image(str(path), token)
    return path


def slow(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    crashers.slow_image(str(path), seconds)
    return path


def tasks_for(paths: list[Path], out: Path) -> list[Task]:
    return [Task(seq=i, path=str(p),
                 outputs=(OutputPlan(pipeline="p", path=str(out / f"{p.stem}_p.png")),))
            for i, p in enumerate(paths)]


def run_all(engine: Any, tasks: list[Task], timeout: float = 60) -> dict[str, Result]:
    """Submit everything and poll until every task has a result (or fail at the deadline)."""
    results: dict[str, Result] = {}
    for t in tasks:
        engine.submit(t)
    deadline = time.monotonic() + timeout
    while engine.outstanding:
        if time.monotonic() > deadline:
            pytest.fail(f"engine did not finish in {timeout} s: {results}")
        for r in engine.poll(0.2):
            assert r.path not in results, f"two results for {r.path}"
            results[r.path] = r
    return results


def test_all_tasks_complete_and_workers_end(tmp_path: Path, images: list[Path]) -> None:
    e = engine_for(["grayscale", "resize_half"])
    e.start()
    try:
        pids = e.pids
        results = run_all(e, tasks_for(images, tmp_path / "out"))
    finally:
        e.close()
    assert all(r.ok for r in results.values()), results
    assert {r.worker for r in results.values()} <= set(pids)
    assert len(list((tmp_path / "out").iterdir())) == 6
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_worker_killed_by_sigkill_is_replaced_and_task_fails_after_retry(
        tmp_path: Path, images: list[Path]) -> None:
    bad = poison(tmp_path / "in" / "bad.png")
    e = engine_for([crashers.kill_on_poison, "thumbnail(8, 8)"])
    e.start()
    try:
        results = run_all(e, tasks_for([*images, bad], tmp_path / "out"))
    finally:
        e.close()
    r = results[str(bad)]
    assert (r.ok, r.reason, r.attempt) == (False, "worker-crashed", 2)
    assert "SIGKILL" in r.error
    assert all(results[str(p)].ok for p in images)
    assert e.stats.crashes == 2 and e.stats.restarts >= 2
    assert not list((tmp_path / "out").glob(".*"))  # no temp files


def test_task_pending_commit_when_worker_dies_is_requeued_not_lost(tmp_path: Path) -> None:
    # The committer thread still fsyncs the first image's output (a slow disk) when the main
    # thread takes the poisoned one and the worker is SIGKILLed: the first must be re-run on a
    # fresh worker (same attempt, not charged), the poisoned one charged.
    first = tmp_path / "in" / "first.png"
    first.parent.mkdir(parents=True)
    crashers.slow_disk_image(str(first))
    bad = poison(tmp_path / "in" / "bad.png")
    e = engine_for([crashers.slow_disk_on_marker, crashers.kill_on_poison, "thumbnail(8, 8)"],
                   workers=1)
    e.start()
    try:
        results = run_all(e, tasks_for([first, bad], tmp_path / "out"))
    finally:
        e.close()
    assert (results[str(first)].ok, results[str(first)].attempt) == (True, 1)
    assert (results[str(bad)].reason, results[str(bad)].attempt) == ("worker-crashed", 2)
    assert e.stats.requeued >= 1
    assert (tmp_path / "out" / "first_p.png").is_file()
    assert not list((tmp_path / "out").glob(".*"))  # the killed commit's temp file is gone


def test_crash_is_retried_once_and_can_succeed(tmp_path: Path, images: list[Path]) -> None:
    token = os.getpid() % 256
    marker = Path(crashers.marker_path(token))
    marker.unlink(missing_ok=True)
    bad = poison(tmp_path / "in" / "flaky.png", token)
    e = engine_for([crashers.kill_first_time])
    e.start()
    try:
        results = run_all(e, tasks_for([*images[:2], bad], tmp_path / "out"))
    finally:
        e.close()
    assert results[str(bad)].ok and results[str(bad)].attempt == 2
    assert marker.exists()
    marker.unlink()


def test_task_past_timeout_kills_worker_and_fails_with_timeout(
        tmp_path: Path, images: list[Path]) -> None:
    bad = poison(tmp_path / "in" / "hang.png")
    e = engine_for([crashers.hang_on_poison], task_timeout=1.0)
    e.start()
    try:
        results = run_all(e, tasks_for([bad, *images], tmp_path / "out"))
        hung_pid = results[str(bad)].worker
    finally:
        e.close()
    r = results[str(bad)]
    assert (r.ok, r.reason) == (False, "timeout")
    assert all(results[str(p)].ok for p in images)
    assert e.stats.timeouts == 1
    with pytest.raises(ProcessLookupError):
        os.kill(hung_pid, 0)


def test_idle_worker_killed_from_outside_is_replaced_and_work_goes_on(
        tmp_path: Path, images: list[Path]) -> None:
    e = engine_for(["mirror"], workers=2)
    e.start()
    try:
        first = run_all(e, tasks_for(images[:2], tmp_path / "out"))
        assert all(r.ok for r in first.values())
        victim = e.pids[0]
        os.kill(victim, signal.SIGKILL)  # idle: waiting on its task pipe
        more = tasks_for(images[2:], tmp_path / "out2")
        more = [Task(seq=t.seq + 100, path=t.path, outputs=t.outputs) for t in more]
        results = run_all(e, more, timeout=30)
    finally:
        e.close()
    assert all(r.ok and r.attempt == 1 for r in results.values()), results
    assert e.stats.restarts == 1 and e.stats.crashes == 0
    assert victim not in {r.worker for r in results.values()}


def test_tasks_a_killed_worker_had_not_started_go_to_another_uncharged(
        tmp_path: Path, images: list[Path]) -> None:
    # One worker holds a slow task and, queued behind it, two more it has not started. Killed,
    # it is charged for the slow one only; the other two run on its replacement, first attempt.
    e = engine_for([crashers.slow], workers=1)
    e._book.avg = 0.001  # as if tasks were short: the worker is handed tasks ahead
    e.start()
    try:
        s = slow(tmp_path / "in" / "s.png", 1.5)
        tasks = tasks_for([s, *images[:2]], tmp_path / "out")
        for t in tasks:
            e.submit(t)
        wait_until(lambda: e._slots[0].seq == tasks[0].seq, 10, "the worker to start the task")
        assert len(e._slots[0].held) == 3  # all three were sent to it
        os.kill(e.pids[0], signal.SIGKILL)
        results: dict[str, Result] = {}
        deadline = time.monotonic() + 30
        while e.outstanding and time.monotonic() < deadline:
            results.update((r.path, r) for r in e.poll(0.2))
    finally:
        e.close()
    assert results[str(s)].ok and results[str(s)].attempt == 2
    assert all(results[str(p)].ok and results[str(p)].attempt == 1 for p in images[:2])
    assert e.stats.crashes == 1 and e.stats.requeued == 2


def test_busy_worker_killed_from_outside_retries_its_task(tmp_path: Path) -> None:
    e = engine_for([crashers.slow], workers=1)
    e.start()
    try:
        task = tasks_for([slow(tmp_path / "in" / "s.png", 1.5)], tmp_path / "out")[0]
        e.submit(task)
        pid = e.pids[0]
        # The worker records the task in its slot when it starts it.
        wait_until(lambda: e._slots[0].seq == task.seq, 10, "the worker to start the task")
        os.kill(pid, signal.SIGKILL)
        results: list[Result] = []
        deadline = time.monotonic() + 30
        while e.outstanding and time.monotonic() < deadline:
            results += e.poll(0.2)
    finally:
        e.close()
    assert len(results) == 1 and results[0].ok and results[0].attempt == 2


def test_workers_are_recycled_after_max_tasks(tmp_path: Path, images: list[Path]) -> None:
    e = engine_for(["mirror"], workers=1, max_tasks_per_worker=2)
    e.start()
    try:
        results = run_all(e, tasks_for(images, tmp_path / "out"))
    finally:
        e.close()
    assert all(r.ok for r in results.values())
    assert len({r.worker for r in results.values()}) == 3
    assert e.stats.started >= 3 and e.stats.crashes == 0


def test_close_drains_running_tasks_and_withdraws_the_rest(tmp_path: Path) -> None:
    e = engine_for([crashers.slow], workers=2)
    e.start()
    tasks = tasks_for([slow(tmp_path / "in" / f"{i}.png", 1.0) for i in range(6)],
                      tmp_path / "out")
    for t in tasks:
        e.submit(t)
    wait_until(lambda: sum(s.seq >= 0 for s in e._slots.values()) == 2, 10,
               "both workers to be busy")
    withdrawn = e.stop_intake()
    results = e.close(grace=10)
    assert len(withdrawn) + len(results) == 6
    assert len(results) == 2 and all(r.ok for r in results)  # the two running ones finished
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_close_kills_tasks_past_the_grace_period(tmp_path: Path) -> None:
    bad = poison(tmp_path / "in" / "hang.png")
    e = engine_for([crashers.hang_on_poison], workers=1)
    e.start()
    task = tasks_for([bad], tmp_path / "out")[0]
    e.submit(task)
    wait_until(lambda: e._slots[0].seq == task.seq, 10, "the worker to start the task")
    t0 = time.monotonic()
    results = e.close(grace=0.5)
    assert time.monotonic() - t0 < 10
    assert [(r.ok, r.reason) for r in results] == [(False, "cancelled")]


def test_duplicate_result_is_dropped(tmp_path: Path, images: list[Path]) -> None:
    e = engine_for(["mirror"], workers=1)
    e.start()
    try:
        task = tasks_for(images[:1], tmp_path / "out")[0]
        first = run_all(e, [task])
        late = Result(seq=task.seq, path=task.path, ok=True)
        assert e._book.accept(late) is None
    finally:
        e.close()
    assert first[task.path].ok and e.stats.duplicates == 1


def test_unimportable_transform_stops_the_engine(tmp_path: Path, images: list[Path]) -> None:
    import sys
    import types

    mod = types.ModuleType("watcher_test_ghost")

    def ghost(im):  # type: ignore[no-untyped-def]
        return im

    ghost.__module__ = "watcher_test_ghost"
    ghost.__qualname__ = "ghost"
    mod.ghost = ghost  # type: ignore[attr-defined]
    sys.modules["watcher_test_ghost"] = mod  # importable here, not in a worker
    try:
        # a forked worker would inherit the module: only a started interpreter lacks it
        e = engine_for([ghost], workers=1, start_method="forkserver")
        e.start()
        with pytest.raises(EngineError, match="cannot start"):
            run_all(e, tasks_for(images[:1], tmp_path / "out"), timeout=30)
        e.close(grace=0)
    finally:
        del sys.modules["watcher_test_ghost"]


CRASHING_MAIN = """
import sys
from pathlib import Path
from watcher import process_images
# no `if __name__ == "__main__":` guard: every worker re-runs this file and dies at start
if sys.argv[-1] == "child-run":
    raise SystemExit(1)
process_images([sys.argv[1]], sys.argv[2], ["grayscale"], config=sys.argv[3])
"""


def test_workers_dying_at_start_stop_the_engine_instead_of_respawning(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    src = make_image(tmp_path / "a.png")
    script = tmp_path / "unguarded.py"
    # the main module raises on import in a worker (its argv is the parent's: we mark it)
    script.write_text(CRASHING_MAIN.replace('sys.argv[-1] == "child-run"',
                                            "__name__ != '__main__'"))
    # a forkserver's workers import the main module (a forked one would not)
    conf = tmp_path / "watcher.toml"
    conf.write_text('[engine]\nstart_method = "forkserver"\n')
    proc = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "out"),
                           str(conf)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "died before finishing any task" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("worker.started") < 20  # it stopped, not a respawn storm


START_METHOD_MAIN = """
import os, sys, threading
from watcher import process_images
from tests import crashers
if __name__ == "__main__":
    if sys.argv[3] == "with-a-thread":
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    report = process_images([sys.argv[1]], sys.argv[2], [crashers.note_parent, "grayscale"],
                            workers=2)
    print(os.getpid(), report.succeeded)
"""


@pytest.mark.parametrize("mode", ["alone", "with-a-thread"])
def test_a_batch_forks_its_workers_unless_it_runs_other_threads(tmp_path: Path,
                                                                mode: str) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    srcs = [make_image(tmp_path / "in" / f"{i}.png", seed=i) for i in range(4)]
    notes = tmp_path / "notes"
    notes.mkdir()
    script = tmp_path / "main.py"
    script.write_text(START_METHOD_MAIN)
    proc = subprocess.run([sys.executable, str(script), str(srcs[0].parent), str(tmp_path / "o"),
                           mode], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "WATCHER_TEST_NOTES": str(notes)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    batch_pid, succeeded = map(int, proc.stdout.split())
    assert succeeded == 4
    parents = {int(p.read_text()) for p in notes.iterdir()}
    assert parents, "no worker ran the transform"
    if mode == "alone":  # forked from the batch process itself: no forkserver in between
        assert parents == {batch_pid}
    else:  # a forkserver's children
        assert batch_pid not in parents


def test_forked_idle_workers_end_when_their_task_pipe_closes(
        tmp_path: Path, images: list[Path], capfd: pytest.CaptureFixture[str]) -> None:
    # A forked worker inherits this process's descriptors, its own task pipe's writing end and
    # its siblings' among them; held open, they would hide the closing of its task pipe, and
    # close() would have to kill the idle workers instead of letting them stop.
    p = config.pipeline_from(["grayscale"], "p", "p")
    e = Engine(EngineSettings(workers=2, task_timeout=30.0, grace=5.0), {"p": p},
               DecodeLimits(), log_format="json", log_level="debug")
    assert e.start_method == "fork"  # pytest runs no other thread
    e.start()
    results = run_all(e, tasks_for(images, tmp_path / "out"))
    assert all(r.ok for r in results.values())
    pids = e.pids
    e.close()
    # two workers write to one stderr at once: take each JSON object, not each line
    events = [json.loads(m) for m in re.findall(r"\{[^{}\n]*\}", capfd.readouterr().err)]
    stopped = [ev for ev in events if ev.get("event") == "worker.stopped"]
    assert sorted(ev["worker_pid"] for ev in stopped) == sorted(pids)  # each stopped by itself


@pytest.mark.parametrize(("bad", "crash_retries"), [(3, 1), (1, 5)])
def test_inputs_that_kill_their_workers_never_stop_the_engine(
        tmp_path: Path, images: list[Path], bad: int, crash_retries: int) -> None:
    """Workers killed by the inputs they took are those inputs' business: each is charged
    worker-crashed after crash_retries + 1 deaths, and the rest go on, however many deaths come
    in a row (an attacker's 3 poisoned files on one worker, or one with crash_retries 5, made
    the engine give up as if workers could not start)."""
    poisoned = [poison(tmp_path / "in" / f"bad{i}.png") for i in range(bad)]
    e = engine_for([crashers.kill_on_poison, "thumbnail(8, 8)"], workers=1,
                   crash_retries=crash_retries)
    e.start()
    try:
        results = run_all(e, tasks_for([*poisoned, *images], tmp_path / "out"))
    finally:
        e.close()
    assert {(results[str(p)].reason, results[str(p)].attempt) for p in poisoned} == \
        {("worker-crashed", crash_retries + 1)}
    assert all(results[str(p)].ok for p in images)
    assert e.stats.crashes == bad * (crash_retries + 1)
