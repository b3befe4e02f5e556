"""Prometheus metrics and the optional HTTP endpoint: /metrics, /healthz, /readyz (and, given a
``web.StatusApp``, the status page's routes beside them).

Off by default; ``metrics_port`` turns it on, bound to 127.0.0.1 unless ``metrics_host`` says
otherwise. The daemon loop writes the metrics, and the notifications' thread its own
(``watcher_notify_*``; prometheus_client's values are thread-safe); the server thread only reads.

Names follow Prometheus' conventions: ``watcher_`` first, the unit last and in its base unit
(``_seconds``, ``_bytes``), ``_total`` on counters only. Every labelled series a run can have is
there from the start at 0 (each pipeline, each reason an input can be quarantined or retried
for), so a rate or an alert on a series does not wait for its first event. prometheus_client
writes the exposition and adds the standard process metrics (``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ``process_open_fds``, ``process_start_time_seconds``…, read
from /proc) of the daemon's own process.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from watcher import __version__
from watcher.errors import QUARANTINE_REASONS, RETRY_REASONS

if TYPE_CHECKING:
    from watcher.ops.web import StatusApp

MAX_BODY = 4096  # bytes of a request body read at most (the page's POSTs have none)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        # no "_created" twin of every counter and histogram series: it doubles the series a
        # scrape stores and says nothing process_start_time_seconds does not
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        Info("watcher_build", "The running watcher: its version, Python's and Pillow's",
             registry=r).info({"version": __version__, "python": platform.python_version(),
                               "pillow": _version("Pillow")})
        self.processed = Counter("watcher_files_processed", "Inputs processed, per pipeline",
                                 ["pipeline"], registry=r)
        self.quarantined = Counter("watcher_files_quarantined", "Inputs quarantined, per reason",
                                   ["reason"], registry=r)
        self.retried = Counter("watcher_files_retried", "Failures not the input's own, retried, "
                               "per reason", ["reason"], registry=r)
        for reason in sorted(QUARANTINE_REASONS):
            self.quarantined.labels(reason)
        for reason in sorted(RETRY_REASONS):
            self.retried.labels(reason)
        self.duration = Histogram("watcher_file_processing_seconds",
                                  "Worker time per input (all its pipelines)", registry=r,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30,
                                           60, 300))
        self.in_flight = Gauge("watcher_queue_depth", "Inputs claimed and not yet finished "
                               "(running, waiting to retry, or waiting for their move)",
                               registry=r)
        self.retry_waiting = Gauge("watcher_retry_waiting", "Inputs waiting to retry after a "
                                   "failure not their own", registry=r)
        self.pending = Gauge("watcher_inbox_pending", "Files seen in the inbox, not yet claimed",
                             registry=r)
        self.workers = Gauge("watcher_workers_alive", "Worker processes alive", registry=r)
        self.restarts = Counter("watcher_worker_restarts", "Worker processes replaced",
                                registry=r)
        self.input_bytes = Counter("watcher_input_bytes", "Bytes of input read", registry=r)
        self.output_bytes = Counter("watcher_output_bytes", "Bytes of output written",
                                    registry=r)
        self.reconcile_found = Counter("watcher_reconcile_found",
                                       "Files found by a scan that no event announced",
                                       registry=r)
        self.overflows = Counter("watcher_observer_overflows", "Times the kernel's event queue "
                                 "overflowed (each followed by a rescan of the inbox)",
                                 registry=r)
        self.notify_sent = Counter("watcher_notify_delivered", "Fate documents delivered, per "
                                   "sink (webhook, command)", ["sink"], registry=r)
        self.notify_failed = Counter("watcher_notify_failures", "Failed tries to deliver fate "
                                     "documents, per sink", ["sink"], registry=r)
        self.notify_dropped = Counter("watcher_notify_dropped", "Fate documents dropped "
                                      "undelivered, per why (queue-full, gave-up, stopping)",
                                      ["why"], registry=r)
        self.notify_queue = Gauge("watcher_notify_queue_depth", "Fate documents waiting to be "
                                  "delivered", registry=r)
        for sink in ("webhook", "command"):
            self.notify_sent.labels(sink)
            self.notify_failed.labels(sink)
        for why in ("queue-full", "gave-up", "stopping"):
            self.notify_dropped.labels(why)
        self.last_tick = time.monotonic()
        self.ready = False

    def know_pipelines(self, names: Iterable[str]) -> None:
        """Show each pipeline's series (at 0 until an input is processed): at start, on reload."""
        for name in names:
            self.processed.labels(name)


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    max_age: float
    app: StatusApp | None = None
    timeout = 10  # seconds a client may take to send its request

    def do_GET(self) -> None:
        if self._app("GET"):
            return
        m = self.metrics
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(m.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            age = time.monotonic() - m.last_tick
            ok = age <= self.max_age
            self._send(200 if ok else 503, f"{'ok' if ok else 'stalled'}: last tick "
                       f"{age:.1f} s ago\n".encode())
        elif path == "/readyz":
            self._send(200 if m.ready else 503, b"ready\n" if m.ready else b"not ready\n")
        else:
            self._send(404, b"not found: try /metrics, /healthz, /readyz\n")

    def do_POST(self) -> None:
        if not self._app("POST"):
            self._send(405, b"method not allowed\n")

    def _app(self, method: str) -> bool:
        """Let the status page answer (it checks the token first, on every path); False when
        there is none or the path is not its own."""
        if self.app is None:
            return False
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY)) if method == "POST" and length > 0 else b""
        reply = self.app.handle(method, self.path, self.headers, body)
        if reply is None:
            return False
        code, data, ctype, headers = reply
        self._send(code, data, ctype, headers)
        return True

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not worth a log line each


class MetricsServer:
    def __init__(self, metrics: Metrics, host: str, port: int, max_age: float = 30.0,
                 app: StatusApp | None = None) -> None:
        handler = type("Handler", (_Handler,), {"metrics": metrics, "max_age": max_age,
                                                "app": app})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
