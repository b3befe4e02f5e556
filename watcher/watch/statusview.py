"""The daemon's status as one document, made once a second by its loop: state and why, counts,
the queue (each claim running, queued in the engine or waiting to retry with its next try),
each worker with its file, the last fates and the quarantine's counts. The heartbeat carries a
short form (``brief``) so that ``watcher status`` works without the page; the page's server
threads read the full one (``latest``), replaced whole each second, never built per request.

Also the page's actions on the quarantine (``Actions``): by the index's ids only, never by a
path a request names.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from watcher.errors import ConfigError
from watcher.ops.status import Board
from watcher.watch import lifecycle
from watcher.watch.qindex import QuarantineIndex

if TYPE_CHECKING:
    from watcher.ops.heartbeat import Report
    from watcher.watch.context import Context, InFlight
    from watcher.watch.fates import Fates
    from watcher.watch.intake import Intake

VERSION = 1  # of the document's layout
LIST_MAX = 100  # claims listed at most (the rest are counted)
BRIEF_FATES = 10  # fates the heartbeat carries
BRIEF_RETRY = 20  # claims waiting to retry the heartbeat names


class StatusView:
    """Builds the status document from the daemon's parts."""

    def __init__(self, ctx: Context, held: InFlight, fates: Fates, intake: Intake) -> None:
        self.ctx, self.held, self.fates, self.intake = ctx, held, fates, intake
        self.board: Board = ctx.board
        self.index: QuarantineIndex = ctx.quarantine_index
        self.url = ""  # the page's address, once it listens
        self.latest: dict[str, Any] = {}
        self.full = False  # build the full document (the page is on)

    def publish(self, state: str, r: Report) -> dict[str, Any]:
        """Once a second: the full document for the page (when on), and the heartbeat's
        fields."""
        now, mono = time.time(), time.monotonic()
        doc = self._core(state, r, now, mono)
        if self.full:
            self.latest = {**self.board.snapshot(now), **doc,
                           "quarantine": {**doc["quarantine"], "loaded": self.index.loaded}}
        return self._brief(doc)

    def _core(self, state: str, r: Report, now: float, mono: float) -> dict[str, Any]:
        ctx, held = self.ctx, self.held
        running = self._workers(mono)
        busy = {w["seq"] for w in running if w["seq"] >= 0}
        claims = []
        for c in list(held.claims.values())[:LIST_MAX]:
            claims.append({"input": c.rel, "state": "running" if c.seq in busy else "queued",
                           "failures": c.transient_failures,
                           "since_s": round(mono - c.submitted_at, 1) if c.submitted_at
                           else 0.0})
        retry = sorted(held.retry, key=lambda c: c.retry_at)
        return {
            "version": VERSION, "time": now, "pid": os.getpid(), "state": state,
            "problems": list(r.problems), "started_at": self.board.started_at,
            "url": self.url,
            "workers_alive": r.workers_alive, "workers_configured": ctx.settings.engine.workers,
            "workers": running,
            "queue": {"pending": r.pending, "claimed": r.queue_depth,
                      "in_flight": r.in_flight, "running": len(busy),
                      "retrying": len(held.retry), "deferred": r.deferred,
                      "claims": claims, "claims_total": len(held.claims),
                      "retry": [{"input": c.rel, "failures": c.transient_failures,
                                 "next_try_in_s": round(max(0.0, c.retry_at - mono), 1),
                                 "next_try_at": now + max(0.0, c.retry_at - mono),
                                 "last_error": c.last_error} for c in retry[:LIST_MAX]]},
            "counts": {**self.board.totals(), **r.counts},
            "quarantine": {"total": len(self.index), "by_reason": self.index.counts()},
            "pipelines": [p.name for p in ctx.pipelines],
            "folders": ctx.folders.named(),
        }

    def _workers(self, mono: float) -> list[dict[str, Any]]:
        out = []
        by_seq = self.held.claims
        for e in [self.ctx.engine, *self.ctx.draining]:
            if e is None:
                continue
            for w in e.worker_states():
                c = by_seq.get(w.seq)
                out.append({"worker": w.worker, "pid": w.pid, "alive": w.alive,
                            "phase": w.phase, "seq": w.seq,
                            "input": c.rel if c is not None else
                            (os.path.basename(w.path) if w.path else ""),
                            "elapsed_s": round(w.elapsed_s, 1), "tasks": w.tasks})
        return out

    def _brief(self, doc: dict[str, Any]) -> dict[str, Any]:
        q = doc["queue"]
        return {"status": {**doc, "queue": {**q, "claims": q["claims"][:BRIEF_RETRY],
                                            "retry": q["retry"][:BRIEF_RETRY]},
                           "recent": [r.to_dict() for r in self.board.fates(BRIEF_FATES)]}}


class Actions:
    """What the page may do to the quarantine, by id: a page of it, a file's bytes, requeue,
    delete. Each refuses (None or a ConfigError) an id the index does not hold."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.index: QuarantineIndex = ctx.quarantine_index

    def page(self, number: int, reason: str = "") -> dict[str, Any]:
        return self.index.page(number, reason=reason)

    def file(self, item_id: int) -> tuple[str, str] | None:
        """(quarantine folder, name below it) of a quarantined file."""
        item = self.index.get(item_id)
        return (self.index.folder, item.name) if item is not None else None

    def requeue(self, item_id: int) -> dict[str, Any]:
        item = self.index.get(item_id)
        if item is None:
            raise ConfigError(str(item_id), "no such quarantined file")
        path = os.path.join(self.index.folder, item.name)
        try:
            moved = lifecycle.requeue(self.ctx.folders.inbox, self.ctx.folders.quarantine, [path])
        except ConfigError:
            self.index.remove(item_id)  # gone meanwhile (requeued by hand)
            raise
        self.index.remove(item_id)
        dest = moved[0][1]
        self.ctx.board.record("requeued", item.name, reason=item.reason, where=dest)
        self.ctx.log.info("quarantine.requeued", input=item.name, to=dest, by="status page")
        return {"ok": True, "requeued": item.name, "to": os.path.relpath(
            dest, self.ctx.folders.inbox)}

    def delete(self, item_id: int) -> dict[str, Any]:
        item = self.index.get(item_id)
        if item is None:
            raise ConfigError(str(item_id), "no such quarantined file")
        self.index.delete(item)
        self.ctx.board.record("deleted", item.name, reason=item.reason)
        self.ctx.log.info("quarantine.deleted", input=item.name, reason=item.reason,
                          by="status page")
        return {"ok": True, "deleted": item.name}

    def output(self, fate_id: int, index: int) -> tuple[str, str] | None:
        """(output folder, name below it) of output ``index`` of a recent fate."""
        path = self.ctx.board.output(fate_id, index)
        if path is None:
            return None
        root = self.ctx.folders.output
        rel = os.path.relpath(path, root)
        return None if rel.startswith("..") or os.path.isabs(rel) else (root, rel)
