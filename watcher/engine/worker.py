"""The worker: a plain loop over the tasks its supervisor sends, run in a long-lived process.

``Worker`` can be driven in a test without a process (``process_one``); ``worker_main`` is the
module-level process target. Tasks arrive on the worker's own pipe, a few per message; it takes
them in order, records in its shared slot which one it holds and how many it has taken (so the
supervisor can charge a crash or a timeout to the right file and give the others back), and
sends each result back on its own pipe. It ignores SIGINT and SIGHUP (the terminal sends them to
the whole process group; the supervisor decides), finishes its current task on SIGTERM (and exits
with EXIT_TERMINATED), and exits when its parent is gone.

Its descriptors 1 and 2 are read back by a thread (``capture``): what native libraries
write there (libtiff's messages) becomes a ``codec.message`` event naming the input being
processed, and is added to that input's result as a warning; the worker's own log lines go to
the original stderr.

Nothing that goes wrong in one of its two threads may wedge it: an exception in the committer
thread fails the task it was committing (when it can tell which) and ends the process with
EXIT_COMMIT_FAILED, so that the supervisor settles every other task it held; the main thread
notices a committer that is gone instead of waiting for it. The slot also shows which commit
group is being committed since when, so that the supervisor's timeout covers commits too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from watcher import log
from watcher.engine.capture import Capture
from watcher.fs.files import pid_alive
from watcher.fs.staging import Staged
from watcher.imaging import memory
from watcher.imaging.pipeline import Pipeline, Prepared
from watcher.imaging.processor import Processor
from watcher.settings.schema import DecodeLimits
from watcher.tasks import Result, Task

# Slot layout (a shared array of doubles, one per worker). SEQ: the task being decoded and
# encoded, since STARTED. TAKEN: how many of the tasks sent to this worker it has started (it
# takes them in the order it got them); a taken task that is not in SEQ and has no result is
# waiting for the committer thread (at most COMMIT_DEPTH of them). HALT: set by the supervisor
# when it stops handing out work (or by the worker itself when it is about to end after a
# failure); the worker finishes its current task and takes no other.
# COMMIT_STARTED: when the committer thread started committing its current group (IDLE: none);
# COMMIT_FROM, COMMIT_TO: that group, as positions in the order the tasks were taken (the first
# taken is 0; TO is one past the last); COMMIT_SEQ: the task whose outputs it is writing or
# publishing at this moment (IDLE in a step the group shares: syncing, a folder's fsync).
# COMMITTER_BEAT: when the committer thread last showed it runs (at least every BEAT seconds
# while it waits for work; 0: not started yet).
SEQ, STARTED, TAKEN, HALT = 0, 1, 2, 3
COMMIT_STARTED, COMMIT_FROM, COMMIT_TO, COMMIT_SEQ, COMMITTER_BEAT = 4, 5, 6, 7, 8
SLOT_SIZE = 9
BEAT = 1.0
IDLE = -1.0
# Group commit (see Committer): at most GROUP_MAX tasks in one group; a group is due when its
# oldest task has waited GROUP_WAIT seconds or GROUP_BYTES of output wait; COMMIT_DEPTH tasks
# at most wait for the committer (the main thread waits beyond that).
GROUP_MAX = 8
GROUP_WAIT = 0.03
GROUP_BYTES = 32 * 1024 * 1024
COMMIT_DEPTH = 2 * GROUP_MAX

EXIT_OK = 0
EXIT_INIT_FAILED = 3  # the worker could not even start: the supervisor stops, not respawns
EXIT_COMMIT_FAILED = 4  # a thread of the worker failed: it ended itself (respawned)
EXIT_TERMINATED = 5  # it stopped on SIGTERM, after finishing its task (respawned a tick later)
EXIT_MAIN_FAILED = 1  # its main thread raised (a bug, a transform that calls sys.exit)

# Test-only fault hooks, read when a worker starts (as the daemon's WATCHER_DEBUG_STALL_FILE):
# the committer thread raises (FAIL), or sleeps for an hour (STALL), when it writes an output
# whose final path contains the variable's value.
COMMIT_FAIL_HOOK = "WATCHER_DEBUG_COMMIT_FAIL"
COMMIT_STALL_HOOK = "WATCHER_DEBUG_COMMIT_STALL"
LOCK_WAIT = 2.0  # seconds to wait for the slot's lock when ending after a failure


@dataclass(frozen=True)
class WorkerConfig:
    pipelines: Mapping[str, Pipeline]
    limits: DecodeLimits
    max_tasks: int = 0
    log_format: str = "json"
    log_level: str = "warning"
    parent_pid: int = 0
    memory_cap: int = 0  # bytes (max_worker_memory, resolved); 0: no governor


class Worker:
    """Holds the pipelines; turns one task into one result."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.processor = Processor(cfg.pipelines, cfg.limits, cfg.memory_cap)
        self.done = 0

    def process_one(self, task: Task) -> Result:
        self.done += 1
        return self.processor.run(task)

    def prepare(self, task: Task) -> Prepared:
        self.done += 1
        return self.processor.prepare(task)

    @property
    def spent(self) -> bool:
        return bool(self.cfg.max_tasks) and self.done >= self.cfg.max_tasks

    def worn(self) -> str | None:
        """Why this worker should end after its task for its memory's sake (see
        ``memory``), or None: a task ran out of memory (what is left of the heap is not
        to be trusted), or the resident size stayed above half the cap."""
        if self.processor.exhausted:
            return "a task ran out of memory"
        cap = self.cfg.memory_cap
        if cap:
            now = memory.rss()
            if now > cap // 2:
                memory.trim()
                now = memory.rss()
                if now > cap // 2:
                    return f"resident size {memory.mib(now)} is above half the cap"
        return None


_terminate = False


def _on_term(signum: int, frame: Any) -> None:
    global _terminate
    _terminate = True


class CommitterGoneError(RuntimeError):
    """The committer thread is no longer running: nothing would commit what waits for it."""


class _GroupFailedError(RuntimeError):
    """A commit group raised; its known failures are reported: the worker must end."""


def worker_main(index: int, tasks: Connection, results: Connection, slot: Any, lock: Any,
                cfg_bytes: bytes, inherited: tuple[int, ...] = (),
                log_setup: tuple[str, str] = ("json", "warning"),
                keep: tuple[Any, ...] = ()) -> None:
    """Process target: take tasks until the task pipe closes, a halt, SIGTERM, recycling or
    parent death.

    ``cfg_bytes`` is the pickled WorkerConfig: unpickled here, so a pipeline whose transforms
    cannot be imported in a worker exits with EXIT_INIT_FAILED instead of a bootstrap crash.
    ``inherited``: descriptors a forked worker inherited from the engine (the engine's ends of
    its own and other workers' pipes), closed first. ``log_setup``: (format, level) of its log
    lines, known before the configuration unpickles. ``keep``: descriptors it holds open until
    it ends, never used (the daemon's run lock, see ``watcher.engine.runlock``). A committer thread
    that fails ends the process with EXIT_COMMIT_FAILED (see Committer); a main thread that
    raises, with EXIT_MAIN_FAILED (or the code a SystemExit carries), after logging the
    traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's (a reload), group-wide too
    signal.signal(signal.SIGTERM, _on_term)
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(EXIT_OK)
    _let_forkserver_go()
    logger = log.get().bind(worker=os.getpid(), slot=index)
    capture = _capture(logger, log_setup)
    try:
        cfg: WorkerConfig = pickle.loads(cfg_bytes)  # noqa: S301 - our own parent's bytes
        worker = Worker(cfg)
    except Exception as exc:  # noqa: BLE001 - report and exit with the documented code
        logger.error("worker.start_failed", error=f"{type(exc).__name__}: {exc}")  # noqa: TRY400
        _end(capture, EXIT_INIT_FAILED)
    if cfg.memory_cap and not memory.set_ceiling(cfg.memory_cap):
        logger.warning("worker.no_memory_ceiling", cap=cfg.memory_cap,
                       why="the system refused RLIMIT_DATA; the estimate alone applies")
    logger.debug("worker.started")
    committer = Committer(worker.processor, results, slot, lock, logger=logger)
    if cfg.memory_cap:
        worker.processor.make_room = lambda need: _make_room(committer, cfg.memory_cap, need)
    worker.processor.before_publish = _DaemonWatch(cfg.parent_pid or parent, logger).check
    try:
        _serve(worker, committer, tasks, slot, lock, parent, logger, capture)
        committer.close()
    except CommitterGoneError as exc:
        end_worker(slot, lock, logger, f"{exc}")
    except BaseException as exc:  # noqa: BLE001 - logged, then the process ends with a code
        # The main thread failed outside a task's own error handling (a transform that calls
        # sys.exit, a bug here): the process ends; the supervisor charges the task in SEQ as a
        # crash and gives back the others. The traceback is logged here, as one line, not
        # printed by multiprocessing as plain text.
        logger.error("worker.main_failed", error=f"{type(exc).__name__}: {exc}",  # noqa: TRY400
                     traceback="".join(traceback.format_exception(exc)))
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else \
            EXIT_MAIN_FAILED
        _end(capture, code)
    logger.debug("worker.stopped", tasks=worker.done, terminated=_terminate or None)
    with contextlib.suppress(OSError):
        results.close()
    _end(capture, EXIT_TERMINATED if _terminate else EXIT_OK)


def _capture(logger: Any, log_setup: tuple[str, str]) -> Capture | None:
    """Read this worker's descriptors 1 and 2 back (see ``watcher.engine.capture``) and log to the
    original stderr; None (logging to stderr as it is) where they cannot be redirected."""
    fmt, level = log_setup

    def on_line(stream: str, line: str, task: Task | None) -> None:
        fields: dict[str, Any] = {"stream": stream, "message": line}
        if task is not None:
            fields.update(input=task.path, seq=task.seq)
        logger.warning("codec.message", **fields)

    try:
        capture = Capture(on_line)
    except OSError:
        log.configure("worker", fmt, level)
        return None
    log.configure("worker", fmt, level, stream=sys.stderr, fd=capture.original[2])
    return capture


def _end(capture: Capture | None, code: int) -> NoReturn:
    """End the worker process with ``code``, after handing on what it wrote to stdout/stderr."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if capture is not None:
        capture.close()
    raise SystemExit(code)


def _serve(worker: Worker, committer: Committer, tasks: Connection, slot: Any, lock: Any,
           parent: int, logger: Any, capture: Capture | None = None) -> None:
    """The main thread's loop: take the tasks sent, prepare each and hand it to the committer.
    Raises CommitterGoneError when the committer thread has stopped."""
    cfg = worker.cfg
    held: deque[Task] = deque()  # sent to this worker, not yet taken
    while not _terminate and not committer.broken:
        if not committer.alive:
            raise CommitterGoneError("the committer thread is not running")
        if not held:
            try:
                if not tasks.poll(0):
                    committer.flush()  # nothing to decode next: commit what waits now
                if not tasks.poll(0.5):
                    if os.getppid() != parent or (cfg.parent_pid
                                                  and not pid_alive(cfg.parent_pid)):
                        logger.warning("worker.orphaned")
                        return
                    continue
                message = tasks.recv()
            except (EOFError, OSError):
                return  # the supervisor closed our task pipe: stop
            held.extend(message)
            continue
        item = held[0]
        with lock:
            if slot[HALT] > 0:
                return
            held.popleft()
            slot[TAKEN] += 1
            slot[SEQ] = float(item.seq)
            slot[STARTED] = time.monotonic()
        if capture is None:
            committer.hand_over(worker.prepare(item))
        else:
            with capture.attribute(item) as lines:
                prep = worker.prepare(item)
            committer.hand_over(_with_messages(prep, lines))
        if worker.spent:
            logger.debug("worker.recycling", tasks=worker.done)
            return
        worn = worker.worn()
        if worn is not None:
            logger.info("worker.recycling", tasks=worker.done, why=worn)
            return


def _make_room(committer: Committer, cap: int, need: int) -> None:
    """Before a task that needs ``need`` bytes: when that does not fit beside what this worker
    holds now, wait until the outputs waiting for the committer are written and give freed
    memory back, so that the task has a fresh worker's room (it is charged for its own need,
    not for what other tasks left)."""
    if memory.rss() + need <= cap:
        return
    committer.drain()
    memory.trim()


def _with_messages(prep: Prepared, lines: list[str]) -> Prepared:
    """``prep`` with what the task wrote to stdout/stderr (a native library's messages) among
    its warnings, so that the input's fate line and sidecar carry them."""
    if not lines:
        return prep
    notes = (*prep.notes, *dict.fromkeys(lines))
    failure = prep.failure
    if failure is not None:
        failure = replace(failure, warnings=(*failure.warnings, *dict.fromkeys(lines)))
    return replace(prep, notes=notes, failure=failure)


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
        except _Orphaned:
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
                        failed=[r.path for r in failures if not r.ok],
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
            self._log.warning("worker.stalling", hook=COMMIT_STALL_HOOK, output=final)
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


def _let_forkserver_go() -> None:
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


class _DaemonWatch:
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
            self._log.warning("worker.orphaned", daemon=self.pid,
                              why="its daemon is gone; its outputs are not published")
            raise _Orphaned


class _Orphaned(BaseException):
    """Raised into the committer when the daemon is gone (see ``_DaemonWatch``)."""


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when its parent goes (Linux). The parent is the
    engine's process, or the forkserver, which exits when the engine's process dies: either way a
    killed daemon leaves no worker writing outputs behind it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the idle loop still notices a vanished parent


