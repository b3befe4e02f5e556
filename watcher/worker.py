"""The worker: a plain loop over a task queue, run in a long-lived process by the engine.

``Worker`` can be driven in a test without a process (``process_one``); ``worker_main`` is the
module-level process target. The worker records which task it holds in its shared slot (so the
supervisor can charge a crash or a timeout to the right file) and sends each result back on its
own pipe. It ignores SIGINT (the terminal sends Ctrl-C to the whole process group; the supervisor
decides), finishes its current task on SIGTERM, and exits when its parent is gone.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from .codec import DecodeLimits
from .files import pid_alive
from .pipeline import Pipeline, Processor
from .tasks import Result, Stop, Task

# Slot layout (a shared array of doubles, one per worker). RETIRE: set by the supervisor when
# the task queue was replaced; the worker exits after its current task instead of taking another.
SEQ, STARTED, RETIRE = 0, 1, 2
SLOT_SIZE = 3
IDLE = -1.0

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

    @property
    def spent(self) -> bool:
        return bool(self.cfg.max_tasks) and self.done >= self.cfg.max_tasks


_terminate = False


def _on_term(signum: int, frame: Any) -> None:
    global _terminate
    _terminate = True


def worker_main(index: int, tasks: Any, results: Connection, slot: Any, lock: Any,
                cfg_bytes: bytes) -> None:
    """Process target: take tasks until a stop sentinel, SIGTERM, recycling or parent death.

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
        import pickle  # noqa: PLC0415

        from . import log  # noqa: PLC0415

        cfg: WorkerConfig = pickle.loads(cfg_bytes)  # noqa: S301 - our own parent's bytes

        log.configure("worker", cfg.log_format, cfg.log_level)
        logger = log.get().bind(worker=os.getpid(), slot=index)
        worker = Worker(cfg)
    except Exception as exc:  # noqa: BLE001 - report and exit with the documented code
        print(f"watcher worker failed to start: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(EXIT_INIT_FAILED)
    logger.debug("worker.started")
    while not _terminate:
        try:
            item = tasks.get(timeout=0.5)
        except queue.Empty:
            if os.getppid() != parent or (cfg.parent_pid and not pid_alive(cfg.parent_pid)):
                logger.warning("worker.orphaned")
                break
            continue
        if isinstance(item, Stop):
            break
        with lock:
            slot[SEQ] = float(item.seq)
            slot[STARTED] = time.monotonic()
        result = worker.process_one(item)
        result = replace(result, peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        try:
            results.send(result)
        except (BrokenPipeError, OSError):
            break  # the supervisor is gone
        with lock:  # only after the result is sent: a kill before this re-runs, never loses
            slot[SEQ] = IDLE
            retire = slot[RETIRE] > 0
        if retire:
            logger.debug("worker.retiring", why="task queue replaced")
            break
        if worker.spent:
            logger.debug("worker.recycling", tasks=worker.done)
            break
    logger.debug("worker.stopped", tasks=worker.done)
    with contextlib.suppress(OSError):
        results.close()


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when its parent goes (Linux). The parent is the
    engine's process, or the forkserver, which exits when the engine's process dies: either way a
    killed daemon leaves no worker writing outputs behind it."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the idle loop still notices a vanished parent


