"""What the parts of one running daemon share: the settings in force (replaced on reload), its
folders, its engines, the counters of its ``daemon.stopped`` line and heartbeat, its metrics,
its notifications and its log; and the claims it holds (``InFlight``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from watcher import log
from watcher.config import Settings
from watcher.errors import ConfigError
from watcher.fs.naming import OutputNames
from watcher.imaging.pipeline import Pipeline
from watcher.ops.metrics import Metrics
from watcher.ops.status import Board
from watcher.ops.webhooks import Notifications
from watcher.watch.claiming import Claim
from watcher.watch.duplicates import Seen
from watcher.watch.lifecycle import Folders
from watcher.watch.qindex import QuarantineIndex

if TYPE_CHECKING:
    from watcher.engine.executor import Executor


class Context:
    """One daemon run's shared state; the parts read the settings here, never a copy, so that a
    reload reaches them all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.folders = folders_of(settings)
        self.log = log.get("watcher.watch.daemon")
        self.engine: Executor | None = None
        self.draining: list[Executor] = []  # engines replaced by a reload, finishing their files
        self.counts = {"processed": 0, "quarantined": 0, "retried": 0, "skipped": 0,
                       "reconcile_found": 0, "gave_up": 0, "overflows": 0}
        self.metrics = Metrics()
        self.metrics.know_pipelines(p.name for p in self.pipelines)
        # each fate's document, to [notify]'s webhook and/or command (off without either)
        self.notify = Notifications(lambda: self.settings.notify, self.metrics,
                                    log.get("watcher.notify"))
        self.board = Board()  # what the status page and ``watcher status`` show
        self.quarantine_index = QuarantineIndex(self.folders.quarantine)
        self._seen: Seen | None = None

    def seen(self) -> Seen:
        """The database of processed inputs, opened on first use: in the work folder, or with
        several instances in the one that holds theirs (they share it)."""
        if self._seen is None:
            self._seen = Seen(self.folders.work_root or self.folders.work,
                              self.settings.watch.duplicates_max_age)
        self._seen.max_age = self.settings.watch.duplicates_max_age  # (a reload may change it)
        return self._seen

    @property
    def pipelines(self) -> tuple[Pipeline, ...]:
        return self.settings.select([])

    @property
    def max_in_flight(self) -> int:
        return self.settings.watch.max_in_flight or 4 * self.settings.engine.workers


class InFlight:
    """The claims this daemon holds and has not decided yet, and the output names they hold."""

    def __init__(self) -> None:
        self.claims: dict[int, Claim] = {}  # handed to the engine, by seq
        self.rels: set[str] = set()  # every held claim's inbox-relative name: one per name
        self.retry: list[Claim] = []  # transient failures waiting for their back-off
        self.names = OutputNames()  # the outputs each claim holds, by claim seq
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def forget(self, c: Claim) -> None:
        self.rels.discard(c.rel)
        self.claims.pop(c.seq, None)
        self.names.release(c.seq)

    def retrying(self) -> list[Claim]:
        """Claims that failed for reasons not their own: waiting for their back-off, or being
        tried again now."""
        return self.retry + [c for c in self.claims.values() if c.transient_failures]


def folders_of(s: Settings) -> Folders:
    """The daemon's folders; with an instance name, its own work folder below ``work``."""
    ws = s.watch
    return Folders(ws.folders(), work_root=ws.work if ws.instance else None)


def for_watch(settings: Settings) -> Settings:
    """``settings``, refused where watch mode cannot honour them."""
    if settings.engine.start_method == "fork":
        raise ConfigError("engine.start_method", "'fork' is not safe in watch mode (the inbox "
                          "observer runs threads); use auto, forkserver or spawn")
    return settings
