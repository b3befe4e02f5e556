"""The daemon's beat: once a second the heartbeat file, the gauges and systemd's STATUS; every
tick the systemd watchdog ping; as PID 1 (a container), reaping adopted orphans. And the
test-only stall hook that wedges the loop (no ticks, no pings) while a file exists.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from watcher import compat, log
from watcher.ops import health
from watcher.ops.metrics import Metrics
from watcher.ops.notify import Notifier

BEAT = 1.0  # seconds between heartbeats (file, STATUS)
STALL_HOOK = "WATCHER_DEBUG_STALL_FILE"  # tests: while this file exists, the loop is wedged


@dataclass(frozen=True, kw_only=True)
class Report:
    """What one beat says about the daemon."""

    in_flight: int  # claims handed to the engine
    queue_depth: int  # claims held: in flight, waiting to retry, or waiting for their move
    retrying: int
    pending: int  # files seen in the inbox, not yet claimed
    deferred: int
    workers_alive: int
    restarts: int | None  # the engine's worker restarts so far (None: no engine)
    problems: tuple[str, ...]
    counts: Mapping[str, int]
    status: str  # systemd's STATUS line


class Heartbeat:
    """Beats for one daemon: ``report`` says what to write, ``work`` is the work folder;
    ``own_pids`` names the engine's processes, which PID 1 never reaps (asked only then: on a
    cluster it is a round trip to every worker). ``publish(state, report)``, called each beat,
    gives the further fields the heartbeat carries (the status ``watcher status`` reads)."""

    def __init__(self, work: str, metrics: Metrics, report: Callable[[], Report],
                 own_pids: Callable[[], Iterable[int]], logger: log.Logger,
                 publish: Callable[[str, Report], Mapping[str, Any]] | None = None) -> None:
        self.path = health.heartbeat_path(work)
        self.notifier = Notifier()
        self.failures = 0  # heartbeat writes failed in a row
        self._metrics = metrics
        self._report = report
        self._own_pids = own_pids
        self._publish = publish
        self._log = logger
        self._next_beat = 0.0
        self._restarts_seen = 0
        self._stall_file = os.environ.get(STALL_HOOK, "")

    def problem(self) -> str:
        """Why the heartbeat is not being written, as one problem line ("" when it is)."""
        if not self.failures:
            return ""
        return (f"the heartbeat cannot be written ({self.failures} failure(s) in a row): the "
                "work folder's disk is full or unwritable")

    def beat(self, force: bool = False, state: str = "running") -> None:
        """Once a second: heartbeat file, gauges, STATUS; every tick: the systemd watchdog."""
        now = time.monotonic()
        self._metrics.last_tick = now
        self.notifier.ping(now)
        if not force and now < self._next_beat:
            return
        self._next_beat = now + BEAT
        r = self._report()
        m = self._metrics
        m.in_flight.set(r.queue_depth)
        m.retry_waiting.set(r.retrying)
        m.pending.set(r.pending)
        m.workers.set(r.workers_alive)
        if r.restarts is not None and r.restarts > self._restarts_seen:
            m.restarts.inc(r.restarts - self._restarts_seen)
            self._restarts_seen = r.restarts
        if r.problems and state == "running":
            state = "degraded"
        extra = self._publish(state, r) if self._publish is not None else {}
        try:
            health.write(self.path, {
                "state": state, "in_flight": r.in_flight, "pending": r.pending,
                "retrying": r.retrying, "deferred": r.deferred,
                "problems": list(r.problems), "workers_alive": r.workers_alive, **r.counts,
                **extra})
            self.failures = 0
        except OSError as exc:
            # A full disk must not make a live daemon look dead: the old heartbeat's time is
            # refreshed (no space needed), and the write is tried again next second.
            self.failures += 1
            touched = health.touch(self.path)
            if self.failures == 1 or self.failures % 60 == 0:
                self._log.warning("heartbeat.write_failed", error=str(exc),
                                  failures=self.failures, touched=touched)
        self.notifier.status(r.status)
        if os.getpid() == 1:
            compat.reap_orphans(self._own_pids())

    def stopped(self) -> None:
        """The last heartbeat: the daemon has stopped (a failed write is no matter now)."""
        with contextlib.suppress(OSError):
            health.write(self.path, {"state": "stopped"})

    def stall_if_asked(self) -> None:
        if self._stall_file and os.path.exists(self._stall_file):
            self._log.warning("daemon.stalling", hook=STALL_HOOK, path=self._stall_file)
            while os.path.exists(self._stall_file):  # no ticks, no pings: a wedged supervisor
                time.sleep(0.2)
