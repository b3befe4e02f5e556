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

The committer thread is ``watcher.engine.committer``; the slot's layout and the exit codes are
``watcher.engine.slot``; the ties to its parent and the ending after a failure,
``watcher.engine.lifetime``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from watcher import log
from watcher.engine.capture import Capture
from watcher.engine.committer import Committer, CommitterGoneError
from watcher.engine.lifetime import DaemonWatch, die_with_parent, end_worker, let_forkserver_go
from watcher.engine.slot import (
    EXIT_INIT_FAILED,
    EXIT_MAIN_FAILED,
    EXIT_OK,
    EXIT_TERMINATED,
    HALT,
    SEQ,
    STARTED,
    TAKEN,
)
from watcher.fs.files import pid_alive
from watcher.imaging import memory
from watcher.imaging.pipeline import Pipeline, Prepared
from watcher.imaging.processor import Processor
from watcher.settings.schema import DecodeLimits
from watcher.tasks import Result, Task


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
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(EXIT_OK)
    let_forkserver_go()
    logger = log.get().bind(worker_pid=os.getpid(), slot=index)
    capture = _capture(logger, log_setup)
    try:
        cfg: WorkerConfig = pickle.loads(cfg_bytes)  # noqa: S301 - our own parent's bytes
        worker = Worker(cfg)
    except Exception as exc:  # noqa: BLE001 - report and exit with the documented code
        logger.error("worker.start_failed", error=f"{type(exc).__name__}: {exc}")  # noqa: TRY400
        _end(capture, EXIT_INIT_FAILED)
    if cfg.memory_cap and not memory.set_ceiling(cfg.memory_cap):
        logger.warning("worker.no_memory_ceiling", max_worker_memory=cfg.memory_cap,
                       why="the system refused RLIMIT_DATA; the estimate alone applies")
    logger.debug("worker.started")
    committer = Committer(worker.processor, results, slot, lock, logger=logger)
    if cfg.memory_cap:
        worker.processor.make_room = lambda need: _make_room(committer, cfg.memory_cap, need)
    worker.processor.before_publish = DaemonWatch(cfg.parent_pid or parent, logger).check
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
