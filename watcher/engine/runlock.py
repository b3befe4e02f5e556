"""The run lock: which of this host's temp files in the daemon's folders nobody will finish.

A temp file's name carries the host and pid of the process that writes it
(``.{name}.{host}.{pid}.watcher-tmp``, see ``files.temp_name``). "Its pid is not alive" is not
enough to call it stale: pids are recycled, and a temp file whose number now belongs to an
unrelated process would stay forever (or until that process ends). So the daemon holds an
exclusive ``flock`` on its work folder (the folder that holds every instance's work folder, when
instances are named) for the whole run. When it gets the lock at start, no other daemon of this
host works on these folders, and every temp file of this host in them was left by a run that is
over: it is removed, whatever process has its pid now. Without the lock (another daemon of this
host runs on the same folders, or the file system has no locks), a temp file of this host is
stale when no process has its pid, the one that has it is a zombie, or it started after the temp
file was last written (so it never wrote it).

The daemon's workers hold the lock too: each keeps a duplicate of the locked descriptor
(``held``, passed by the engine), so the lock is free only once every process of a run is gone:
a worker of a killed daemon, which dies a few milliseconds after it (its parent-death signal),
cannot write a temp file behind the cleanup of the next start, which waits that long for the
lock (``WAIT``) before it settles for the pid rule.

``stale`` gives ``lifecycle.remove_stale_temps`` this rule for this host's temp files; those of
other hosts it judges by age. The kernel
drops the lock when the last process holding it ends, whatever way it ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable
from typing import Any

WAIT = 3.0  # seconds to wait for the lock at start: the processes of a run just killed end
_held: dict[int, RunLock] = {}  # the locks this process holds, by descriptor (see ``held``)


class RunLock:
    """An exclusive, non-blocking ``flock`` on a folder, taken at construction if it can be."""

    def __init__(self, folder: str, wait: float = 0.0) -> None:
        self.folder = folder
        self.exclusive = False  # this process holds it: no other daemon of this host runs here
        self.why = ""  # why not, when not
        self._fd = -1
        deadline = time.monotonic() + wait
        try:
            self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
            self.exclusive = True
            _held[self._fd] = self
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                self.why = "another daemon of this host (or a process of its) runs on these " \
                           "folders"
            else:
                self.why = f"the folder cannot be locked: {exc.strerror}"

    def release(self) -> None:
        """Drop this process's hold (the lock is free once its workers are gone too)."""
        _held.pop(self._fd, None)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self.exclusive = False

    def __del__(self) -> None:
        self.release()


def acquire(folders: Any, wait: float = WAIT) -> RunLock:
    """The run lock of a daemon's ``lifecycle.Folders``: on the folder holding every instance's
    work folder (``work_root``), else on its work folder."""
    return RunLock(folders.work_root or folders.work, wait)


class Inherited:
    """A descriptor a worker process keeps open for its whole life: the run lock. Pickled for
    a forkserver or spawned worker, it travels as a duplicate (multiprocessing's ``DupFd``); a
    forked worker has it already."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from multiprocessing import reduction  # noqa: PLC0415

        return _rebuild, (reduction.DupFd(self.fd),)


def _rebuild(dup: Any) -> Inherited:
    return Inherited(dup.detach())


def held() -> tuple[Inherited, ...]:
    """The run locks this process holds, for the engine to hand to each worker it starts."""
    return tuple(Inherited(fd) for fd in _held)


def stale(lock: RunLock) -> Callable[[int, str], bool]:
    """The rule for this host's temp files at start (for ``lifecycle.remove_stale_temps``):
    every one is a dead run's while ``lock`` is held exclusively; else the one whose writer
    cannot be writing it any more (see the module's docstring)."""
    def rule(pid: int, path: str) -> bool:
        return lock.exclusive or not _may_be_writing(pid, path)
    return rule


def _may_be_writing(pid: int, path: str) -> bool:
    """Whether process ``pid`` of this host may still be writing the temp file ``path``: it
    runs, is no zombie, and started before the file was last written."""
    if pid == os.getpid():
        return False  # this daemon has written nothing yet: a namesake of an earlier run
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc here: a live pid is given the benefit of the doubt
    if fields[0] in (b"Z", b"X"):
        return False
    try:
        started = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        written = os.lstat(path).st_mtime
    except (OSError, ValueError, IndexError):
        return True
    return started <= written + 1.0  # a second of slack for clock rounding


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")
