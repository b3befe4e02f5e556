"""The Dask executor's connection to its cluster: ``ClusterLink``.

It connects (to the scheduler at ``settings.scheduler``, or to a ``LocalCluster`` it starts for
``dask-local``) and watches the connection: when the scheduler is lost (the client reconnecting,
or closed after its own tries) its owner puts the tasks it held back in line, uncharged; the
link reconnects with back-off and has its owner resume. After ``cluster_wait`` seconds with no
scheduler, or no worker, while tasks wait, it has its owner give up the tasks in hand. It also
keeps what the coordinator knows of the cluster: its size (workers, threads: back-pressure and
health, looked up at most once a second), its workers' pids by host (whose temp files are
whose), and the start events tasks send (``clustertask.START_TOPIC``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from watcher.engine.clustertask import START_TOPIC, whoami
from watcher.engine.executor import EngineError
from watcher.fs.files import HOST
from watcher.settings.schema import EngineSettings

RECONNECT_FIRST, RECONNECT_MAX = 1.0, 30.0  # back-off between reconnections to a lost scheduler


class ClusterLink:
    """The coordinator's connection to the scheduler (see the module docstring). Its owner
    tells it how many tasks wait (``waiting``) and acts on what it finds: ``requeue`` the tasks
    the lost scheduler held (how many), ``resume`` once it is back, ``give_up`` the tasks in hand
    (why)."""

    def __init__(self, settings: EngineSettings, log: Any, *, waiting: Callable[[], int],
                 requeue: Callable[[], int], resume: Callable[[], None],
                 give_up: Callable[[str], None]) -> None:
        self.settings = settings
        self._log = log
        self._waiting, self._requeue, self._resume, self._give_up = \
            waiting, requeue, resume, give_up
        self.client: Any = None
        self.cluster: Any = None  # the LocalCluster of dask-local
        self.threads = 1
        self.workers = 0
        self._addresses: set[str] = set()  # the workers the last look found
        self._worker_pids: dict[str, set[int]] | None = None  # host -> its workers' pids
        self._sized = 0.0
        # key -> [(pid, host)] of each start of that attempt's task (Dask may start one key
        # again elsewhere after its worker died), from the tasks' START_TOPIC events; written
        # by the client's thread
        self.starts: dict[str, list[tuple[int, str]]] = {}
        # Outages: since when (this clock) the scheduler cannot be reached, or the cluster has
        # no worker while tasks wait; a reconnection in progress (its own thread: a connect
        # may take its whole timeout) and when the next one may start.
        self.outage_since: float | None = None
        self.outage_why = ""
        self._idle_since: float | None = None
        self._connect: concurrent.futures.Future[Any] | None = None
        self._connector = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dask-connect")
        self._next_connect = 0.0
        self._connect_delay = RECONNECT_FIRST
        # 0: wait for ever (the daemon); a batch gives up after this many seconds
        self._wait = settings.cluster_wait or 0.0

    def connect(self) -> None:
        """Start the ``dask-local`` cluster, or reach the scheduler (``EngineError`` if not)."""
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
                self.cluster = LocalCluster(
                    n_workers=s.workers, threads_per_worker=1, processes=True,
                    host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(s.scheduler)  # distributed.comm.timeouts.connect
            except OSError as exc:
                raise EngineError(f"cannot reach the Dask scheduler at {s.scheduler}: "
                                  f"{exc}") from exc

    def close(self) -> None:
        self._connector.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(timeout=10)
            self.client = None
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=10)
            self.cluster = None

    def address(self) -> str:
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                return str(self.cluster.scheduler_address)
        return self.settings.scheduler

    # --- what the coordinator knows of the cluster ----------------------------------------------

    def writer_gone(self, host: str, pid: int) -> bool:
        """Whether the process ``pid`` of ``host`` that a temp file names is gone: on this host,
        when it no longer runs; on a host of the cluster, when it is none of its workers now
        (only cluster workers write there for a cluster's tasks); elsewhere, not known (no)."""
        from watcher.fs.files import running  # noqa: PLC0415

        if host == HOST:
            return not running(pid)
        if self.client is None:
            return False
        if self._worker_pids is None:
            try:
                found = self.client.run(whoami, on_error="return")
                self._worker_pids = {}
                for v in found.values():
                    if isinstance(v, tuple):
                        self._worker_pids.setdefault(v[0], set()).add(v[1])
            except Exception:  # noqa: BLE001 - not known: nothing is judged gone
                return False
        pids = self._worker_pids.get(host)
        return pids is not None and pid not in pids

    def pids(self) -> list[int]:
        """The worker processes' pids (this machine's cluster only)."""
        if self.cluster is None or self.client is None:
            return []
        with contextlib.suppress(Exception):
            return sorted(self.client.run(os.getpid).values())
        return []

    def worker_addresses(self) -> list[str]:
        return sorted(self.client.scheduler_info()["workers"]) if self.client else []

    def refresh(self, force: bool = False) -> None:
        """The cluster's size, looked up at most once a second (back-pressure, health)."""
        now = time.monotonic()
        if self.client is None or (not force and now - self._sized < 1.0):
            return
        self._sized = now
        if self.outage_since is not None:
            return
        with contextlib.suppress(Exception):
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            gone = sorted(set(self._addresses) - set(info))
            if gone:
                self._log.warning("worker.died", worker_addresses=gone, workers_left=len(info),
                                  why="the scheduler lost these workers; their tasks run "
                                      "again (only those that had started are charged)")
            self._addresses = set(info)
            self.workers = len(info)
            self.threads = sum(int(w.get("nthreads", 1)) for w in info.values()) or 1
        if self.workers == 0 and self._waiting() and self._idle_since is None:
            self._idle_since = now
            self._log.warning("cluster.no_workers", scheduler=self.address(),
                              waiting=self._waiting(),
                              why="the cluster has no worker; its tasks wait for one")
        elif self.workers and self._idle_since is not None:
            self._log.info("cluster.workers_back", workers=self.workers,
                           after_s=round(now - self._idle_since, 1))
            self._idle_since = None

    def subscribe(self) -> None:
        """Receive the tasks' start events (``starts``)."""
        with contextlib.suppress(Exception):
            self.client.subscribe_topic(START_TOPIC, self._on_start)

    def _on_start(self, event: Any) -> None:
        """Runs in the client's thread: a task attempt started on a worker."""
        with contextlib.suppress(Exception):
            msg = event[1]
            self.starts.setdefault(str(msg["key"]), []).append((int(msg["pid"]),
                                                                str(msg["host"])))

    # --- outages --------------------------------------------------------------------------------

    def watch(self) -> None:
        """Notice a lost scheduler (the client reconnecting, or closed after its own tries),
        put the tasks it held back in line uncharged, reconnect with back-off, and resume; give
        up on the tasks in hand after ``cluster_wait`` seconds of outage (or of no worker)."""
        if self.client is None:
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
                    old, self.client = self.client, client
                    with contextlib.suppress(Exception):
                        old.close(timeout=1)
                    self.subscribe()
                    self._outage_over("a new connection")
                    return
        else:
            status = self.client.status
            if status == "running":
                if self.outage_since is not None:
                    self._outage_over("the client reconnected")
                self._check_wait(now)
                return
            if self.outage_since is None:
                self._outage_began(status)
            if status in ("closed", "closing") and now >= self._next_connect:
                self._connect = self._connector.submit(self._connect_again)
        self._check_wait(now)

    def _connect_again(self) -> Any:
        """In the connector's thread: a new client of the same scheduler."""
        from distributed import Client  # noqa: PLC0415

        return Client(self.address())  # distributed.comm.timeouts.connect, as at start

    def _outage_began(self, status: str) -> None:
        self.outage_since = time.monotonic()
        self.outage_why = f"client {status}"
        requeued = self._requeue()
        self.workers = 0
        self._addresses = set()  # whatever comes back is a new cluster: no worker.died for it
        self._log.warning("cluster.lost", scheduler=self.address(), status=status,
                          requeued=requeued, waiting=self._waiting(),
                          wait_s=self._wait or "for ever",
                          why="the scheduler cannot be reached: its tasks are kept and run "
                              "again, uncharged, once it is back")

    def _outage_over(self, how: str) -> None:
        since = self.outage_since or time.monotonic()
        self.outage_since = None
        self._connect_delay, self._next_connect = RECONNECT_FIRST, 0.0
        self.refresh(force=True)
        self._log.info("cluster.reconnected", scheduler=self.address(), how=how,
                       after_s=round(time.monotonic() - since, 1), workers=self.workers,
                       waiting=self._waiting())
        self._resume()

    def _check_wait(self, now: float) -> None:
        """After ``cluster_wait`` seconds without a scheduler, or without a worker, the tasks in
        hand are given up (cancelled: not the inputs' fault)."""
        since = self.outage_since if self.outage_since is not None else self._idle_since
        if not self._wait or since is None or now - since <= self._wait or not self._waiting():
            return
        what = "its scheduler could not be reached" if self.outage_since is not None \
            else "it had no worker"
        self._log.error("cluster.gave_up", scheduler=self.address(), tasks=self._waiting(),
                        why=f"{what} for {self._wait:g} s (cluster_wait)")
        self._give_up(f"the Dask cluster at {self.address()}: {what} for {self._wait:g} s "
                      "(cluster_wait)")
