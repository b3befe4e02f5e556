"""How a worker process's life is bound to others' and how it ends at once: it dies with its
parent (``die_with_parent``), lets the forkserver go (``let_forkserver_go``), publishes nothing
more once its daemon is gone (``DaemonWatch``, ``Orphaned``), and ends itself after a failure in
any of its threads (``end_worker``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
from typing import Any

from watcher.engine.slot import EXIT_COMMIT_FAILED, HALT, IDLE, SEQ
from watcher.fs.files import pid_alive

LOCK_WAIT = 2.0  # seconds to wait for the slot's lock when ending after a failure


def end_worker(slot: Any, lock: Any, logger: Any, why: str) -> None:
    """End this worker process at once with EXIT_COMMIT_FAILED, from any of its threads.

    The slot is left showing no task in progress and a halt (so that no other is taken
    meanwhile): the supervisor then gives back every task it held without a result (the one the
    main thread was preparing did not cause this) and starts a fresh worker."""
    got = lock.acquire(timeout=LOCK_WAIT)
    try:
        slot[HALT] = 1.0
        slot[SEQ] = IDLE
    finally:
        if got:
            lock.release()
    with contextlib.suppress(Exception):
        logger.error("worker.failed", why=why, exitcode=EXIT_COMMIT_FAILED)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(EXIT_COMMIT_FAILED)


def let_forkserver_go() -> None:
    """Close this worker's copy of the forkserver's keep-alive pipe.

    multiprocessing hands every process forked from its forkserver the write end of the pipe
    whose end-of-file tells the forkserver that its client, the daemon, is gone; while any
    worker holds a copy, a killed daemon's forkserver lives on, and so (their parent-death
    signal follows the forkserver) do its workers, finishing and publishing the task in hand
    behind the next start. Without the copies, the forkserver exits the moment the daemon dies
    and takes every worker with it. A worker starts no processes of its own, so it needs none.
    """
    try:
        from multiprocessing import forkserver  # noqa: PLC0415
    except ImportError:
        return
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None or getattr(server, "_forkserver_pid", None) is not None:
        return  # not forked from a forkserver (this process started one itself: keep it)
    with contextlib.suppress(OSError):
        os.close(fd)
    server._forkserver_alive_fd = None


class DaemonWatch:
    """Whether the process that runs the engine (the daemon, the batch) still runs, asked
    before each task's outputs are published: a worker whose daemon is gone publishes nothing
    more and ends (its temp files removed), so no output appears behind a restarted daemon.

    Judged on a pidfd where the kernel has them (no pid reuse can fool it), else on the pid.
    """

    def __init__(self, pid: int, logger: Any) -> None:
        self.pid = pid
        self._log = logger
        self._fd = -1
        with contextlib.suppress(OSError, AttributeError):
            self._fd = os.pidfd_open(pid)

    def gone(self) -> bool:
        if self._fd >= 0:
            ready, _, _ = select.select([self._fd], [], [], 0)
            return bool(ready)
        return not pid_alive(self.pid)

    def check(self) -> None:
        if self.gone():
            self._log.warning("worker.orphaned", daemon_pid=self.pid,
                              why="its daemon is gone; its outputs are not published")
            raise Orphaned


class Orphaned(BaseException):
    """Raised into the committer when the daemon is gone (see ``DaemonWatch``)."""


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when its parent goes (Linux). The parent is the
    engine's process, or the forkserver, which exits when the engine's process dies: either way a
    killed daemon leaves no worker writing outputs behind it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the idle loop still notices a vanished parent
