"""The worker: a plain loop over the tasks its supervisor sends, run in a long-lived process.

``Worker`` can be driven in a test without a process (``process_one``); ``worker_main`` is the
module-level process target. Tasks arrive on the worker's own pipe, a few per message; it takes
them in order, records in its shared slot which one it holds and how many it has taken (so the
supervisor can charge a crash or a timeout to the right file and give the others back), and
sends each result back on its own pipe. It ignores SIGINT (the terminal sends Ctrl-C to the
whole process group; the supervisor decides), finishes its current task on SIGTERM, and exits
when its parent is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from . import log
from .codec import DecodeLimits
from .files import pid_alive
from .pipeline import Pipeline, Prepared, Processor
from .tasks import Result, Task

# Slot layout (a shared array of doubles, one per worker). SEQ: the task being decoded and
# encoded, since STARTED. TAKEN: how many of the tasks sent to this worker it has started (it
# takes them in the order it got them); a taken task that is not in SEQ and has no result is
# waiting for the committer thread (at most COMMIT_DEPTH of them). HALT: set by the supervisor
# when it stops handing out work; the worker finishes its current task and takes no other.
SEQ, STARTED, TAKEN, HALT = 0, 1, 2, 3
SLOT_SIZE = 4
IDLE = -1.0
COMMIT_DEPTH = 2

EXIT_OK = 0
EXIT_INIT_FAILED = 3  # the worker could not even start: the supervisor stops, not respawns


@dataclass(frozen=True)
class WorkerConfig:
    pipelines: Mapping[str, Pipeline]
    limits: DecodeLimits
    max_tasks: int = 0
    log_format: str = "json"
    log_level: str = "warning"
    parent_pid: int = 0


class Worker:
    """Holds the pipelines; turns one task into one result."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.processor = Processor(cfg.pipelines, cfg.limits)
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


_terminate = False


def _on_term(signum: int, frame: Any) -> None:
    global _terminate
    _terminate = True


def worker_main(index: int, tasks: Connection, results: Connection, slot: Any, lock: Any,
                cfg_bytes: bytes) -> None:
    """Process target: take tasks until the task pipe closes, a halt, SIGTERM, recycling or
    parent death.

    ``cfg_bytes`` is the pickled WorkerConfig: unpickled here, so a pipeline whose transforms
    cannot be imported in a worker exits with EXIT_INIT_FAILED instead of a bootstrap crash.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(EXIT_OK)
    try:
        cfg: WorkerConfig = pickle.loads(cfg_bytes)  # noqa: S301 - our own parent's bytes
        log.configure("worker", cfg.log_format, cfg.log_level)
        logger = log.get().bind(worker=os.getpid(), slot=index)
        worker = Worker(cfg)
    except Exception as exc:  # noqa: BLE001 - report and exit with the documented code
        print(f"watcher worker failed to start: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(EXIT_INIT_FAILED)
    logger.debug("worker.started")
    committer = Committer(worker.processor, results, slot, lock)
    held: deque[Task] = deque()  # sent to this worker, not yet taken
    while not _terminate and not committer.broken:
        if not held:
            try:
                if not tasks.poll(0.5):
                    if os.getppid() != parent or (cfg.parent_pid
                                                  and not pid_alive(cfg.parent_pid)):
                        logger.warning("worker.orphaned")
                        break
                    continue
                message = tasks.recv()
            except (EOFError, OSError):
                break  # the supervisor closed our task pipe: stop
            held.extend(message)
            continue
        item = held[0]
        with lock:
            if slot[HALT] > 0:
                break
            held.popleft()
            slot[TAKEN] += 1
            slot[SEQ] = float(item.seq)
            slot[STARTED] = time.monotonic()
        committer.hand_over(worker.prepare(item))
        if worker.spent:
            logger.debug("worker.recycling", tasks=worker.done)
            break
    committer.close()
    logger.debug("worker.stopped", tasks=worker.done)
    with contextlib.suppress(OSError):
        results.close()


class Committer:
    """The worker's second thread: commits prepared tasks (writes, fsyncs, publishes) and sends
    their results while the main thread decodes the next ones. The fsync waits on the disk, not
    the CPU.

    At most COMMIT_DEPTH tasks wait to be committed. A task leaves the slot's SEQ when it is
    handed over, and its result is sent only once its outputs are published: a worker that dies
    meanwhile leaves the supervisor tasks it took, that are not the one in SEQ and have no result;
    those are run again (they did not cause the death; their temp files are removed). Only this
    thread sends on the result pipe.
    """

    def __init__(self, processor: Processor, results: Connection, slot: Any, lock: Any) -> None:
        self._processor = processor
        self._results = results
        self._slot = slot
        self._lock = lock
        self._cond = threading.Condition()
        self._items: deque[Prepared] = deque()
        self._closing = False
        self.broken = False  # the supervisor is gone
        self._thread = threading.Thread(target=self._loop, name="committer", daemon=True)
        self._thread.start()

    def hand_over(self, prep: Prepared) -> None:
        """Pass ``prep`` on; wait first while COMMIT_DEPTH tasks are waiting to be committed."""
        with self._cond:
            while len(self._items) >= COMMIT_DEPTH:
                self._cond.wait()
            with self._lock:
                self._slot[SEQ] = IDLE
            self._items.append(prep)
            self._cond.notify_all()

    def close(self) -> None:
        """Commit what is pending, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return
                prep = self._items[0]
            if not self.broken:
                result = self._processor.commit(prep)
                result = replace(result,
                                 peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
                try:
                    self._results.send(result)
                except (BrokenPipeError, OSError):
                    self.broken = True  # the supervisor is gone: discard what is left
                    for st in prep.staged:
                        st.discard()
            else:
                for st in prep.staged:
                    st.discard()
            with self._cond:
                self._items.popleft()
                self._cond.notify_all()


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


