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
# Group commit (see Committer): at most GROUP_MAX tasks in one group; a group is due when its
# oldest task has waited GROUP_WAIT seconds or GROUP_BYTES of output wait; COMMIT_DEPTH tasks
# at most wait for the committer (the main thread waits beyond that).
GROUP_MAX = 8
GROUP_WAIT = 0.03
GROUP_BYTES = 32 * 1024 * 1024
COMMIT_DEPTH = 2 * GROUP_MAX

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
                cfg_bytes: bytes, inherited: tuple[int, ...] = ()) -> None:
    """Process target: take tasks until the task pipe closes, a halt, SIGTERM, recycling or
    parent death.

    ``cfg_bytes`` is the pickled WorkerConfig: unpickled here, so a pipeline whose transforms
    cannot be imported in a worker exits with EXIT_INIT_FAILED instead of a bootstrap crash.
    ``inherited``: descriptors a forked worker inherited from the engine (the engine's ends of
    its own and other workers' pipes), closed first.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
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
                if not tasks.poll(0):
                    committer.flush()  # nothing to decode next: commit what waits now
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
    thread sends on the result pipe.
    """

    def __init__(self, processor: Processor, results: Connection, slot: Any, lock: Any) -> None:
        self._processor = processor
        self._results = results
        self._slot = slot
        self._lock = lock
        self._cond = threading.Condition()
        self._items: deque[tuple[Prepared, float, int]] = deque()  # (task, handed at, bytes)
        self._bytes = 0
        self._closing = False
        self._now = False  # commit what waits without waiting for more
        self.broken = False  # the supervisor is gone
        self._thread = threading.Thread(target=self._loop, name="committer", daemon=True)
        self._thread.start()

    def hand_over(self, prep: Prepared) -> None:
        """Pass ``prep`` on; wait first while COMMIT_DEPTH tasks (or twice GROUP_BYTES of
        output) are waiting to be committed."""
        size = sum(st.size for st in prep.staged)
        with self._cond:
            while len(self._items) >= COMMIT_DEPTH or (
                    self._items and self._bytes + size > 2 * GROUP_BYTES):
                self._cond.wait()
            with self._lock:
                self._slot[SEQ] = IDLE
            self._items.append((prep, time.monotonic(), size))
            self._bytes += size
            self._cond.notify_all()

    def flush(self) -> None:
        """The main thread has nothing to do next: commit what waits now."""
        with self._cond:
            if self._items and not self._now:
                self._now = True
                self._cond.notify_all()

    def close(self) -> None:
        """Commit what is pending, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _next_group(self) -> list[Prepared] | None:
        """Wait until a group is due; the tasks in it (they stay counted until committed), or
        None when closing with nothing left."""
        with self._cond:
            while True:
                if not self._items:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                due = self._items[0][1] + GROUP_WAIT - time.monotonic()
                if (self._closing or self._now or due <= 0 or len(self._items) >= GROUP_MAX
                        or self._bytes >= GROUP_BYTES):
                    self._now = self._now and len(self._items) > GROUP_MAX  # the rest next
                    return [p for p, _, _ in list(self._items)[:GROUP_MAX]]
                self._cond.wait(due)

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            if not self.broken:
                results = self._processor.commit_many(group)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                try:
                    self._results.send([replace(r, peak_rss_kb=rss) for r in results])
                except (BrokenPipeError, OSError):
                    self.broken = True  # the supervisor is gone: discard what is left
            else:
                for prep in group:
                    for st in prep.staged:
                        st.discard()
            with self._cond:
                for _ in group:
                    self._bytes -= self._items.popleft()[2]
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


