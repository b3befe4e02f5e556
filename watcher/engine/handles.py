"""One worker process as its supervisor sees it (``Handle``, started by ``launch``), and the
judgements made from what its shared slot shows: whether it is past the timeout, wedged, or has
lost its committer thread (``verdict``, ``overdue``, ``committer_gone``, ``problems``), whether
its death may be a given task's doing (``suspect``), and how it ended (``how``)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from watcher.engine import runlock
from watcher.engine.executor import EngineError, WorkerState
from watcher.engine.mainscript import main_hidden
from watcher.engine.slot import (
    COMMIT_FROM,
    COMMIT_SEQ,
    COMMIT_STARTED,
    COMMIT_TO,
    COMMITTER_BEAT,
    EXIT_COMMIT_FAILED,
    IDLE,
    SEQ,
    SLOT_SIZE,
    STARTED,
    TAKEN,
)
from watcher.engine.worker import worker_main
from watcher.fs.files import remove_temps
from watcher.tasks import Task

WEDGE_MARGIN = 10.0  # seconds past the timeout a worker may hold tasks without any progress
COMMITTER_STALE = 5.0  # seconds without a beat from an idle committer thread: it is gone
LOCK_WAIT = 1.0  # seconds to wait for a worker's slot lock (a worker killed holding it)
SPAWN_TRIES = 8  # tries to start a worker while a killed forkserver is being replaced


@dataclass
class Handle:
    """One worker as the supervisor sees it."""

    index: int
    proc: Any
    conn: Connection
    shared: Any
    lock: Any
    tasks_conn: Connection  # the supervisor's end of the worker's task pipe
    # Why the supervisor killed it ("timeout": what it was charged for is settled; "wedged",
    # "committer-gone": nothing was charged), "" if it did not.
    killed: str = ""
    # (output, root) of the outputs whose temp files it may leave
    cleanup: list[tuple[str, str]] = field(default_factory=list)
    tasks: int = 0  # results received from it
    # Tasks sent to it and not yet settled, with their position in the order it got them.
    held: dict[int, int] = field(default_factory=dict)
    sent: int = 0  # tasks ever sent to it
    progress: float = field(default_factory=time.monotonic)  # when it last changed (see moved)
    mark: tuple[float, ...] = ()  # what its slot showed then

    @property
    def seq(self) -> int:
        return int(self.shared[SEQ])

    @property
    def taken(self) -> int:
        return int(self.shared[TAKEN])

    def close(self, logger: Any) -> None:
        """Let go of a worker that has ended or been killed: its pipes, the temp files it may
        have left (``cleanup``), its process object."""
        with contextlib.suppress(OSError):
            self.conn.close()
        with contextlib.suppress(OSError):
            self.tasks_conn.close()
        if self.cleanup:
            self.proc.join(5)  # a killed process may still be exiting
            removed = remove_worker_temps(self.cleanup, self.proc.pid)
            if removed:
                logger.info("worker.temp_removed", worker_pid=self.proc.pid,
                            paths=removed)
        with contextlib.suppress(ValueError):
            self.proc.close()


def launch(ctx: Any, index: int, cfg: bytes, log_setup: tuple[str, str],
           fork_ends: Sequence[Connection] | None, logger: Any) -> Handle:
    """Start worker ``index`` in a process of context ``ctx`` with its own slot, lock and two
    pipes. ``fork_ends``: under "fork", the supervisor's ends of the other workers' pipes, which
    the forked worker closes first with its own copies of this side's (held open, a task
    pipe's writing end would hide its closing from the worker that reads it)."""
    shared = ctx.RawArray("d", SLOT_SIZE)
    shared[SEQ] = shared[COMMIT_STARTED] = shared[COMMIT_SEQ] = IDLE
    lock = _new_lock(ctx, logger)
    recv, send = ctx.Pipe(duplex=False)
    task_recv, task_send = ctx.Pipe(duplex=False)
    inherited: tuple[int, ...] = ()
    if fork_ends is not None:
        inherited = (*(c.fileno() for c in fork_ends if not c.closed), recv.fileno(),
                     task_send.fileno())
    proc = ctx.Process(target=worker_main, name=f"watcher-worker-{index}",
                       args=(index, task_recv, send, shared, lock, cfg, inherited, log_setup,
                             runlock.held()),
                       daemon=True)
    for attempt in range(1, SPAWN_TRIES + 1):
        try:
            with main_hidden():  # a main it cannot import (python -) is not run by the worker
                proc.start()
            break
        except (EOFError, OSError) as exc:
            # The forkserver was killed (its workers die with it) and is not gone yet: it
            # refused or dropped the request; multiprocessing starts a new one once it is.
            if attempt == SPAWN_TRIES:
                for c in (recv, send, task_recv, task_send):
                    c.close()
                raise EngineError(f"cannot start a worker process: {exc!r}") from exc
            logger.warning("engine.forkserver_gone", error=repr(exc), attempt=attempt)
            time.sleep(0.05 * attempt)
    send.close()  # the worker holds the only writing end: EOF means it is gone
    task_recv.close()
    return Handle(index, proc, recv, shared, lock, task_send)


def _new_lock(ctx: Any, logger: Any) -> Any:
    """A slot lock. Outside ``fork`` it is registered with multiprocessing's resource tracker;
    a tracker that died (killed) between its liveness probe and the registration makes that
    fail once with a broken pipe, and the next try starts a new tracker."""
    try:
        return ctx.Lock()
    except OSError:
        logger.warning("engine.resource_tracker_gone", why="it is started again")
        return ctx.Lock()


@contextlib.contextmanager
def locked(h: Handle) -> Iterator[None]:
    """Hold a worker's slot lock, waiting at most LOCK_WAIT: a worker killed (from outside)
    while it held the lock never releases it, and its slot is not changing any more."""
    got = h.lock.acquire(timeout=LOCK_WAIT)
    try:
        yield
    finally:
        if got:
            h.lock.release()


def moved(h: Handle, now: float) -> None:
    """Note when this worker last changed (took a task, started or finished a commit step,
    sent a result), or held nothing."""
    sh = h.shared
    mark = (sh[TAKEN], sh[SEQ], sh[COMMIT_STARTED], sh[COMMIT_SEQ], float(h.tasks))
    if mark != h.mark or not h.held:
        h.mark, h.progress = mark, now


def overdue(h: Handle, now: float, limit: float) -> list[tuple[int, str]]:
    """The tasks of this worker past the timeout, with the error to charge each: the one it
    prepares, and in the group being committed the one being written (else all of them: a step
    they share, such as syncing, is stuck)."""
    sh = h.shared
    out: list[tuple[int, str]] = []
    seq = int(sh[SEQ])
    if seq >= 0 and now - sh[STARTED] > limit:
        out.append((seq, f"still running after {limit:g} s; worker killed"))
    started = sh[COMMIT_STARTED]
    if started >= 0 and now - started > limit:
        writing = int(sh[COMMIT_SEQ])
        if writing >= 0:
            out.append((writing, f"writing its outputs took longer than {limit:g} s; "
                                 "worker killed"))
        else:
            lo, hi = sh[COMMIT_FROM], sh[COMMIT_TO]
            out += [(s, f"its commit group (syncing its outputs together) took longer than "
                        f"{limit:g} s; worker killed")
                    for s, n in h.held.items() if lo <= n < hi]
    return out


def committer_gone(h: Handle, now: float) -> bool:
    """A live worker whose committer thread has not beaten lately, neither committing nor beside
    a main thread that prepares a task (which may hold the interpreter a while: the timeout
    governs that)."""
    sh = h.shared
    beat = sh[COMMITTER_BEAT]
    return beat > 0 and sh[COMMIT_STARTED] < 0 and sh[SEQ] < 0 and now - beat > COMMITTER_STALE


def verdict(h: Handle, now: float, limit: float) -> tuple[str, list[tuple[int, str]]]:
    """Whether to kill this worker: ("timeout", the tasks to charge and why), ("wedged", []) or
    ("committer-gone", []); ("", []) to leave it."""
    late = overdue(h, now, limit)
    if late:
        return "timeout", late
    if h.held and now - h.progress > limit + WEDGE_MARGIN:
        return "wedged", []
    if h.held and committer_gone(h, now):
        return "committer-gone", []
    return "", []


def problems(h: Handle, tasks: Mapping[int, Task], now: float, limit: float) -> list[str]:
    """What is wrong with this worker at this moment, one line each ([]: nothing): a task or
    commit past the timeout and not killed yet (the next tick kills it), no progress while it
    holds tasks for longer than the timeout (wedged), a committer thread that has stopped, or
    killed and not yet gone."""
    pid = h.proc.pid
    if h.killed:
        return [f"worker {pid} was killed ({h.killed}) and has not exited yet"]
    moved(h, now)
    out = []
    for seq, _ in overdue(h, now, limit):
        task = tasks.get(seq)
        out.append(f"worker {pid} is past the {limit:g} s timeout on "
                   f"{task.path if task else seq}")
    if h.held and now - h.progress > limit:
        out.append(f"worker {pid} holds {len(h.held)} task(s) and has made no progress for "
                   f"{now - h.progress:.0f} s (timeout {limit:g} s)")
    if committer_gone(h, now):
        out.append(f"worker {pid}'s committer thread has not run for "
                   f"{now - h.shared[COMMITTER_BEAT]:.0f} s")
    return out


def state(h: Handle, tasks: Mapping[int, Task], now: float) -> WorkerState:
    """What this worker is doing now, from its slot: the task it prepares (since it took it)
    or, when it prepares none, the one it commits (since the commit started)."""
    sh = h.shared
    seq, phase, since = int(sh[SEQ]), "processing", sh[STARTED]
    if seq < 0 and sh[COMMIT_STARTED] >= 0:
        seq, phase, since = int(sh[COMMIT_SEQ]), "committing", sh[COMMIT_STARTED]
    task = tasks.get(seq) if seq >= 0 else None
    alive = h.proc.is_alive() and not h.killed
    if task is None:
        return WorkerState(worker=str(h.proc.pid), pid=h.proc.pid or 0, alive=alive,
                           tasks=h.tasks)
    return WorkerState(worker=str(h.proc.pid), pid=h.proc.pid or 0, alive=alive, seq=seq,
                       path=task.path, phase=phase, elapsed_s=max(0.0, now - since),
                       tasks=h.tasks)


def suspect(h: Handle, seq: int, position: int, charged: bool) -> bool:
    """Whether the death of ``h``'s worker may be the doing of ``seq``, a task it had taken and
    not finished: its output was being written then; or, none being written and no task charged
    for the death, ``seq`` was in the group being committed (or none was)."""
    sh = h.shared
    writing = int(sh[COMMIT_SEQ])
    if writing >= 0:
        return writing == seq
    if charged:
        return False
    return sh[COMMIT_STARTED] < 0 or sh[COMMIT_FROM] <= position < sh[COMMIT_TO]


def remove_worker_temps(outputs: list[tuple[str, str]], pid: int) -> list[str]:
    """Remove the temp files worker ``pid`` may have left for these (output, root) pairs."""
    return [t for path, root in outputs for t in remove_temps([path], pid, root)]


def how(code: int | None, killed: str = "") -> str:
    """How a worker ended, for an error message."""
    if killed:
        return f"killed: {killed}"
    if code and code < 0:
        return f"signal {-code} ({signal.Signals(-code).name})"
    if code == EXIT_COMMIT_FAILED:
        return "a worker thread failed"
    return f"exit code {code}"
