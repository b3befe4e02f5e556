"""The worker's committer thread (``Committer``): commits the tasks the main thread prepared, in
groups, and sends their results; with its group-commit limits (GROUP_*, COMMIT_DEPTH), its
test-only fault hooks, the wrappers that show in the slot which output is being written, and the
failure result of a task whose commit raised. Whatever goes wrong in it ends the worker (see
``watcher.engine.lifetime.end_worker``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from watcher import log
from watcher.engine.lifetime import Orphaned, end_worker
from watcher.engine.slot import (
    BEAT,
    COMMIT_FROM,
    COMMIT_SEQ,
    COMMIT_STARTED,
    COMMIT_TO,
    COMMITTER_BEAT,
    EXIT_OK,
    IDLE,
    SEQ,
)
from watcher.fs.staging import Staged
from watcher.imaging import memory
from watcher.imaging.pipeline import Prepared
from watcher.imaging.processor import Processor
from watcher.tasks import Result

# Group commit (see Committer): at most GROUP_MAX tasks in one group; a group is due when its
# oldest task has waited GROUP_WAIT seconds or GROUP_BYTES of output wait; COMMIT_DEPTH tasks
# at most wait for the committer (the main thread waits beyond that).
GROUP_MAX = 8
GROUP_WAIT = 0.03
GROUP_BYTES = 32 * 1024 * 1024
COMMIT_DEPTH = 2 * GROUP_MAX

# Test-only fault hooks, read when a worker starts (as the daemon's WATCHER_DEBUG_STALL_FILE):
# the committer thread raises (FAIL), or sleeps for an hour (STALL), when it writes an output
# whose final path contains the variable's value.
COMMIT_FAIL_HOOK = "WATCHER_DEBUG_COMMIT_FAIL"
COMMIT_STALL_HOOK = "WATCHER_DEBUG_COMMIT_STALL"


class CommitterGoneError(RuntimeError):
    """The committer thread is no longer running: nothing would commit what waits for it."""


class _GroupFailedError(RuntimeError):
    """A commit group raised; its known failures are reported: the worker must end."""


@dataclass
class _Item:
    """A prepared task waiting for the committer."""

    prep: Prepared
    handed: float  # when it was handed over (monotonic)
    size: int  # bytes of output
    position: int  # its place in the order this worker took its tasks (0: the first)


class Committer:
    """The worker's second thread: commits prepared tasks (writes, makes durable, publishes) and
    sends their results while the main thread decodes the next ones.

    Tasks are committed in groups: the outputs of every task waiting are written, made durable
    together (one ``syncfs`` for the lot, see ``files.sync_files``) and published, and their
    results go back in one message. A group is committed once GROUP_MAX tasks or GROUP_BYTES of
    output wait, once its oldest task has waited GROUP_WAIT, or at once when the main thread has
    nothing else to do (so a file alone, at idle, is not held back) or is stopping.

    At most COMMIT_DEPTH tasks wait to be committed. A task leaves the slot's SEQ when it is
    handed over, and its result is sent only once its outputs are published: a worker that dies
    meanwhile leaves the supervisor tasks it took, that are not the one in SEQ and have no result;
    those are run again (they did not cause the death; their temp files are removed). Only this
    thread sends on the result pipe. While a group is committed the slot shows since when
    (COMMIT_STARTED), which tasks (COMMIT_FROM, COMMIT_TO) and which of them is being written
    (COMMIT_SEQ), so that the supervisor can time the commit.

    Whatever goes wrong in this thread ends the worker (``on_fatal``, by default ``end_worker``):
    a group whose commit raises gets a failure result sent for each task whose output raised
    (``write-failed``, ``path-too-long`` or ``internal-error`` with the traceback), and the
    others of the group are left to the supervisor to run again on a fresh worker.
    """

    def __init__(self, processor: Processor, results: Connection, slot: Any, lock: Any, *,
                 logger: Any = None, on_fatal: Callable[[str], None] | None = None) -> None:
        self._processor = processor
        self._results = results
        self._slot = slot
        self._lock = lock
        self._log = logger if logger is not None else log.get()
        self._on_fatal = on_fatal or (lambda why: end_worker(slot, lock, self._log, why))
        self._fail_hook = os.environ.get(COMMIT_FAIL_HOOK, "")
        self._stall_hook = os.environ.get(COMMIT_STALL_HOOK, "")
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()
        self._handed = 0  # tasks handed over so far (the next one's position)
        self._bytes = 0
        self._closing = False
        self._now = False  # commit what waits without waiting for more
        self.broken = False  # the supervisor is gone
        with lock:
            slot[COMMIT_STARTED] = slot[COMMIT_SEQ] = IDLE
            slot[COMMITTER_BEAT] = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="committer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def hand_over(self, prep: Prepared) -> None:
        """Pass ``prep`` on; wait first while COMMIT_DEPTH tasks (or twice GROUP_BYTES of
        output) are waiting to be committed. Raises CommitterGoneError if the thread has stopped."""
        size = sum(st.size for st in prep.staged)
        with self._cond:
            while len(self._items) >= COMMIT_DEPTH or (
                    self._items and self._bytes + size > 2 * GROUP_BYTES):
                if not self._thread.is_alive():
                    raise CommitterGoneError("the committer thread stopped with tasks waiting")
                self._cond.wait(1.0)
            with self._lock:
                self._slot[SEQ] = IDLE
            self._items.append(_Item(prep, time.monotonic(), size, self._handed))
            self._handed += 1
            self._bytes += size
            self._cond.notify_all()

    def flush(self) -> None:
        """The main thread has nothing to do next: commit what waits now."""
        with self._cond:
            if self._items and not self._now:
                self._now = True
                self._cond.notify_all()

    def drain(self) -> None:
        """Commit what waits now and return once nothing waits (at once if the thread has
        stopped: the main thread then notices it)."""
        with self._cond:
            self._now = bool(self._items)
            self._cond.notify_all()
            while self._items and self._thread.is_alive():
                self._cond.wait(1.0)

    def close(self) -> None:
        """Commit what is pending, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _next_group(self) -> list[_Item] | None:
        """Wait until a group is due; the tasks in it (they stay counted until committed), or
        None when closing with nothing left."""
        with self._cond:
            while True:
                self._slot[COMMITTER_BEAT] = time.monotonic()  # one double: no lock needed
                if not self._items:
                    if self._closing:
                        return None
                    self._cond.wait(BEAT)
                    continue
                due = self._items[0].handed + GROUP_WAIT - time.monotonic()
                if (self._closing or self._now or due <= 0 or len(self._items) >= GROUP_MAX
                        or self._bytes >= GROUP_BYTES):
                    self._now = self._now and len(self._items) > GROUP_MAX  # the rest next
                    return list(self._items)[:GROUP_MAX]
                self._cond.wait(min(due, BEAT))

    def _run(self) -> None:
        """The thread's body: any exception that escapes the loop ends the worker."""
        try:
            self._loop()
        except _GroupFailedError as exc:
            self._on_fatal(f"{exc}")
        except Orphaned:
            os._exit(EXIT_OK)  # the daemon is gone: nobody waits for this worker's results
        except BaseException as exc:  # noqa: BLE001 - nothing may end this thread silently
            self._log.error("worker.committer_failed", error=f"{type(exc).__name__}: {exc}",
                            traceback="".join(traceback.format_exception(exc)))
            self._on_fatal(f"the committer thread failed: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            if not self.broken:
                self._commit(group)
            else:
                for item in group:
                    _discard(item.prep)
            with self._cond:
                for _ in group:
                    self._bytes -= self._items.popleft().size
                self._cond.notify_all()

    def _commit(self, group: list[_Item]) -> None:
        """Commit one group and send its results; a commit that raises ends the worker."""
        self._mark(time.monotonic(), group[0].position, group[-1].position + 1)
        tracked = [_track(item.prep, self) for item in group]
        try:
            results = self._processor.commit_many([prep for prep, _ in tracked])
        except Exception as exc:  # noqa: BLE001 - reported, then the worker ends
            self._group_failed(tracked, exc)  # raises
        started = self._slot[COMMIT_STARTED]
        self._mark(IDLE, IDLE, IDLE)  # before the send: a result sent is never timed out
        rss = memory.peak() // 1024
        try:
            self._send([replace(r, peak_rss_kb=rss) for r in results])
        except Exception:
            # not sent (the pipe is fine: a result that cannot be sent): the group is shown
            # again, so that the supervisor counts the death against its tasks
            self._mark(started, group[0].position, group[-1].position + 1)
            raise

    def _group_failed(self, tracked: list[tuple[Prepared, list[_Tracked]]],
                      exc: Exception) -> NoReturn:
        """Send a failure for each task of the group known to have failed, then end the worker:
        the others' state (written, published or not) is not known here; a fresh worker runs
        them again (publishing is idempotent)."""
        failures: list[Result] = []
        known = False  # a task of the group is known to have caused it
        for prep, outs in tracked:
            error = next((o.error for o in outs if o.error is not None), None)
            if error is None and len(tracked) == 1:
                error = exc
            if prep.failure is not None:
                failures.append(prep.failure)
            elif error is not None:
                failures.append(_commit_failure(prep, error))
                _discard(prep)
                known = True
        self._log.error("worker.commit_failed", error=f"{type(exc).__name__}: {exc}",
                        failed_inputs=[r.path for r in failures if not r.ok],
                        traceback="".join(traceback.format_exception(exc)))
        if known:  # the supervisor then runs the others again without counting this death
            self._mark(IDLE, IDLE, IDLE)
        if failures:
            self._send(failures)
        raise _GroupFailedError(f"committing a group of {len(tracked)} task(s) raised "
                                f"{type(exc).__name__}: {exc}") from exc

    def _send(self, results: list[Result]) -> None:
        try:
            self._results.send(results)
        except (BrokenPipeError, OSError):
            self.broken = True  # the supervisor is gone: discard what is left

    def _mark(self, started: float, first: float, end: float) -> None:
        """Show the commit group in progress in the slot (IDLE, IDLE, IDLE: none)."""
        with self._lock:
            self._slot[COMMIT_SEQ] = IDLE
            self._slot[COMMIT_FROM] = first
            self._slot[COMMIT_TO] = end
            self._slot[COMMIT_STARTED] = started

    def writing(self, seq: float) -> None:
        """Show in the slot which task's output is being written (IDLE: a shared step)."""
        with self._lock:
            self._slot[COMMIT_SEQ] = seq

    def fault_hooks(self, final: str) -> None:
        """The test-only hooks (COMMIT_FAIL_HOOK, COMMIT_STALL_HOOK) for an output's path."""
        if self._fail_hook and self._fail_hook in final:
            raise RuntimeError(f"{COMMIT_FAIL_HOOK}: a fault injected committing {final}")
        if self._stall_hook and self._stall_hook in final:
            self._log.warning("worker.stalling", hook=COMMIT_STALL_HOOK, path=final)
            time.sleep(3600)


class _Tracked:
    """One staged output as the committer hands it to ``commit_many``: shows in the slot that
    its task is being written while one of its steps runs, and keeps the first error a step
    raised (which task of a group failed)."""

    def __init__(self, staged: Staged, seq: int, owner: Committer) -> None:
        self._staged = staged
        self._seq = float(seq)
        self._owner = owner
        self.error: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._staged, name)

    def write_temp(self) -> int:
        return self._step(lambda: self._hooked(self._staged.write_temp))

    def publish(self, *, overwrite: bool) -> int:
        return self._step(lambda: self._staged.publish(overwrite=overwrite))

    def discard(self) -> None:
        self._step(self._staged.discard)

    def _hooked(self, fn: Callable[[], int]) -> int:
        self._owner.fault_hooks(self._staged.final)
        return fn()

    def _step(self, fn: Callable[[], Any]) -> Any:
        self._owner.writing(self._seq)
        try:
            return fn()
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        finally:
            self._owner.writing(IDLE)


def _track(prep: Prepared, owner: Committer) -> tuple[Prepared, list[_Tracked]]:
    """``prep`` with its staged outputs wrapped (see _Tracked), and the wrappers."""
    outs = [_Tracked(st, prep.task.seq, owner) for st in prep.staged]
    return replace(prep, staged=tuple(outs)), outs  # type: ignore[arg-type]


def _discard(prep: Prepared) -> None:
    """Drop a task's staged outputs and their temp files; errors here change nothing."""
    for st in prep.staged:
        with contextlib.suppress(Exception):
            st.discard()


def _commit_failure(prep: Prepared, exc: BaseException) -> Result:
    """The failure result of a task whose commit raised ``exc``."""
    task = prep.task
    notes = list(prep.notes)
    if isinstance(exc, OSError):
        name_too_long = exc.errno == errno.ENAMETOOLONG
        reason = "path-too-long" if name_too_long else "write-failed"
        error = f"writing its outputs failed: {exc}"
    else:
        reason = "internal-error"
        error = f"committing its outputs raised {type(exc).__name__}: {exc}"
        tb = traceback.format_exception(exc)
        notes.append("".join(tb[:1] + tb[1:][-6:]).strip())  # the header, the last frames
    return Result(seq=task.seq, path=task.path, ok=False, reason=reason, error=error,
                  error_type=type(exc).__name__, duration=prep.spent, worker=os.getpid(),
                  attempt=task.attempt, bytes_in=prep.bytes_in, bytes_out=0, warnings=tuple(notes))
