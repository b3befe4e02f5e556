"""The Dask executor's timeouts: Dask has none, so ``StuckMonitor`` finds the tasks running past
``task_timeout``.

At most once a ``MONITOR_INTERVAL``, and in a thread of its own (a busy worker may take its time
to answer), it asks every worker process which tasks it is running (``clustertask.
running_tasks``). A task's time is measured on the coordinator's clock from the first look that
found it running: the workers' clocks are theirs (skewed, stepped), and never compared with
ours. Charging a task found overdue (cancel it, restart its worker, ``timeout``) is the
coordinator's.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Container, Iterator, Mapping
from typing import Any

from watcher.engine.clustertask import running_tasks

MONITOR_INTERVAL = 1.0  # seconds between looks at the workers' running tasks (timeouts)
RPC_TIMEOUT = 10.0  # a cluster call that takes longer is skipped this tick, not waited on


class StuckMonitor:
    """Looks at the workers' running tasks and tells which ones run past the limit."""

    def __init__(self, limit: float) -> None:
        self._limit = limit  # seconds a task may run
        # key of an attempt -> when (this clock) a look first found it running
        self._running_since: dict[str, float] = {}
        self._last_look = 0.0
        self._rpc = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dask-rpc")
        self._look: concurrent.futures.Future[Any] | None = None

    def overdue(self, client: Any, now: float, keys: Mapping[str, int],
                live: Container[int]) -> Iterator[tuple[str, int, int, str]]:
        """Each task past the limit, as ``(worker address, seq, pid, host)``, from the last look
        if it has come back (else a look is started, or left to finish). ``keys`` maps the key
        of each current attempt to its task, ``live`` holds the tasks not decided yet; both are
        read as each task is judged, so one the caller charges meanwhile is not yielded again."""
        if self._look is None:
            if now - self._last_look < MONITOR_INTERVAL:
                return
            self._last_look = now
            self._look = self._rpc.submit(
                lambda: client.run(running_tasks, on_error="return"))
            return
        if not self._look.done():
            if now - self._last_look > RPC_TIMEOUT:
                self._look = None  # a worker too busy to answer: look again later
            return
        look, self._look = self._look, None
        try:
            per_worker = look.result()
        except Exception:  # noqa: BLE001 - the cluster changed meanwhile; next time
            return
        for addr, running in per_worker.items():
            if not isinstance(running, dict):
                continue
            for key, (_, pid, host) in running.items():
                seq = keys.get(key)
                if seq is None or seq not in live:
                    continue
                since = self._running_since.setdefault(key, now)
                if now - since <= self._limit:
                    continue
                yield addr, seq, pid, host

    def forget(self, key: str) -> None:
        """The attempt ``key`` is no longer current."""
        self._running_since.pop(key, None)

    def shutdown(self) -> None:
        self._rpc.shutdown(wait=False, cancel_futures=True)
