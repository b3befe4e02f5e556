"""The Dask executor: the engine's interface (submit, poll, stop_intake, close) over a Dask
distributed cluster, for users who outgrow one machine.

A task on the cluster only writes: it decodes, transforms and encodes each output to a temp file
beside its final name, fsyncs it, and reports the temp names (``Result.staged``). This object is
the coordinator: it alone publishes outputs under their final names (no-clobber, as locally) and
hands each task's one result to the caller, which decides the input's fate once. A task may run
twice (Dask re-runs a task whose worker died); a result for a task already decided, or for an
attempt this coordinator gave up on, is recognised by its key and dropped, its temp files removed.

Crashes: a worker that dies mid-task makes the scheduler re-run the task elsewhere, up to the
scheduler's ``allowed-failures`` (set to ``crash_retries`` for ``dask-local``); then the future
fails with ``KilledWorker`` and the input is charged ``worker-crashed``. Timeouts: Dask has none,
so each task records its start in its worker process; the coordinator polls those, cancels a task
past the limit, restarts the worker it hangs on (its nanny starts a fresh one) and charges
``timeout``. Back-pressure: at most ``tasks_per_worker`` tasks per worker thread are submitted;
the rest wait here.

Inputs and outputs must be on storage every worker sees under the same paths (a shared folder):
tasks carry paths and pipeline names, never pixels.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import pickle
import queue
import select
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from watcher import log
from watcher.engine.executor import EngineError, Executor, Stats, failure
from watcher.errors import RejectedInput
from watcher.fs.durable import fsync_dir
from watcher.fs.files import HOST, remove_dead_temps, temp_name
from watcher.fs.staging import publish
from watcher.imaging.pipeline import Pipeline
from watcher.settings.schema import DecodeLimits, EngineSettings
from watcher.tasks import Result, Task

MONITOR_INTERVAL = 1.0  # seconds between looks at the workers' running tasks (timeouts)
RPC_TIMEOUT = 10.0  # a cluster call that takes longer is skipped this tick, not waited on
FETCH_TIMEOUT = 3.0  # a finished task's result not fetched by then was lost with its worker
SWEEP_DELAY = 60.0  # seconds after a decision that late duplicates' temp files are swept
LOST_RETRIES = 3  # a task whose result was lost with its worker is run again this many times
UNSTARTED_RETRIES = 1  # ... and one whose workers all died before it started
RECONNECT_FIRST, RECONNECT_MAX = 1.0, 30.0  # back-off between reconnections to a lost scheduler

# --- the worker side (runs inside Dask worker processes) ----------------------------------------

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
            _remove_staged(result)
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


START_TOPIC = "watcher-task-started"  # the event a task sends when it starts (see _announce)


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


def _whoami() -> tuple[str, int]:
    """Run on each worker: its host, as temp names carry it, and its pid."""
    return HOST, os.getpid()


def check_worker(digest: str, cfg_bytes: bytes) -> str:
    """Run on each worker at start: the pipelines must unpickle (their transforms import)."""
    _quiet_polls()
    cfg = pickle.loads(cfg_bytes)  # noqa: S301
    from watcher.imaging.processor import Processor  # noqa: PLC0415

    _PROCESSORS[digest] = Processor(cfg["pipelines"], cfg["limits"], cfg.get("memory_cap", 0))
    return HOST


# --- the coordinator ------------------------------------------------------------------------------

class DaskEngine(Executor):
    """The engine's interface over a Dask cluster (see the module docstring)."""

    def __init__(self, settings: EngineSettings, pipelines: Mapping[str, Pipeline],
                 limits: DecodeLimits, *, log_format: str = "json",
                 log_level: str = "warning") -> None:
        try:
            import distributed  # noqa: F401, PLC0415
        except ImportError as exc:
            raise EngineError(f"executor {settings.executor!r} needs Dask distributed: "
                              "pip install 'watcher[dask]'") from exc
        self.settings = settings
        try:
            # the estimate only, with a cap set explicitly: a cluster worker's memory is Dask's
            # to govern (its memory_limit), and its threads share one process
            self._cfg = pickle.dumps({"pipelines": dict(pipelines), "limits": limits,
                                      "memory_cap": settings.max_worker_memory})
        except Exception as exc:
            raise EngineError(f"the pipelines cannot be sent to worker processes: {exc}") from exc
        self._digest = hashlib.sha256(self._cfg).hexdigest()[:16]
        self._client: Any = None
        self._cluster: Any = None
        self._tasks: dict[int, Task] = {}  # outstanding: submitted, no result accepted yet
        self._pending: deque[Task] = deque()  # not yet handed to the cluster
        self._futures: dict[int, Any] = {}  # seq -> the future of its current attempt
        self._keys: dict[str, int] = {}  # key of a current attempt -> seq
        # key of an attempt -> when (this clock) a look first found it running (timeouts)
        self._running_since: dict[str, float] = {}
        self._lost: dict[int, int] = {}  # seq -> attempts lost with their workers
        # key -> [(pid, host)] of each start of that attempt's task (Dask may start one key
        # again elsewhere after its worker died), from the tasks' START_TOPIC events; written
        # by the client's thread
        self._starts: dict[str, list[tuple[int, str]]] = {}
        self._unstarted_deaths: dict[int, int] = {}  # seq -> deaths charged to nobody
        # tasks run again after a lost attempt (an outage, a dead worker): once decided, the
        # temp files the lost attempts' dead processes left for their outputs are removed
        self._rerun: set[int] = set()
        # Outputs of decided tasks, swept for temp files that a second attempt (a task re-run
        # after its worker was lost) may leave after the decision: (time decided, final path).
        self._decided: deque[tuple[float, str]] = deque()
        self._last_sweep = time.monotonic()
        self._decided_tasks: dict[int, Task] = {}  # submitted, result not yet returned
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._intake = True
        self._ready: list[Result] = []
        self._threads = 1
        self._workers = 0
        self._addresses: set[str] = set()  # the workers the last look found
        self._worker_pids: dict[str, set[int]] | None = None  # host -> its workers' pids
        self._last_look = 0.0
        self._rpc = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dask-rpc")
        self._look: concurrent.futures.Future[Any] | None = None
        self.stats = Stats()
        self._log = log.get("watcher.engine.cluster")
        self._log_level = log_level
        # Outages: since when (this clock) the scheduler cannot be reached, or the cluster has
        # no worker while tasks wait; a reconnection in progress (its own thread: a connect
        # may take its whole timeout) and when the next one may start.
        self._outage_since: float | None = None
        self._outage_why = ""
        self._idle_since: float | None = None
        self._connect: concurrent.futures.Future[Any] | None = None
        self._connector = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dask-connect")
        self._next_connect = 0.0
        self._connect_delay = RECONNECT_FIRST
        # 0: wait for ever (the daemon); a batch gives up after this many seconds
        self._wait = settings.cluster_wait or 0.0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        import dask  # noqa: PLC0415
        from distributed import Client, LocalCluster  # noqa: PLC0415

        s = self.settings
        if s.executor == "dask-local":
            # worker-saturation 1.0: a worker holds only the task it runs, so one that dies
            # charges that task alone (Dask counts a death against every task assigned to it)
            with dask.config.set({"distributed.scheduler.allowed-failures": s.crash_retries,
                                  "distributed.scheduler.worker-saturation": 1.0,
                                  "distributed.worker.daemon": True,
                                  "distributed.admin.tick.limit": "1h"}):
                self._cluster = LocalCluster(
                    n_workers=s.workers, threads_per_worker=1, processes=True,
                    host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
                self._client = Client(self._cluster)
        else:
            try:
                self._client = Client(s.scheduler)  # distributed.comm.timeouts.connect
            except OSError as exc:
                raise EngineError(f"cannot reach the Dask scheduler at {s.scheduler}: "
                                  f"{exc}") from exc
        try:
            hosts = self._client.run(check_worker, self._digest, self._cfg)
        except Exception as exc:
            self.close(0)
            raise EngineError(f"Dask workers cannot load the pipelines: {type(exc).__name__}: "
                              f"{exc} (install watcher and the transforms' modules on every "
                              "worker)") from exc
        self._subscribe()
        self._refresh(force=True)
        self.stats.started = self._workers
        self._log.info("cluster.connected", executor=s.executor,
                       scheduler=self._client.scheduler.address, workers=self._workers,
                       threads=self._threads, hosts=sorted(set(hosts.values())))

    def writer_gone(self, host: str, pid: int) -> bool:
        """Whether the process ``pid`` of ``host`` that a temp file names is gone: on this host,
        when it no longer runs; on a host of the cluster, when it is none of its workers now
        (only cluster workers write there for a cluster's tasks); elsewhere, not known (no)."""
        from watcher.fs.files import running  # noqa: PLC0415

        if host == HOST:
            return not running(pid)
        if self._client is None:
            return False
        if self._worker_pids is None:
            try:
                found = self._client.run(_whoami, on_error="return")
                self._worker_pids = {}
                for v in found.values():
                    if isinstance(v, tuple):
                        self._worker_pids.setdefault(v[0], set()).add(v[1])
            except Exception:  # noqa: BLE001 - not known: nothing is judged gone
                return False
        pids = self._worker_pids.get(host)
        return pids is not None and pid not in pids

    @property
    def outstanding(self) -> int:
        return len(self._tasks)

    @property
    def workers_alive(self) -> int:
        self._refresh()
        return self._workers

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids (this machine's cluster only)."""
        if self._cluster is None or self._client is None:
            return []
        with contextlib.suppress(Exception):
            return sorted(self._client.run(os.getpid).values())
        return []

    @property
    def worker_addresses(self) -> list[str]:
        return sorted(self._client.scheduler_info()["workers"]) if self._client else []

    def problems(self) -> list[str]:
        """What is wrong at this moment, one line each ([]: nothing), as ``Engine.problems``.

        Timeouts are enforced by ``_kill_stuck`` (Dask restarts the worker), and a task's thread
        cannot outlive its worker process here, so the one thing to report is a cluster left
        with no worker while tasks wait. No call to the cluster is made (cached figures)."""
        if self._outage_since is not None:
            return [f"the Dask scheduler at {self._address()} cannot be reached "
                    f"({self._outage_why}) for {time.monotonic() - self._outage_since:.0f} s; "
                    f"{len(self._tasks)} task(s) wait; reconnecting"]
        if self._client is not None and self._intake and self._tasks and self._workers == 0:
            return [f"the cluster has no worker; {len(self._tasks)} task(s) wait"]
        return []

    def running(self) -> list[str]:
        """The inputs being processed at this moment, on any worker."""
        try:
            per_worker = self._client.run(running_tasks, on_error="return")
        except Exception:  # noqa: BLE001 - the cluster changed meanwhile
            return []
        seqs = [self._keys.get(k) for r in per_worker.values() if isinstance(r, dict) for k in r]
        return [self._tasks[q].path for q in seqs if q is not None and q in self._tasks]

    def submit(self, task: Task) -> None:
        if not self._intake:
            raise EngineError("the engine is stopping; no new tasks")
        task = _absolute(task)  # a worker's working folder is not this process's
        self._tasks[task.seq] = task
        self._decided_tasks[task.seq] = task
        self._pending.append(task)
        self._feed()

    def stop_intake(self) -> list[Task]:
        """Stop handing out work; withdraw the tasks not yet started (here, or submitted but
        still queued on the cluster) and return them."""
        self._intake = False
        withdrawn = list(self._pending)
        self._pending.clear()
        if self._futures and self._client is not None:
            running = set(self.running())
            for seq, fut in list(self._futures.items()):
                task = self._tasks.get(seq)
                if task is not None and task.path not in running and not fut.done():
                    with contextlib.suppress(Exception):  # a client that lost its scheduler
                        fut.cancel()
                    self._forget(seq)
                    withdrawn.append(task)
        for t in withdrawn:
            self._tasks.pop(t.seq, None)
        return withdrawn

    def close(self, grace: float | None = None,
              abort: Callable[[], bool] | None = None) -> list[Result]:
        grace = self.settings.grace if grace is None else grace
        results: list[Result] = []
        if self._intake:
            self.stop_intake()
        deadline = time.monotonic() + grace
        while self._tasks and self._client is not None and time.monotonic() < deadline \
                and self._outage_since is None and not (abort and abort()):
            results += self.poll(min(0.1, max(0.0, deadline - time.monotonic())))
        for seq, fut in list(self._futures.items()):
            with contextlib.suppress(Exception):
                fut.cancel()
            self._forget(seq)
            if seq in self._tasks:
                results.append(failure(self._tasks.pop(seq), "cancelled",
                                        f"still running after the {grace:g} s grace period "
                                        "at shutdown; stopped"))
        for t in list(self._tasks.values()):
            results.append(failure(t, "cancelled", "the run stopped before this input finished"))
        self._tasks.clear()
        self._rpc.shutdown(wait=False, cancel_futures=True)
        self._connector.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=10)
            self._client = None
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close(timeout=10)
            self._cluster = None
        now = time.monotonic()
        for r in results:
            self._decided.extend((now, o.path) for o in self._outputs_of(r))
        # This run's tasks are all decided or cancelled (a cancelled task still running removes
        # what it writes itself: see run_task): their outputs need no temp file now.
        self._sweep(now, 0.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        return results

    # --- one coordinator tick -------------------------------------------------------------------

    def poll(self, timeout: float = 0.25, *, respawn: bool = True,
             wake: Sequence[Any] = ()) -> list[Result]:
        """Wait up to ``timeout`` for a finished task (or a ``wake`` descriptor); publish what
        finished, charge what crashed or hung, hand out more work. ``respawn`` is the local
        engine's; the cluster's nannies restart their workers themselves."""
        if self._done.empty() and not self._ready:
            fds = [self._wake_r, *wake]
            with contextlib.suppress(InterruptedError):
                select.select(fds, [], [], max(0.0, timeout))
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass
        self._watch_connection()
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        fetched = self._gather([f for _, f in done if f.status == "finished"]) \
            if self._outage_since is None else {}
        for key, fut in done:
            self._finished(key, fut, fetched)
        self._kill_stuck()
        self._feed()
        out, self._ready = self._ready, []
        now = time.monotonic()
        for r in out:
            self._decided.extend((now, o.path) for o in self._outputs_of(r))
        if now - self._last_sweep > SWEEP_DELAY:
            self._last_sweep = now
            self._sweep(now - SWEEP_DELAY, SWEEP_DELAY)
        return out

    def _outputs_of(self, r: Result) -> tuple[Any, ...]:
        task = self._decided_tasks.pop(r.seq, None)
        return task.outputs if task else ()

    def _sweep(self, before: float, min_age: float) -> None:
        """Remove temp files, untouched for ``min_age`` s, of outputs decided before ``before``:
        what a duplicate attempt of an already decided task wrote."""
        finals = []
        while self._decided and self._decided[0][0] <= before:
            finals.append(self._decided.popleft()[1])
        if finals:
            _remove_all_temps(finals, min_age=min_age)

    def _on_done(self, fut: Any) -> None:
        """Runs in the client's thread: pass the future to the coordinator's loop."""
        self._done.put((fut.key, fut))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _gather(self, futs: list[Any]) -> dict[str, Any]:
        """The results of finished futures, fetched in one round trip (per-future fetches cost
        a millisecond or more each); {} when that fails (then each is fetched alone)."""
        if len(futs) < 2:
            return {}
        try:
            values = self._client.gather(futs, errors="raise")
        except Exception:  # noqa: BLE001 - a result lost with its worker: fetch one by one
            return {}
        return {f.key: v for f, v in zip(futs, values, strict=True)}

    def _finished(self, key: str, fut: Any, fetched: Mapping[str, Any]) -> None:
        seq = self._keys.get(key)
        status = fut.status
        starts = self._starts.get(key, [])
        if status == "cancelled" and (seq is None or seq not in self._tasks):
            return  # cancelled here (a timeout, shutdown): already decided
        if seq is None or seq not in self._tasks:
            # An attempt this coordinator already decided or gave up on (timed out, or the task
            # ran twice): its temp files go, its result does not count.
            self.stats.duplicates += 1
            if status == "finished":
                with contextlib.suppress(Exception):
                    _remove_staged(fut.result(timeout=5))
            self._log.debug("engine.duplicate_result", key=key)
            return
        task = self._tasks[seq]
        if status == "cancelled" and self._client.status != "running":
            self._watch_connection()  # lost with the scheduler: back in line, uncharged
            if seq not in self._futures:
                return
        self._forget(seq)
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

        if isinstance(exc, KilledWorker) and not starts and self._intake and \
                self._unstarted_deaths.get(seq, 0) < UNSTARTED_RETRIES:
            # Its workers died while it waited on them, never started: not its fault. Run again
            # under a new key (a fresh count of Dask's), once: a task that kills its worker at
            # once can take its start event with it, and is charged the second time.
            self._unstarted_deaths[seq] = self._unstarted_deaths.get(seq, 0) + 1
            _remove_all_temps([o.path for o in task.outputs])
            self.stats.requeued += 1
            self._rerun.add(seq)
            self._pending.appendleft(task)
            self._log.info("file.requeued", input=task.path, why="the worker(s) it was assigned "
                           "to died before it started; not charged")
            return
        del self._tasks[seq]
        self._unstarted_deaths.pop(seq, None)
        if isinstance(exc, KilledWorker):
            self.stats.crashes += 1
            pid = starts[-1][0] if starts else 0
            # dask-local sets allowed-failures itself, so its tries are known
            tries = self.settings.crash_retries + 1 if self.settings.executor == "dask-local" \
                else 1
            self._ready.append(Result(
                seq=task.seq, path=task.path, ok=False, reason="worker-crashed",
                error=f"the worker died processing this input, on every try ({exc})",
                error_type="KilledWorker", duration=0.0, worker=pid,
                attempt=max(tries, len(starts))))
            _remove_all_temps([o.path for o in task.outputs])
            self._log.warning("worker.died", held=task.path, worker_pid=pid,
                              host=starts[-1][1] if starts else None, attempts=len(starts),
                              how=str(exc))
        else:
            self._ready.append(failure(task, "internal-error",
                                        f"the task failed on the cluster: "
                                        f"{type(exc).__name__}: {exc}"))

    def _lost_attempt(self, task: Task, why: str) -> None:
        """A finished task's result (kept on its worker until fetched) went with that worker,
        or the scheduler dropped the task: run it again, a bounded number of times."""
        self._lost[task.seq] = self._lost.get(task.seq, 0) + 1
        if self._lost[task.seq] > LOST_RETRIES or not self._intake:
            del self._tasks[task.seq]
            tries = self._lost.pop(task.seq)
            self._ready.append(
                failure(task, "worker-crashed", f"{why}; gave up after {tries} tries")
                if self._intake else failure(task, "cancelled", f"{why} during shutdown"))
            return
        _remove_all_temps([o.path for o in task.outputs])
        self.stats.requeued += 1
        self._rerun.add(task.seq)
        self._pending.appendleft(task)
        self._log.info("file.requeued", input=task.path, why=why)

    def _accept(self, task: Task, result: Result) -> None:
        """Publish a finished task's staged outputs under their final names (the coordinator's
        one job no task does); the task's one result."""
        del self._tasks[task.seq]
        self._lost.pop(task.seq, None)
        if not result.ok and result.reason == "missing" and os.path.exists(task.path):
            from dataclasses import replace  # noqa: PLC0415

            result = replace(result, reason="io-error", error=(
                f"{task.path} is here, where the coordinator runs, but the cluster worker "
                f"(pid {result.worker}) could not open it ({result.error}): inputs and outputs "
                "must be on storage every worker and the coordinator share, under the same "
                "absolute paths"))
        if not result.ok or not result.staged:
            self._ready.append(result)
            return
        written: list[str] = []
        pending = list(result.staged)
        try:
            while pending:
                tmp, final = pending[0]
                try:
                    publish(tmp, final, overwrite=task.overwrite, root=task.root)
                except FileNotFoundError:
                    raise RejectedInput(
                        "write-failed", f"{tmp} (written by a cluster worker) is not visible "
                        "here: inputs and outputs must be on storage every worker and the "
                        "coordinator share, under the same paths") from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                pending.pop(0)
                written.append(final)
            if task.sync_dir:
                for folder in {os.path.dirname(f) or "." for f in written}:
                    fsync_dir(folder)
        except (RejectedInput, OSError) as exc:
            _remove_staged_pairs(pending)
            reason, error = (exc.reason, exc.detail) if isinstance(exc, RejectedInput) \
                else ("write-failed", str(exc))
            self._ready.append(Result(seq=task.seq, path=task.path, ok=False,
                                      outputs=tuple(written), reason=reason, error=error,
                                      error_type=type(exc).__name__, duration=result.duration,
                                      worker=result.worker, attempt=task.attempt,
                                      bytes_in=result.bytes_in, bytes_out=0,
                                      warnings=result.warnings,
                                      peak_rss_kb=result.peak_rss_kb))
            return
        from dataclasses import replace  # noqa: PLC0415

        self._ready.append(replace(result, outputs=tuple(written), staged=()))
        if task.seq in self._rerun:
            self._rerun.discard(task.seq)
            remove_dead_temps([o.path for o in task.outputs], task.root)

    def _feed(self) -> None:
        if not self._intake or self._client is None or self._outage_since is not None:
            return
        self._refresh()
        room = self.settings.tasks_per_worker * max(1, self._threads) - len(self._futures)
        while room > 0 and self._pending:
            task = self._pending.popleft()
            if task.seq not in self._tasks:
                continue
            key = f"watcher-{task.seq}-{task.attempt}-{uuid.uuid4().hex[:8]}"
            fut = self._client.submit(run_task, task, key, self._digest, self._cfg,
                                      key=key, pure=False, retries=0)
            self._futures[task.seq] = fut
            self._keys[key] = task.seq
            fut.add_done_callback(self._on_done)
            room -= 1

    def _kill_stuck(self) -> None:
        """Charge ``timeout`` to a task running past the limit: cancel it, restart its worker."""
        now = time.monotonic()
        if not self._futures or self._outage_since is not None:
            return
        if self._look is None:
            if now - self._last_look < MONITOR_INTERVAL:
                return
            self._last_look = now
            client = self._client
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
        limit = self.settings.task_timeout
        # Measured on this process's clock from the first look that found the task running:
        # the workers' clocks are theirs (skewed, stepped), and never compared with ours.
        for addr, running in per_worker.items():
            if not isinstance(running, dict):
                continue
            for key, (_, pid, host) in running.items():
                seq = self._keys.get(key)
                if seq is None or seq not in self._tasks:
                    continue
                since = self._running_since.setdefault(key, now)
                if now - since <= limit:
                    continue
                task = self._tasks.pop(seq)
                fut = self._futures.get(seq)
                self._forget(seq)
                if fut is not None:
                    fut.cancel()
                self.stats.timeouts += 1
                self._log.warning("worker.restarting", worker_address=addr, held=task.path,
                                  why=f"still running after {limit:g} s")
                with contextlib.suppress(Exception):
                    self._client.restart_workers([addr], timeout=30, raise_for_error=False)
                self.stats.restarts += 1
                for o in task.outputs:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp_name(o.path, pid, host))
                self._ready.append(failure(task, "timeout", f"still running after {limit:g} "
                                            f"s; its worker {addr} was restarted", worker=pid))

    # --- outages --------------------------------------------------------------------------------

    def _address(self) -> str:
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                return str(self._cluster.scheduler_address)
        return self.settings.scheduler

    def _watch_connection(self) -> None:
        """Notice a lost scheduler (the client reconnecting, or closed after its own tries),
        put the tasks it held back in line uncharged, reconnect with back-off, and resume; give
        up on the tasks in hand after ``cluster_wait`` seconds of outage (or of no worker)."""
        if self._client is None:
            return
        now = time.monotonic()
        if self._connect is not None:
            if self._connect.done():
                fut, self._connect = self._connect, None
                try:
                    client = fut.result()
                except Exception as exc:  # noqa: BLE001 - not back yet: try again later
                    self._next_connect = now + self._connect_delay
                    self._connect_delay = min(RECONNECT_MAX, self._connect_delay * 2)
                    self._log.debug("cluster.reconnect_failed", error=f"{exc}"[:200])
                else:
                    old, self._client = self._client, client
                    with contextlib.suppress(Exception):
                        old.close(timeout=1)
                    self._subscribe()
                    self._outage_over("a new connection")
                    return
        else:
            status = self._client.status
            if status == "running":
                if self._outage_since is not None:
                    self._outage_over("the client reconnected")
                self._check_wait(now)
                return
            if self._outage_since is None:
                self._outage_began(status)
            if status in ("closed", "closing") and now >= self._next_connect:
                self._connect = self._connector.submit(self._connect_again)
        self._check_wait(now)

    def _connect_again(self) -> Any:
        """In the connector's thread: a new client of the same scheduler."""
        from distributed import Client  # noqa: PLC0415

        return Client(self._address())  # distributed.comm.timeouts.connect, as at start

    def _outage_began(self, status: str) -> None:
        self._outage_since = time.monotonic()
        self._outage_why = f"client {status}"
        back = [self._tasks[q] for q in list(self._futures) if q in self._tasks]
        for seq in list(self._futures):
            self._forget(seq)
        self._pending.extendleft(reversed(back))
        self._rerun.update(t.seq for t in back)
        self.stats.requeued += len(back)
        self._workers = 0
        self._addresses = set()  # whatever comes back is a new cluster: no worker.died for it
        self._log.warning("cluster.lost", scheduler=self._address(), status=status,
                          requeued=len(back), waiting=len(self._tasks),
                          wait_s=self._wait or "for ever",
                          why="the scheduler cannot be reached: its tasks are kept and run "
                              "again, uncharged, once it is back")

    def _subscribe(self) -> None:
        with contextlib.suppress(Exception):
            self._client.subscribe_topic(START_TOPIC, self._on_start)

    def _on_start(self, event: Any) -> None:
        """Runs in the client's thread: a task attempt started on a worker."""
        with contextlib.suppress(Exception):
            msg = event[1]
            self._starts.setdefault(str(msg["key"]), []).append((int(msg["pid"]),
                                                                 str(msg["host"])))

    def _outage_over(self, how: str) -> None:
        since = self._outage_since or time.monotonic()
        self._outage_since = None
        self._connect_delay, self._next_connect = RECONNECT_FIRST, 0.0
        self._refresh(force=True)
        self._log.info("cluster.reconnected", scheduler=self._address(), how=how,
                       after_s=round(time.monotonic() - since, 1), workers=self._workers,
                       waiting=len(self._tasks))
        self._feed()

    def _check_wait(self, now: float) -> None:
        """After ``cluster_wait`` seconds without a scheduler, or without a worker, the tasks in
        hand are given up (cancelled: not the inputs' fault)."""
        since = self._outage_since if self._outage_since is not None else self._idle_since
        if not self._wait or since is None or now - since <= self._wait or not self._tasks:
            return
        what = "its scheduler could not be reached" if self._outage_since is not None \
            else "it had no worker"
        self._log.error("cluster.gave_up", scheduler=self._address(), tasks=len(self._tasks),
                        why=f"{what} for {self._wait:g} s (cluster_wait)")
        for seq in list(self._futures):
            with contextlib.suppress(Exception):
                self._futures[seq].cancel()
            self._forget(seq)
        self._pending.clear()
        for task in list(self._tasks.values()):
            self._ready.append(failure(task, "cancelled", f"the Dask cluster at "
                                        f"{self._address()}: {what} for {self._wait:g} s "
                                        "(cluster_wait)"))
        self._tasks.clear()

    # --- helpers --------------------------------------------------------------------------------

    def _forget(self, seq: int) -> None:
        fut = self._futures.pop(seq, None)
        if fut is not None:
            self._keys.pop(fut.key, None)
            self._running_since.pop(fut.key, None)
            self._starts.pop(fut.key, None)

    def _refresh(self, force: bool = False) -> None:
        """The cluster's size, looked up at most once a second (back-pressure, health)."""
        now = time.monotonic()
        if self._client is None or (not force and now - getattr(self, "_sized", 0.0) < 1.0):
            return
        self._sized = now
        if self._outage_since is not None:
            return
        with contextlib.suppress(Exception):
            info = self._client.scheduler_info(n_workers=-1)["workers"]
            gone = sorted(set(self._addresses) - set(info))
            if gone:
                self._log.warning("worker.died", worker_addresses=gone, workers_left=len(info),
                                  why="the scheduler lost these workers; their tasks run "
                                      "again (only those that had started are charged)")
            self._addresses = set(info)
            self._workers = len(info)
            self._threads = sum(int(w.get("nthreads", 1)) for w in info.values()) or 1
        if self._workers == 0 and self._tasks and self._idle_since is None:
            self._idle_since = now
            self._log.warning("cluster.no_workers", scheduler=self._address(),
                              waiting=len(self._tasks),
                              why="the cluster has no worker; its tasks wait for one")
        elif self._workers and self._idle_since is not None:
            self._log.info("cluster.workers_back", workers=self._workers,
                           after_s=round(now - self._idle_since, 1))
            self._idle_since = None


def _absolute(task: Task) -> Task:
    """``task`` with every path absolute, as this process sees it."""
    from dataclasses import replace  # noqa: PLC0415

    from watcher.tasks import OutputPlan  # noqa: PLC0415

    return replace(task, path=os.path.abspath(task.path),
                   outputs=tuple(OutputPlan(pipeline=o.pipeline, path=os.path.abspath(o.path))
                                 for o in task.outputs),
                   root=os.path.abspath(task.root) if task.root else "")


def _remove_staged(result: Any) -> None:
    if isinstance(result, Result):
        _remove_staged_pairs(list(result.staged))


def _remove_staged_pairs(pairs: list[tuple[str, str]]) -> None:
    for tmp, _ in pairs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _remove_all_temps(finals: list[str], min_age: float = 0.0) -> None:
    """Temp files any attempt left for these outputs (workers that died, tasks run twice),
    untouched for ``min_age`` seconds. One directory scan per folder, by descriptor (a folder
    of the path swapped for a link is not entered)."""
    from watcher.fs import safefs  # noqa: PLC0415
    from watcher.fs.files import temp_owner  # noqa: PLC0415

    by_folder: dict[str, set[str]] = {}
    for final in finals:
        folder, name = os.path.split(final)
        by_folder.setdefault(folder or ".", set()).add(name)
    now = time.time()
    for folder, names in by_folder.items():
        try:
            found = safefs.locate(folder)
            fd = safefs.open_dir(found[0], found[1]) if found is not None else \
                os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in os.listdir(fd):
                if temp_owner(name) is None or name[1:].rsplit(".", 3)[0] not in names:
                    continue
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if min_age and now - st.st_mtime < min_age:
                        continue
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)

