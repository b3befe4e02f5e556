"""The Dask executor's worker side: the functions that run inside Dask worker processes.

The coordinator (``cluster.DaskEngine``) submits ``run_task`` and runs ``check_worker``,
``running_tasks`` and ``whoami`` on its workers by reference, so the workers import them from
this module by its path: they stay module-level functions, and nothing here imports the
coordinator. A worker process keeps its pipelines' ``Processor`` (``_PROCESSORS``, by the digest
of their pickled configuration) and the tasks it is running (``_RUNNING``, which the
coordinator's timeout checks read through ``running_tasks``); a task announces its start on
``START_TOPIC``. A task only stages its outputs: publishing them is the coordinator's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from typing import Any

from watcher.engine.clusterfiles import remove_staged
from watcher.engine.executor import failure
from watcher.fs.files import HOST
from watcher.tasks import Result, Task

START_TOPIC = "watcher-task-started"  # the event a task sends when it starts (see _announce)

_PROCESSORS: dict[str, Any] = {}
_RUNNING: dict[str, tuple[float, int, str]] = {}  # key -> (wall start, pid, host), this process


def run_task(task: Task, key: str, digest: str, cfg_bytes: bytes) -> Result:
    """The function the cluster runs: prepare and stage one task; publish nothing."""
    from dataclasses import replace  # noqa: PLC0415

    from watcher.imaging import memory  # noqa: PLC0415

    proc = _PROCESSORS.get(digest)
    if proc is None:
        from watcher.imaging.processor import Processor  # noqa: PLC0415

        cfg = pickle.loads(cfg_bytes)  # noqa: S301 - our own coordinator's bytes
        proc = _PROCESSORS[digest] = Processor(cfg["pipelines"], cfg["limits"],
                                                       cfg.get("memory_cap", 0))
    _RUNNING[key] = (time.time(), os.getpid(), HOST)
    _announce(key)
    try:
        prep = proc.prepare(task)
        if _cancelled(key):  # the coordinator gave it up (a timeout, a stop, it is gone)
            for st in prep.staged:
                st.discard()
            return failure(task, "cancelled", "cancelled by its coordinator")
        result = proc.stage(prep)
        if _cancelled(key):  # ... while it was being written: nobody will publish it
            remove_staged(result)
            return failure(task, "cancelled", "cancelled by its coordinator")
    finally:
        _RUNNING.pop(key, None)
    return replace(result, peak_rss_kb=memory.peak() // 1024)


def _cancelled(key: str) -> bool:
    """Whether this worker was told to drop the task ``key`` while running it (Dask cannot stop
    a running task: it marks it cancelled and lets it run): its outputs are then not written,
    or removed, so that no temp file outlives a coordinator that stopped or died."""
    try:
        from distributed import get_worker  # noqa: PLC0415

        ts = get_worker().state.tasks.get(key)
    except Exception:  # noqa: BLE001 - not in a worker (tests), or another Dask version
        return False
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _announce(key: str) -> None:
    """Tell the coordinator, through the scheduler's event log, that this attempt started here:
    a worker's death is then charged only to the tasks that had started on it (Dask counts it
    against every task assigned to it, queued ones too)."""
    with contextlib.suppress(Exception):
        from distributed import get_worker  # noqa: PLC0415

        get_worker().log_event(START_TOPIC, {"key": key, "pid": os.getpid(), "host": HOST})


def running_tasks() -> dict[str, tuple[float, int, str]]:
    """Run on each worker by the coordinator: the tasks this worker process is running."""
    _quiet_polls()
    return dict(_RUNNING)


class _PollFilter(logging.Filter):
    """Drops the worker's "Run out-of-band function 'running_tasks'" line: the coordinator asks
    every second, and one INFO line per second per worker buries what the worker has to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Run out-of-band function %r"
                    and "running_tasks" in str(record.args))


_POLL_FILTER = _PollFilter()


def _quiet_polls() -> None:
    worker_log = logging.getLogger("distributed.worker")
    if _POLL_FILTER not in worker_log.filters:
        worker_log.addFilter(_POLL_FILTER)


def whoami() -> tuple[str, int]:
    """Run on each worker: its host, as temp names carry it, and its pid."""
    return HOST, os.getpid()


def check_worker(digest: str, cfg_bytes: bytes) -> str:
    """Run on each worker at start: the pipelines must unpickle (their transforms import)."""
    _quiet_polls()
    cfg = pickle.loads(cfg_bytes)  # noqa: S301
    from watcher.imaging.processor import Processor  # noqa: PLC0415

    _PROCESSORS[digest] = Processor(cfg["pipelines"], cfg["limits"], cfg.get("memory_cap", 0))
    return HOST
