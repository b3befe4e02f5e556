"""Notifications: each fate's JSON document, delivered to the webhook and/or the command of
``[notify]`` without ever holding up the daemon's loop.

``put`` (called by the loop, once per fate) appends to a bounded queue under a lock held only
for the append: O(1), never waiting on a delivery. When the queue is full the oldest document
goes (``watcher_notify_dropped_total{why="queue-full"}``, and a ``notify.dropped`` line with the
count). A thread of its own takes documents off the queue (up to ``notify_batch`` of them, the
first waiting ``notify_batch_delay`` for others) and delivers them to each sink in turn; a
failed try is a ``notify.failed`` line with its attempt and a ``watcher_notify_failures_total``
count, then a wait that doubles each try (``notify_backoff`` up to ``notify_backoff_max``); past
``notify_tries`` the documents are dropped (``why="gave-up"``). On stop the thread gets
``notify_flush`` seconds to deliver what is queued; what is left is dropped with one line
counting it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from watcher.ops.metrics import Metrics
from watcher.ops.sinks import DeliveryError, Sink, sinks_from
from watcher.settings.schema import NOTIFY_FATES

# How long past the flush deadline stop() waits for a try that was already under way.
_JOIN_MARGIN = 2.0


class Notifications:
    """The queue of fate documents and the thread that delivers them (see the module)."""

    def __init__(self, settings: Callable[[], Any], metrics: Metrics, log: Any,
                 env: Mapping[str, str] | None = None) -> None:
        self._settings = settings  # the [notify] settings in force (a reload replaces them)
        self._metrics = metrics
        self._log = log
        self._sinks: list[Sink] = sinks_from(settings(), env)
        self._fates = self._wanted(settings())
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._dropped = 0  # dropped for a full queue since the last notify.dropped line
        self._batch: list[dict[str, Any]] = []  # being delivered by the thread
        self._deadline: float | None = None  # set by stop(): the flush ends then
        self._closed = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def _wanted(ns: Any) -> frozenset[str]:
        fates = set(ns.notify_fates)
        return frozenset(NOTIFY_FATES if "all" in fates else fates)

    @property
    def enabled(self) -> bool:
        return bool(self._sinks)

    def configure(self, ns: Any, env: Mapping[str, str] | None = None) -> None:
        """New ``[notify]`` settings (a reload): the sinks are built again (a ConfigError
        leaves the old ones); the queue and what it holds stay."""
        sinks = sinks_from(ns, env)
        with self._cond:
            self._sinks = sinks
            self._fates = self._wanted(ns)
        if sinks:
            self.start()

    def wants(self, fate: str) -> bool:
        return bool(self._sinks) and fate in self._fates and not self._closed

    def start(self) -> None:
        if self._thread is None and self._sinks:
            self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
            self._thread.start()

    # --- the daemon's side ------------------------------------------------------------------

    def put(self, doc: dict[str, Any]) -> None:
        """Queue one document: O(1), never blocks on a delivery; a full queue loses its
        oldest."""
        limit = self._settings().notify_queue
        dropped = False
        with self._cond:
            if self._closed:
                return
            while len(self._queue) >= limit:
                self._queue.popleft()
                self._dropped += 1
                dropped = True
            self._queue.append(doc)
            depth = len(self._queue)
            self._cond.notify()
        self._metrics.notify_queue.set(depth)
        if dropped:
            self._metrics.notify_dropped.labels("queue-full").inc()

    def stop(self) -> None:
        """Give the thread ``notify_flush`` seconds to deliver what is queued, then drop the
        rest with one line counting it."""
        if self._thread is None or self._closed:
            return
        flush = self._settings().notify_flush
        with self._cond:
            self._deadline = time.monotonic() + flush
            self._cond.notify_all()
        self._thread.join(flush + _JOIN_MARGIN)
        with self._cond:
            self._closed = True
            left = len(self._queue) + len(self._batch)
            self._queue.clear()
            self._batch = []
            self._cond.notify_all()
        self._report_drops()
        self._metrics.notify_queue.set(0)
        if left:
            self._metrics.notify_dropped.labels("stopping").inc(left)
            self._log.warning("notify.dropped", documents=left, why="stopping",
                              notify_flush=flush, fix="raise [notify] notify_flush, or look at "
                              "why deliveries fail (notify.failed lines)")

    # --- the thread's side ------------------------------------------------------------------

    def _left(self) -> float:
        """Seconds to the flush deadline (infinite while the daemon runs)."""
        return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                if not self._deliver(batch):
                    return  # the flush is over: stop() counts this batch with the queue
            except Exception as exc:  # noqa: BLE001 - a bug here must not end the deliveries
                self._log.error("notify.failed", sink="all", error=f"{type(exc).__name__}: "
                                f"{exc}", documents=len(batch), retries_left=0)
            with self._cond:
                self._batch = []
            self._report_drops()

    def _take(self) -> list[dict[str, Any]]:
        """The next documents to deliver (none: stop); waits for them."""
        ns = self._settings()
        size = ns.notify_batch
        with self._cond:
            while not self._queue and not self._stopping():
                self._cond.wait()
            if size > 1 and self._queue:  # a stop ends the wait for more: flush what is here
                until = time.monotonic() + ns.notify_batch_delay
                while len(self._queue) < size and self._deadline is None and \
                        (rest := until - time.monotonic()) > 0:
                    self._cond.wait(rest)
            if self._closed or self._left() <= 0:
                return []
            self._batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            depth = len(self._queue)
        self._metrics.notify_queue.set(depth)
        return self._batch

    def _stopping(self) -> bool:
        """The flush is over (or there is nothing left to flush)."""
        return self._closed or (self._deadline is not None
                                and (self._left() <= 0 or not self._queue))

    def _deliver(self, batch: list[dict[str, Any]]) -> bool:
        """Deliver to every sink; False when the flush ended first."""
        ns = self._settings()
        docs = [with_sizes(d) for d in batch]
        body = json.dumps(docs if ns.notify_batch > 1 else docs[0],
                          ensure_ascii=False, default=str).encode("utf-8")
        inputs = [d.get("input") for d in docs]
        return all(self._try(sink, body, len(docs), inputs) for sink in list(self._sinks))

    def _try(self, sink: Sink, body: bytes, count: int, inputs: list[Any]) -> bool:
        """Deliver to one sink, retrying; False when the flush ended first."""
        for attempt in range(1, 1 << 30):
            ns = self._settings()
            timeout = min(ns.notify_timeout, self._left())
            if timeout <= 0 or self._closed:
                return False
            try:
                sink.send(body, timeout)
            except DeliveryError as exc:
                self._metrics.notify_failed.labels(sink.name).inc()
                last = attempt >= ns.notify_tries
                delay = min(ns.notify_backoff_max, ns.notify_backoff * 2 ** (attempt - 1))
                fields: dict[str, Any] = {} if last else {"retry_in_s": round(delay, 2)}
                if last:
                    self._metrics.notify_dropped.labels("gave-up").inc(count)
                self._log.warning("notify.failed", sink=sink.name, endpoint=sink.shown,
                                  error=str(exc), attempt=attempt,
                                  retries_left=max(0, ns.notify_tries - attempt),
                                  documents=count, for_inputs=inputs[:10], **fields)
                self._report_drops()
                if last:
                    return True
                with self._cond:  # a stop() cuts the wait short to its flush deadline
                    until = time.monotonic() + delay
                    while not self._closed and (rest := min(until - time.monotonic(),
                                                            self._left())) > 0:
                        self._cond.wait(rest)
                continue
            self._metrics.notify_sent.labels(sink.name).inc(count)
            return True
        return True

    def _report_drops(self) -> None:
        with self._cond:
            n, self._dropped = self._dropped, 0
        if n:
            self._log.warning("notify.dropped", documents=n, why="queue-full",
                              notify_queue=self._settings().notify_queue,
                              fix="the oldest documents went first; raise [notify] "
                                  "notify_queue, or look at why deliveries fail")


def with_sizes(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with each output's size in bytes, read now (null: the output is gone)."""
    outputs = []
    for o in doc.get("outputs", []):
        try:
            size: int | None = os.stat(o["path"]).st_size
        except OSError:
            size = None
        outputs.append({**o, "bytes": size})
    return {**doc, "outputs": outputs}
