"""The worker's committer thread: commit groups, and a lone task at idle committed at once."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_image
from watcher import config
from watcher.engine import committer
from watcher.engine import slot as slot_layout
from watcher.imaging.processor import Processor
from watcher.settings.schema import DecodeLimits
from watcher.tasks import OutputPlan, Task


def _committer(tmp_path: Path, n: int) -> tuple[committer.Committer, Any, list[Any], Path]:
    proc = Processor({"p": config.pipeline_from(["thumbnail(16, 16)"], "p", "p")},
                     DecodeLimits())
    out = tmp_path / "out"
    preps = []
    for i in range(n):
        src = make_image(tmp_path / "in" / f"{i}.png", seed=i)
        preps.append(proc.prepare(Task(seq=i, path=str(src), outputs=(
            OutputPlan(pipeline="p", path=str(out / f"{i}.png")),))))
    recv, send = multiprocessing.Pipe(duplex=False)
    slot = multiprocessing.RawArray("d", slot_layout.SLOT_SIZE)
    return committer.Committer(proc, send, slot, threading.Lock()), recv, preps, out


def test_a_lone_task_waits_for_company_until_the_worker_is_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(committer, "GROUP_WAIT", 3600.0)
    c, results, preps, out = _committer(tmp_path, 1)
    try:
        c.hand_over(preps[0])
        assert not results.poll(0.3)  # not due: the worker may hand over more
        assert not out.exists()
        c.flush()  # the worker has nothing else to do
        assert results.poll(10), "flush did not commit the waiting task"
        [r] = results.recv()
        assert r.ok and r.outputs == (str(out / "0.png"),) and r.peak_rss_kb > 0
        assert (out / "0.png").is_file()
    finally:
        c.close()


def test_a_full_group_is_committed_and_reported_in_one_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(committer, "GROUP_WAIT", 3600.0)
    c, results, preps, out = _committer(tmp_path, committer.GROUP_MAX + 1)
    try:
        for prep in preps:
            c.hand_over(prep)
        assert results.poll(10), "a full group was not committed"
        group = results.recv()
        assert [r.seq for r in group] == list(range(committer.GROUP_MAX))
        assert all(r.ok for r in group)
        assert not results.poll(0.3)  # the last one waits for company
    finally:
        c.close()  # commits what is pending
    assert [r.seq for r in results.recv()] == [committer.GROUP_MAX]
    assert len(list(out.glob("*.png"))) == committer.GROUP_MAX + 1
    assert not list(out.glob(".*"))  # no temp file left


def test_a_failing_commit_reports_its_task_ends_the_thread_and_hand_over_does_not_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fault hook raises inside the real committer thread. The task gets a failure result,
    # on_fatal (in a worker: end the process) is called once, and the main thread, handing
    # over the next task with the queue full, learns that no one will commit it.
    monkeypatch.setattr(committer, "GROUP_WAIT", 3600.0)
    monkeypatch.setenv(committer.COMMIT_FAIL_HOOK, "out/0.png")
    fatal: list[str] = []
    proc = Processor({"p": config.pipeline_from(["thumbnail(16, 16)"], "p", "p")},
                     DecodeLimits())
    out = tmp_path / "out"
    preps = [proc.prepare(Task(seq=i, path=str(make_image(tmp_path / "in" / f"{i}.png", seed=i)),
                               outputs=(OutputPlan(pipeline="p", path=str(out / f"{i}.png")),)))
             for i in range(2)]
    recv, send = multiprocessing.Pipe(duplex=False)
    slot = multiprocessing.RawArray("d", slot_layout.SLOT_SIZE)
    c = committer.Committer(proc, send, slot, threading.Lock(), on_fatal=fatal.append)
    c.hand_over(preps[0])
    c.flush()
    assert recv.poll(10), "no failure result was sent"
    [r] = recv.recv()
    assert (r.seq, r.ok, r.reason) == (0, False, "internal-error")
    assert committer.COMMIT_FAIL_HOOK in r.error
    deadline = time.monotonic() + 10
    while c.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not c.alive and len(fatal) == 1 and "RuntimeError" in fatal[0]
    assert slot[slot_layout.COMMIT_STARTED] == slot_layout.IDLE  # its culprit was reported
    monkeypatch.setattr(committer, "COMMIT_DEPTH", 1)  # the failed group still fills the queue
    raised: list[BaseException] = []

    def main_thread() -> None:
        try:
            c.hand_over(preps[1])
        except committer.CommitterGoneError as exc:
            raised.append(exc)

    t = threading.Thread(target=main_thread, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "hand_over blocked on a committer that is gone"
    assert raised
    assert not list(out.glob(".*"))  # the failed task's temp file is gone
