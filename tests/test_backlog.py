"""Lost events: a real inotify queue overflow makes the daemon rescan at once.

The kernel's limit is really lowered (``fs.inotify.max_queued_events``, read when an inotify
instance is made, so before the daemon starts) and restored afterwards; the daemon is really
stopped (SIGSTOP) while files are renamed in, so that its queue really overflows.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.test_watch import Daemon
from watcher.watch import sources

pytestmark = pytest.mark.integration

LIMIT = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def small_queue() -> Iterator[int]:
    if not os.access(LIMIT, os.W_OK):
        pytest.skip("fs.inotify.max_queued_events is not writable here (needs root)")
    before = LIMIT.read_text()
    LIMIT.write_text("64\n")
    try:
        yield 64
    finally:
        LIMIT.write_text(before)


def test_a_queue_overflow_is_followed_by_a_rescan_at_once(tmp_path: Path,
                                                          small_queue: int) -> None:
    """With a 64-event queue and 400 files renamed in while the daemon is stopped, most events
    are lost; with the periodic scan an hour away, only the rescan after the overflow can find
    them: every file gets its fate, the overflow is logged and counted."""
    d = Daemon(tmp_path, "--reconcile-interval", "3600", "-j", "2")
    try:
        stage = tmp_path / "stage"
        src = make_image(stage / "seed.png", size=(32, 24))
        data = src.read_bytes()
        n = 400
        names = [f"f{i:04d}.png" for i in range(n)]
        for name in names:
            (stage / name).write_bytes(data)
        os.kill(d.proc.pid, signal.SIGSTOP)  # the observer thread too: nobody reads the queue
        try:
            for name in names:
                os.rename(stage / name, tmp_path / "inbox" / name)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        over = d.wait_for("observer.overflowed", timeout=30)[0]
        assert over["overflows"] >= 1
        d.wait_for("file.processed", count=n, timeout=240)
        assert set(d.fates()) == set(names)
        assert all(v == 1 for v in d.fates().values())
        found = sum(e["files"] for e in d.seen("reconcile.found"))
        assert found >= n - small_queue * 2  # most were heard of only through the rescan
        assert not list((tmp_path / "inbox").iterdir())
    finally:
        assert d.stop() == 0


def test_a_tick_looks_only_at_what_is_due_however_long_the_backlog() -> None:
    """10,000 files waiting for their quiet period and one closed just now: a call stats the one
    (and none of the others until their look is due); taking a few of many ready files looks
    at those few."""
    clock = [0.0]
    looked: list[str] = []

    def stat_fn(path: str) -> os.stat_result:
        looked.append(path)
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, 100, 0, 0, 0))

    t = sources.Stability(2.0, lambda: clock[0], stat_fn, close_events=True)
    for i in range(10_000):
        t.hint(f"/in/w{i}", sources.CREATED)
    assert t.due() == [] and len(looked) == 10_000  # each looked at once, when hinted
    looked.clear()
    clock[0] = 0.5
    t.hint("/in/done", sources.CLOSED)
    assert t.due() == ["/in/done"]
    assert looked == ["/in/done"]  # none of the 10,000 waiting is due before 1 s
    looked.clear()
    clock[0] = 5.0  # every file quiet for its period: all ready; take 3
    taken = []
    for path in t.ready():
        taken.append(path)
        t.forget(path)
        if len(taken) == 3:
            break
    assert len(taken) == 3 and len(looked) == 3
    assert len(t.due()) == 10_001 - 3  # the rest are still offered, oldest first
