"""The Dask executor's bookkeeping of tasks and their attempts: ``Ledger``.

It holds every task submitted and not yet decided, the queue not yet handed to the cluster, and
each task's current attempt (its future, under a key of its own), and it decides, once per task,
what an attempt that ended means. A task may run twice (Dask re-runs a task whose worker died); a
result for a task already decided, or for an attempt given up on, is recognised by its key and
dropped, its temp files removed. A finished attempt's outputs are published (``clusterfiles``)
and its result accepted; an attempt lost with its worker, or with the scheduler, is run again a
bounded number of times under a new key; one that killed its workers on every try is charged
``worker-crashed``. The decided results wait in ``ready`` for the coordinator's tick.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Mapping
from typing import Any

from watcher.engine.clusterfiles import publish_staged, remove_all_temps, remove_staged
from watcher.engine.clusterlink import ClusterLink
from watcher.engine.clustertimeouts import RPC_TIMEOUT, StuckMonitor
from watcher.engine.executor import Stats, failure
from watcher.fs.files import remove_dead_temps
from watcher.settings.schema import EngineSettings
from watcher.tasks import Result, Task

FETCH_TIMEOUT = 3.0  # a finished task's result not fetched by then was lost with its worker
LOST_RETRIES = 3  # a task whose result was lost with its worker is run again this many times
UNSTARTED_RETRIES = 1  # ... and one whose workers all died before it started


class Ledger:
    """Tasks, their current attempts, and the decision on each attempt that ended (see the
    module docstring). ``intake`` is false once the coordinator stops taking tasks: a lost
    attempt is then not run again."""

    def __init__(self, settings: EngineSettings, stats: Stats, log: Any, link: ClusterLink,
                 monitor: StuckMonitor) -> None:
        self.settings = settings
        self.stats = stats
        self._log = log
        self._link = link  # its start events; a cancellation may mean the scheduler is lost
        self._monitor = monitor  # forgets an attempt no longer current
        self.intake = True
        self.tasks: dict[int, Task] = {}  # outstanding: submitted, no result accepted yet
        self.pending: deque[Task] = deque()  # not yet handed to the cluster
        self.futures: dict[int, Any] = {}  # seq -> the future of its current attempt
        self.keys: dict[str, int] = {}  # key of a current attempt -> seq
        self.ready: list[Result] = []  # decided, not yet returned
        self._lost: dict[int, int] = {}  # seq -> attempts lost with their workers
        self._unstarted_deaths: dict[int, int] = {}  # seq -> deaths charged to nobody
        # tasks run again after a lost attempt (an outage, a dead worker): once decided, the
        # temp files the lost attempts' dead processes left for their outputs are removed
        self._rerun: set[int] = set()

    def add(self, task: Task) -> None:
        self.tasks[task.seq] = task
        self.pending.append(task)

    def forget(self, seq: int) -> None:
        """``seq`` has no current attempt any more."""
        fut = self.futures.pop(seq, None)
        if fut is not None:
            self.keys.pop(fut.key, None)
            self._monitor.forget(fut.key)
            self._link.starts.pop(fut.key, None)

    def requeue_in_flight(self) -> int:
        """The scheduler is lost: the tasks it held go back in line, uncharged (how many)."""
        back = [self.tasks[q] for q in list(self.futures) if q in self.tasks]
        for seq in list(self.futures):
            self.forget(seq)
        self.pending.extendleft(reversed(back))
        self._rerun.update(t.seq for t in back)
        self.stats.requeued += len(back)
        return len(back)

    def give_up(self, why: str) -> None:
        """Every task in hand is cancelled, for ``why``."""
        for seq in list(self.futures):
            with contextlib.suppress(Exception):
                self.futures[seq].cancel()
            self.forget(seq)
        self.pending.clear()
        for task in list(self.tasks.values()):
            self.ready.append(failure(task, "cancelled", why))
        self.tasks.clear()

    def finished(self, key: str, fut: Any, fetched: Mapping[str, Any]) -> None:
        """The attempt ``key`` ended (its future ``fut``; ``fetched``: results already fetched,
        by key): decide what it means for its task."""
        seq = self.keys.get(key)
        status = fut.status
        starts = self._link.starts.get(key, [])
        if status == "cancelled" and (seq is None or seq not in self.tasks):
            return  # cancelled here (a timeout, shutdown): already decided
        if seq is None or seq not in self.tasks:
            # An attempt this coordinator already decided or gave up on (timed out, or the task
            # ran twice): its temp files go, its result does not count.
            self.stats.duplicates += 1
            if status == "finished":
                with contextlib.suppress(Exception):
                    remove_staged(fut.result(timeout=5))
            self._log.debug("engine.duplicate_result", key=key)
            return
        task = self.tasks[seq]
        if status == "cancelled" and self._link.client.status != "running":
            self._link.watch()  # lost with the scheduler: back in line, uncharged
            if seq not in self.futures:
                return
        self.forget(seq)
        if status == "cancelled":
            self._lost_attempt(task, "the cluster cancelled it (its worker was lost)")
            return
        if status == "finished":
            try:
                result = fetched[key] if key in fetched else fut.result(timeout=FETCH_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - lost with its worker before we fetched it
                self._lost_attempt(task, f"its result was lost ({type(exc).__name__}: {exc})")
                return
            self._accept(task, result)
            return
        if status != "error":
            # Finished, then its worker died holding the result: the scheduler has put it back
            # ("lost", "pending"). This notification is stale; run it again under a new key.
            self._lost_attempt(task, f"its result was lost with its worker (now {status})")
            return
        exc = fut.exception(timeout=RPC_TIMEOUT)
        from distributed import KilledWorker  # noqa: PLC0415

        if isinstance(exc, KilledWorker) and not starts and self.intake and \
                self._unstarted_deaths.get(seq, 0) < UNSTARTED_RETRIES:
            # Its workers died while it waited on them, never started: not its fault. Run again
            # under a new key (a fresh count of Dask's), once: a task that kills its worker at
            # once can take its start event with it, and is charged the second time.
            self._unstarted_deaths[seq] = self._unstarted_deaths.get(seq, 0) + 1
            remove_all_temps([o.path for o in task.outputs])
            self.stats.requeued += 1
            self._rerun.add(seq)
            self.pending.appendleft(task)
            self._log.info("file.requeued", input=task.path, why="the worker(s) it was assigned "
                           "to died before it started; not charged")
            return
        del self.tasks[seq]
        self._unstarted_deaths.pop(seq, None)
        if isinstance(exc, KilledWorker):
            self.stats.crashes += 1
            pid = starts[-1][0] if starts else 0
            # dask-local sets allowed-failures itself, so its tries are known
            tries = self.settings.crash_retries + 1 if self.settings.executor == "dask-local" \
                else 1
            self.ready.append(Result(
                seq=task.seq, path=task.path, ok=False, reason="worker-crashed",
                error=f"the worker died processing this input, on every try ({exc})",
                error_type="KilledWorker", duration=0.0, worker=pid,
                attempt=max(tries, len(starts))))
            remove_all_temps([o.path for o in task.outputs])
            self._log.warning("worker.died", held=task.path, worker_pid=pid,
                              host=starts[-1][1] if starts else None, attempts=len(starts),
                              how=str(exc))
        else:
            self.ready.append(failure(task, "internal-error",
                                       f"the task failed on the cluster: "
                                       f"{type(exc).__name__}: {exc}"))

    def _lost_attempt(self, task: Task, why: str) -> None:
        """A finished task's result (kept on its worker until fetched) went with that worker,
        or the scheduler dropped the task: run it again, a bounded number of times."""
        self._lost[task.seq] = self._lost.get(task.seq, 0) + 1
        if self._lost[task.seq] > LOST_RETRIES or not self.intake:
            del self.tasks[task.seq]
            tries = self._lost.pop(task.seq)
            self.ready.append(
                failure(task, "worker-crashed", f"{why}; gave up after {tries} tries")
                if self.intake else failure(task, "cancelled", f"{why} during shutdown"))
            return
        remove_all_temps([o.path for o in task.outputs])
        self.stats.requeued += 1
        self._rerun.add(task.seq)
        self.pending.appendleft(task)
        self._log.info("file.requeued", input=task.path, why=why)

    def _accept(self, task: Task, result: Result) -> None:
        """Publish a finished task's staged outputs under their final names (the coordinator's
        one job no task does); the task's one result."""
        del self.tasks[task.seq]
        self._lost.pop(task.seq, None)
        if not result.ok and result.reason == "missing" and os.path.exists(task.path):
            from dataclasses import replace  # noqa: PLC0415

            result = replace(result, reason="io-error", error=(
                f"{task.path} is here, where the coordinator runs, but the cluster worker "
                f"(pid {result.worker}) could not open it ({result.error}): inputs and outputs "
                "must be on storage every worker and the coordinator share, under the same "
                "absolute paths"))
        if not result.ok or not result.staged:
            self.ready.append(result)
            return
        published = publish_staged(task, result)
        self.ready.append(published)
        if published.ok and task.seq in self._rerun:
            self._rerun.discard(task.seq)
            remove_dead_temps([o.path for o in task.outputs], task.root)
