"""The engine: a supervisor that alone owns, feeds and reaps a fixed set of worker processes.

Both modes drive it the same way: ``submit(task)`` as paths become known, ``poll(timeout)`` in
their own loop (it returns finished results), ``stop_intake()`` to stop handing out work, and
``close(grace)`` to drain and end the workers. Each ``poll`` is one supervisor tick, in a fixed
order: wait for a result or a worker exit, collect results, reap dead workers (charging the task
they held), kill workers stuck past the timeout, recover tasks lost with a dead worker, top the
pool back up, and feed the task queue.

Tasks go to the workers over one ``multiprocessing.Queue`` (kept short so stopping is quick);
each worker sends results back on its own pipe, so a worker killed mid-send can only break its
own channel. A worker records in a shared slot which task it holds; the supervisor kills a worker
only under that slot's lock while the slot still shows the task it timed out, so it never kills a
worker that may be inside ``queue.get()``. Results are accepted once per task: a late duplicate
(a task that ran twice) is dropped.

A worker that dies holding no recorded task (killed from outside while idle, or between taking a
task and recording it) may have died inside ``queue.get()`` holding the queue's read lock, which
would block every other worker forever. So the supervisor then replaces the queue: a new queue
with every task not yet seen started, idle workers ended (they wait on the old queue), busy ones
told to exit after their current task, and fresh workers on the new queue.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from . import log
from .codec import DecodeLimits
from .config import EngineSettings
from .errors import WatcherError
from .files import remove_temps
from .pipeline import Pipeline
from .tasks import STOP, Result, Task
from .worker import (
    EXIT_INIT_FAILED,
    IDLE,
    PENDING,
    RETIRE,
    SEQ,
    SLOT_SIZE,
    STARTED,
    WorkerConfig,
    worker_main,
)

PREFETCH = 2  # tasks waiting in the queue per worker: enough to never starve one
EARLY_DEATHS = 5  # workers dying in a row before reporting anything: they cannot start


class EngineError(WatcherError):
    """The engine cannot run (workers fail to start)."""


@dataclass
class _Slot:
    """One worker as the supervisor sees it."""

    index: int
    proc: Any
    conn: Connection
    shared: Any
    lock: Any
    killed_for: int = -1  # the task this worker was killed for (timeout/shutdown), if any
    cleanup: list[str] = field(default_factory=list)  # outputs whose temp files it may leave
    retiring: bool = False  # on an abandoned queue: exits after its current task
    tasks: int = 0

    @property
    def seq(self) -> int:
        return int(self.shared[SEQ])

    @property
    def pending(self) -> int:
        return int(self.shared[PENDING])


@dataclass
class Stats:
    started: int = 0
    restarts: int = 0
    crashes: int = 0
    timeouts: int = 0
    queue_resets: int = 0
    requeued: int = 0
    duplicates: int = 0


class Engine:
    def __init__(self, settings: EngineSettings, pipelines: Mapping[str, Pipeline],
                 limits: DecodeLimits, *, log_format: str = "json",
                 log_level: str = "warning") -> None:
        self.settings = settings
        self._ctx = multiprocessing.get_context(settings.start_method)
        if settings.start_method == "forkserver":
            self._ctx.set_forkserver_preload(["watcher.worker"])
        cfg = WorkerConfig(dict(pipelines), limits, settings.max_tasks_per_worker, log_format,
                           log_level, os.getpid())
        try:
            self._cfg = pickle.dumps(cfg)
        except Exception as exc:
            raise EngineError(f"the pipelines cannot be sent to worker processes: {exc}") from exc
        self._queue: Any = None
        self._slots: dict[int, _Slot] = {}
        self._tasks: dict[int, Task] = {}  # outstanding: submitted, no result accepted yet
        self._pending: deque[Task] = deque()  # not yet on the queue
        self._inq: dict[int, Task] = {}  # on the queue, not yet seen started
        self._intake = True
        self._early_deaths = 0  # consecutive workers that died before sending any result
        self._ready: list[Result] = []
        self.stats = Stats()
        self._log = log.get("watcher.engine")

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._queue = self._ctx.Queue()
        for i in range(self.settings.workers):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        shared = self._ctx.RawArray("d", SLOT_SIZE)
        shared[SEQ] = shared[PENDING] = IDLE
        lock = self._ctx.Lock()
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=worker_main, name=f"watcher-worker-{index}",
                                 args=(index, self._queue, send, shared, lock, self._cfg),
                                 daemon=True)
        proc.start()
        send.close()  # the worker holds the only writing end: EOF means it is gone
        self._slots[index] = _Slot(index, proc, recv, shared, lock)
        self.stats.started += 1
        self._log.info("worker.started", worker=proc.pid, slot=index)

    @property
    def outstanding(self) -> int:
        return len(self._tasks)

    @property
    def workers_alive(self) -> int:
        return sum(1 for s in self._slots.values() if s.proc.is_alive())

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots.values()]

    def running(self) -> list[str]:
        """The inputs being processed at this moment."""
        return [self._tasks[s.seq].path for s in self._slots.values() if s.seq in self._tasks]

    def submit(self, task: Task) -> None:
        if not self._intake:
            raise EngineError("the engine is stopping; no new tasks")
        self._tasks[task.seq] = task
        self._pending.append(task)
        self._feed()

    def stop_intake(self) -> list[Task]:
        """Stop handing out work; return the tasks that had not started (now withdrawn)."""
        self._intake = False
        withdrawn = list(self._pending)
        self._pending.clear()
        while True:
            try:
                # a short wait, not get_nowait(): the queue's feeder thread may still hold
                # tasks put a moment ago, which a worker would otherwise take later
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                break
            if isinstance(item, Task):
                withdrawn.append(item)
        for t in withdrawn:
            self._inq.pop(t.seq, None)
            self._tasks.pop(t.seq, None)
        return withdrawn

    def close(self, grace: float | None = None,
              abort: Callable[[], bool] | None = None) -> list[Result]:
        """Let running tasks finish for up to ``grace`` seconds, then end every worker.

        Returns the results that arrived meanwhile; a task still running at the deadline (or
        when ``abort()`` turns true: a second signal) is killed and reported as ``cancelled``.
        No worker process is left behind.
        """
        grace = self.settings.grace if grace is None else grace
        results: list[Result] = []
        if self._intake:
            self.stop_intake()
        deadline = time.monotonic() + grace
        while self._tasks and time.monotonic() < deadline and not (abort and abort()):
            results += self.poll(min(0.1, max(0.0, deadline - time.monotonic())), respawn=False)
        for slot in self._slots.values():
            if slot.proc.is_alive():
                with contextlib.suppress(Exception):
                    self._queue.put(STOP)
        end = time.monotonic() + 2.0
        for slot in self._slots.values():
            slot.proc.join(max(0.0, end - time.monotonic()))
        for slot in list(self._slots.values()):
            if slot.proc.is_alive():
                seq = slot.seq
                slot.cleanup = self._outputs(seq) + self._outputs(slot.pending)
                slot.proc.kill()
                slot.proc.join(5)
                if seq in self._tasks:
                    results.append(self._charge(slot, seq, "cancelled",
                                                f"still running after the {grace:g} s grace "
                                                "period at shutdown; stopped"))
            results += self._drain(slot)
            self._retire(slot)
        self._slots.clear()
        for t in list(self._tasks.values()):
            results.append(_failure(t, "cancelled", "the run stopped before this input finished"))
        self._tasks.clear()
        if self._queue is not None:
            self._queue.close()
            self._queue.join_thread()
        return results

    # --- one supervisor tick --------------------------------------------------------------------

    def poll(self, timeout: float = 0.25, *, respawn: bool = True,
             wake: Sequence[Any] = ()) -> list[Result]:
        """Run one tick; return the results that became final during it. ``wake``: more things
        to wait on (a file descriptor the caller's own events write to)."""
        waitables: list[Any] = [s.conn for s in self._slots.values()]
        waitables += [s.proc.sentinel for s in self._slots.values()]
        waitables += list(wake)
        if waitables and not self._ready:
            wait(waitables, timeout)
        elif not waitables and timeout:
            time.sleep(timeout)
        for slot in list(self._slots.values()):
            self._ready += self._drain(slot)
        self._reap(respawn)
        self._kill_stuck()
        self._feed()
        out, self._ready = self._ready, []
        return out

    def _drain(self, slot: _Slot) -> list[Result]:
        out = []
        while True:
            try:
                if not slot.conn.poll():
                    break
                result = slot.conn.recv()
            except (EOFError, OSError, ValueError):
                break
            except Exception:  # noqa: BLE001 - a message torn by a kill mid-send
                self._log.warning("engine.result_unreadable", worker=slot.proc.pid)
                break
            slot.tasks += 1
            self._early_deaths = 0
            accepted = self._accept(result)
            if accepted is not None:
                out.append(accepted)
        return out

    def _accept(self, result: Result) -> Result | None:
        task = self._tasks.get(result.seq)
        if task is None:
            self.stats.duplicates += 1
            self._log.debug("engine.duplicate_result", path=result.path, seq=result.seq)
            return None
        del self._tasks[result.seq]
        self._inq.pop(result.seq, None)
        return result

    def _reap(self, respawn: bool) -> None:
        for slot in list(self._slots.values()):
            if slot.proc.is_alive():
                for seq in (slot.seq, slot.pending):
                    if seq >= 0:
                        self._inq.pop(seq, None)  # seen started
                continue
            slot.proc.join(0)
            self._ready += self._drain(slot)  # results sent just before it died
            code = slot.proc.exitcode
            seq = slot.seq
            self._requeue_pending(slot)
            reset = False
            if slot.killed_for >= 0:
                pass  # charged when it was killed; _retire removes its temp files
            elif seq >= 0 and seq in self._tasks:
                self._crashed(slot, seq, code)
            elif code != 0 and not slot.retiring and code != EXIT_INIT_FAILED:
                # Died while idle or between taking a task and recording it: possibly inside
                # queue.get(), holding the queue's read lock.
                reset = True
            if code != 0:
                self._log.warning("worker.died", worker=slot.proc.pid, exitcode=code,
                                  held=self._tasks[seq].path if seq in self._tasks else None)
            self._retire(slot)
            del self._slots[slot.index]
            if code == EXIT_INIT_FAILED:
                raise EngineError("worker processes cannot start (see the error above); "
                                  "check the installation and the pipelines' imports")
            if code != 0 and slot.tasks == 0 and slot.killed_for < 0:
                self._early_deaths += 1
                if self._early_deaths >= EARLY_DEATHS:
                    raise EngineError(
                        f"{self._early_deaths} worker processes in a row died before finishing "
                        f"any task (last exit code {code}); not respawning them. If a script "
                        "calls watcher, guard its top level with "
                        "`if __name__ == \"__main__\":` (workers import the main module)")
            if reset:
                self._reset_queue()
            if respawn and self._intake and slot.index not in self._slots:
                self.stats.restarts += 1 if code != 0 else 0
                self._spawn(slot.index)

    def _requeue_pending(self, slot: _Slot) -> None:
        """A dead worker's committer may have held a task whose outputs were encoded but whose
        result never came: run it again (same attempt: it did not cause the death)."""
        seq = slot.pending
        if seq < 0 or seq not in self._tasks or seq == slot.killed_for:
            return
        remove_temps(self._outputs(seq), slot.proc.pid)
        self._inq.pop(seq, None)
        if not self._intake:
            self._ready.append(self._charge(slot, seq, "cancelled", "its worker died during "
                                            "shutdown before committing its outputs"))
            return
        self.stats.requeued += 1
        self._pending.appendleft(self._tasks[seq])
        self._log.info("file.requeued", path=self._tasks[seq].path, worker=slot.proc.pid,
                       why="its worker died before committing its outputs")

    def _reset_queue(self) -> None:
        """Replace a task queue whose read lock may be held by a dead worker."""
        self.stats.queue_resets += 1
        old, self._queue = self._queue, self._ctx.Queue()
        for slot in list(self._slots.values()):
            with slot.lock:
                slot.retiring = True
                if slot.seq < 0:
                    slot.proc.kill()  # idle: waiting on the old queue, holding nothing
                else:
                    slot.shared[RETIRE] = 1.0
        unstarted = list(self._inq.values())
        self._inq.clear()
        self._pending.extendleft(reversed(unstarted))
        self.stats.requeued += len(unstarted)
        self._log.warning("engine.queue_replaced", requeued=len(unstarted),
                          why="a worker died outside a task, maybe holding the queue lock")
        old.cancel_join_thread()
        old.close()

    def _crashed(self, slot: _Slot, seq: int, code: int | None) -> None:
        task = self._tasks[seq]
        self.stats.crashes += 1
        how = f"signal {-code} ({signal.Signals(-code).name})" if code and code < 0 \
            else f"exit code {code}"
        remove_temps(self._outputs(seq), slot.proc.pid)
        if task.attempt <= self.settings.crash_retries and self._intake:
            self._log.warning("file.retried", path=task.path, worker=slot.proc.pid,
                              reason="worker-crashed", how=how, attempt=task.attempt)
            retry = task.retry()
            self._tasks[seq] = retry
            self._pending.appendleft(retry)
        else:
            self._ready.append(self._charge(slot, seq, "worker-crashed",
                                            f"the worker died ({how}) processing this input, "
                                            f"{task.attempt} time(s)"))

    def _kill_stuck(self) -> None:
        limit = self.settings.task_timeout
        now = time.monotonic()
        for slot in self._slots.values():
            seq = slot.seq
            if seq < 0 or slot.killed_for >= 0 or now - slot.shared[STARTED] <= limit:
                continue
            with slot.lock:
                if slot.seq != seq:  # it finished meanwhile
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, signal.SIGKILL)
                slot.killed_for = seq
                slot.cleanup = self._outputs(seq) + self._outputs(slot.pending)
            self.stats.timeouts += 1
            if seq in self._tasks:
                self._ready.append(self._charge(slot, seq, "timeout",
                                                f"still running after {limit:g} s; worker "
                                                "killed"))

    def _feed(self) -> None:
        if not self._intake or self._queue is None:
            return
        room = PREFETCH * max(1, len(self._slots)) - len(self._inq)
        while room > 0 and self._pending:
            task = self._pending.popleft()
            if task.seq not in self._tasks:
                continue
            self._inq[task.seq] = task
            self._queue.put(task)
            room -= 1

    # --- helpers --------------------------------------------------------------------------------

    def _outputs(self, seq: int) -> list[str]:
        task = self._tasks.get(seq)
        return [o.path for o in task.outputs] if task else []

    def _charge(self, slot: _Slot, seq: int, reason: str, error: str) -> Result:
        task = self._tasks.pop(seq)
        self._inq.pop(seq, None)
        return _failure(task, reason, error, worker=slot.proc.pid)

    def _retire(self, slot: _Slot) -> None:
        with contextlib.suppress(OSError):
            slot.conn.close()
        if slot.cleanup:
            slot.proc.join(5)  # a killed process may still be exiting
            removed = remove_temps(slot.cleanup, slot.proc.pid)
            if removed:
                self._log.info("worker.temp_removed", worker=slot.proc.pid, files=removed)
        with contextlib.suppress(ValueError):
            slot.proc.close()


def _failure(task: Task, reason: str, error: str, worker: int = 0) -> Result:
    return Result(task.seq, task.path, False, (), reason, error, "", 0.0, worker, task.attempt)
