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

This module owns ``DaskEngine``: the executor's interface, its lifecycle, the coordinator's tick,
handing tasks out (back-pressure) and charging timeouts. Its parts: ``clustertask`` (what runs in
the workers), ``clusterlink`` (the connection to the scheduler, outages), ``clusterledger`` (the
tasks, their attempts, the decision on each), ``clustertimeouts`` (finding tasks past the limit)
and ``clusterfiles`` (publishing staged outputs, removing temp files).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import queue
import select
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from watcher import log
from watcher.engine.clusterfiles import TempSweeper
from watcher.engine.clusterledger import Ledger
from watcher.engine.clusterlink import ClusterLink
from watcher.engine.clustertask import check_worker, run_task, running_tasks
from watcher.engine.clustertimeouts import StuckMonitor
from watcher.engine.executor import EngineError, Executor, Stats, failure
from watcher.fs.files import temp_name
from watcher.imaging.pipeline import Pipeline
from watcher.settings.schema import DecodeLimits, EngineSettings
from watcher.tasks import Result, Task


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
        self.stats = Stats()
        self._log = log.get("watcher.engine.cluster")
        self._log_level = log_level
        self._monitor = StuckMonitor(settings.task_timeout)
        self._link = ClusterLink(settings, self._log, waiting=lambda: len(self._ledger.tasks),
                                 requeue=self._requeue, resume=self._feed, give_up=self._give_up)
        self._ledger = Ledger(settings, self.stats, self._log, self._link, self._monitor)
        self._sweeper = TempSweeper()
        # finished futures, handed over by the client's thread, which wakes poll's select
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        link = self._link
        link.connect()
        try:
            hosts = link.client.run(check_worker, self._digest, self._cfg)
        except Exception as exc:
            self.close(0)
            raise EngineError(f"Dask workers cannot load the pipelines: {type(exc).__name__}: "
                              f"{exc} (install watcher and the transforms' modules on every "
                              "worker)") from exc
        link.subscribe()
        link.refresh(force=True)
        self.stats.started = link.workers
        self._log.info("cluster.connected", executor=self.settings.executor,
                       scheduler=link.client.scheduler.address, workers=link.workers,
                       threads=link.threads, hosts=sorted(set(hosts.values())))

    def writer_gone(self, host: str, pid: int) -> bool:
        return self._link.writer_gone(host, pid)

    @property
    def outstanding(self) -> int:
        return len(self._ledger.tasks)

    @property
    def workers_alive(self) -> int:
        self._link.refresh()
        return self._link.workers

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids (this machine's cluster only)."""
        return self._link.pids()

    @property
    def worker_addresses(self) -> list[str]:
        return self._link.worker_addresses()

    def problems(self) -> list[str]:
        """What is wrong at this moment, one line each ([]: nothing), as ``Engine.problems``.

        Timeouts are enforced by ``_kill_stuck`` (Dask restarts the worker), and a task's thread
        cannot outlive its worker process here, so the one thing to report is a cluster left
        with no worker while tasks wait. No call to the cluster is made (cached figures)."""
        link, tasks = self._link, self._ledger.tasks
        if link.outage_since is not None:
            return [f"the Dask scheduler at {link.address()} cannot be reached "
                    f"({link.outage_why}) for {time.monotonic() - link.outage_since:.0f} s; "
                    f"{len(tasks)} task(s) wait; reconnecting"]
        if link.client is not None and self._ledger.intake and tasks and link.workers == 0:
            return [f"the cluster has no worker; {len(tasks)} task(s) wait"]
        return []

    def running(self) -> list[str]:
        """The inputs being processed at this moment, on any worker."""
        try:
            per_worker = self._link.client.run(running_tasks, on_error="return")
        except Exception:  # noqa: BLE001 - the cluster changed meanwhile
            return []
        led = self._ledger
        seqs = [led.keys.get(k) for r in per_worker.values() if isinstance(r, dict) for k in r]
        return [led.tasks[q].path for q in seqs if q is not None and q in led.tasks]

    def submit(self, task: Task) -> None:
        if not self._ledger.intake:
            raise EngineError("the engine is stopping; no new tasks")
        task = _absolute(task)  # a worker's working folder is not this process's
        self._ledger.add(task)
        self._sweeper.track(task)
        self._feed()

    def stop_intake(self) -> list[Task]:
        """Stop handing out work; withdraw the tasks not yet started (here, or submitted but
        still queued on the cluster) and return them."""
        led = self._ledger
        led.intake = False
        withdrawn = list(led.pending)
        led.pending.clear()
        if led.futures and self._link.client is not None:
            running = set(self.running())
            for seq, fut in list(led.futures.items()):
                task = led.tasks.get(seq)
                if task is not None and task.path not in running and not fut.done():
                    with contextlib.suppress(Exception):  # a client that lost its scheduler
                        fut.cancel()
                    led.forget(seq)
                    withdrawn.append(task)
        for t in withdrawn:
            led.tasks.pop(t.seq, None)
        return withdrawn

    def close(self, grace: float | None = None,
              abort: Callable[[], bool] | None = None) -> list[Result]:
        grace = self.settings.grace if grace is None else grace
        led, link = self._ledger, self._link
        results: list[Result] = []
        if led.intake:
            self.stop_intake()
        deadline = time.monotonic() + grace
        while led.tasks and link.client is not None and time.monotonic() < deadline \
                and link.outage_since is None and not (abort and abort()):
            results += self.poll(min(0.1, max(0.0, deadline - time.monotonic())))
        for seq, fut in list(led.futures.items()):
            with contextlib.suppress(Exception):
                fut.cancel()
            led.forget(seq)
            if seq in led.tasks:
                results.append(failure(led.tasks.pop(seq), "cancelled",
                                       f"still running after the {grace:g} s grace period "
                                       "at shutdown; stopped"))
        for t in list(led.tasks.values()):
            results.append(failure(t, "cancelled", "the run stopped before this input finished"))
        led.tasks.clear()
        self._monitor.shutdown()
        link.close()
        now = time.monotonic()
        self._sweeper.decided(results, now)
        # This run's tasks are all decided or cancelled (a cancelled task still running removes
        # what it writes itself: see run_task): their outputs need no temp file now.
        self._sweeper.sweep(now, 0.0)
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
        if self._done.empty() and not self._ledger.ready:
            fds = [self._wake_r, *wake]
            with contextlib.suppress(InterruptedError):
                select.select(fds, [], [], max(0.0, timeout))
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass
        self._link.watch()
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        fetched = self._gather([f for _, f in done if f.status == "finished"]) \
            if self._link.outage_since is None else {}
        for key, fut in done:
            self._ledger.finished(key, fut, fetched)
        self._kill_stuck()
        self._feed()
        out, self._ledger.ready = self._ledger.ready, []
        now = time.monotonic()
        self._sweeper.decided(out, now)
        self._sweeper.tick(now)
        return out

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
            values = self._link.client.gather(futs, errors="raise")
        except Exception:  # noqa: BLE001 - a result lost with its worker: fetch one by one
            return {}
        return {f.key: v for f, v in zip(futs, values, strict=True)}

    def _feed(self) -> None:
        led, link = self._ledger, self._link
        if not led.intake or link.client is None or link.outage_since is not None:
            return
        link.refresh()
        room = self.settings.tasks_per_worker * max(1, link.threads) - len(led.futures)
        while room > 0 and led.pending:
            task = led.pending.popleft()
            if task.seq not in led.tasks:
                continue
            key = f"watcher-{task.seq}-{task.attempt}-{uuid.uuid4().hex[:8]}"
            fut = link.client.submit(run_task, task, key, self._digest, self._cfg,
                                     key=key, pure=False, retries=0)
            led.futures[task.seq] = fut
            led.keys[key] = task.seq
            fut.add_done_callback(self._on_done)
            room -= 1

    def _requeue(self) -> int:
        """The link lost the scheduler: the tasks it held go back in line (how many)."""
        return self._ledger.requeue_in_flight()

    def _give_up(self, why: str) -> None:
        """The link waited ``cluster_wait`` in vain: the tasks in hand are cancelled."""
        self._ledger.give_up(why)

    def _kill_stuck(self) -> None:
        """Charge ``timeout`` to a task running past the limit: cancel it, restart its worker."""
        now = time.monotonic()
        led = self._ledger
        if not led.futures or self._link.outage_since is not None:
            return
        for addr, seq, pid, host in self._monitor.overdue(self._link.client, now, led.keys,
                                                          led.tasks):
            limit = self.settings.task_timeout
            task = led.tasks.pop(seq)
            fut = led.futures.get(seq)
            led.forget(seq)
            if fut is not None:
                fut.cancel()
            self.stats.timeouts += 1
            self._log.warning("worker.restarting", worker_address=addr, held=task.path,
                              why=f"still running after {limit:g} s")
            with contextlib.suppress(Exception):
                self._link.client.restart_workers([addr], timeout=30, raise_for_error=False)
            self.stats.restarts += 1
            for o in task.outputs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_name(o.path, pid, host))
            led.ready.append(failure(task, "timeout", f"still running after {limit:g} "
                                     f"s; its worker {addr} was restarted", worker=pid))


def _absolute(task: Task) -> Task:
    """``task`` with every path absolute, as this process sees it."""
    from dataclasses import replace  # noqa: PLC0415

    from watcher.tasks import OutputPlan  # noqa: PLC0415

    return replace(task, path=os.path.abspath(task.path),
                   outputs=tuple(OutputPlan(pipeline=o.pipeline, path=os.path.abspath(o.path))
                                 for o in task.outputs),
                   root=os.path.abspath(task.root) if task.root else "")
