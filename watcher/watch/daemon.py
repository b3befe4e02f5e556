"""Watch mode: the inbox daemon. Sources + engine + input lifecycle + signals, in one loop.

Each tick, in a fixed order: act on recorded signals; feed observer events to the stability
tracker; restart a dead observer (and rescan); run the reconcile scan when due; claim complete
files (renamed into the work folder) up to the in-flight limit and hand them to the engine;
resubmit transient failures whose back-off has passed; poll the engine and decide each finished
file's fate exactly once: archive/delete/keep, quarantine with a sidecar, or retry later when the
failure was not the input's fault.

Signal handlers only record. SIGTERM/SIGINT: stop the observer and intake, let running files
finish within the grace period, leave unstarted claims in the work folder and unclaimed files in
the inbox for the next start, exit 0; a second signal stops at once. SIGHUP reloads the config:
a new engine takes over the queued files while the old one drains.

The parts, each owning its state: ``signals`` (recorded signals, the wake-up pipe), ``intake``
(observer, tracker, claims made from the inbox), ``dispatch`` (claims judged, planned, handed
to the engine, retried), ``fates`` (each result's fate), ``ops.heartbeat`` (heartbeat, gauges,
systemd, PID-1 reaping); ``context`` holds what they share. This module wires them into the loop
and owns start, reload and shutdown.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from watcher import console
from watcher.config import Settings
from watcher.engine import runlock
from watcher.engine.factory import create_executor
from watcher.errors import ConfigError
from watcher.ops.heartbeat import Heartbeat, Report
from watcher.ops.metrics import MetricsServer
from watcher.watch import claiming, lifecycle, sources
from watcher.watch.context import Context, InFlight, folders_of, for_watch
from watcher.watch.dispatch import Dispatch
from watcher.watch.fates import Fates
from watcher.watch.intake import Intake
from watcher.watch.signals import Signals
from watcher.watch.statusview import Actions, StatusView

if TYPE_CHECKING:
    from watcher.engine.executor import Executor
    from watcher.ops.web import StatusApp

TICK = 0.25  # longest wait between ticks; events, results and signals wake the loop sooner


class Daemon:
    def __init__(self, load: Callable[[], Settings], *, log_format: str = "json",
                 log_level: str = "info") -> None:
        self._load = lambda: for_watch(load())
        self.ctx = Context(self._load())
        self._log_format = log_format
        self._log_level = log_level
        self._log = self.ctx.log
        self.signals = Signals()
        self.held = InFlight()
        self.fates = Fates(self.ctx, self.held, kept=self._kept_in_inbox)
        self.dispatch = Dispatch(self.ctx, self.held, self.fates)
        self.intake = Intake(self.ctx, self.held, self.dispatch, wake=self.signals.wake)
        self.status = StatusView(self.ctx, self.held, self.fates, self.intake)
        self.heartbeat = Heartbeat(self.ctx.folders.work, self.ctx.metrics, self._report,
                                   self._engine_pids, self._log, publish=self.status.publish)
        self._server: MetricsServer | None = None
        self._page: MetricsServer | None = None
        self._app: StatusApp | None = None
        self._stopping = 0

    def _kept_in_inbox(self, dest: str) -> None:
        self.intake.remember_kept(dest)  # the intake is made after the fates it hears from

    def _new_engine(self) -> Executor:
        pipes = self.ctx.pipelines
        eng = self.ctx.settings.engine
        if eng.start_method == "auto":  # the observer runs threads: no plain fork
            eng = replace(eng, start_method="forkserver")
        e = create_executor(eng, {p.name: p for p in pipes}, self.ctx.settings.limits,
                          log_format=self._log_format, log_level="warning")
        e.start()
        return e

    # --- run --------------------------------------------------------------------------------------

    def run(self) -> int:
        ctx, ws = self.ctx, self.ctx.settings.watch
        folders = ctx.folders
        folders.check()
        console.set_output_folder(folders.output)  # console lines show outputs relative to it
        self._runlock = runlock.acquire(folders)  # held for the run (see engine.runlock)
        for path in lifecycle.remove_stale_temps(folders,
                                                 stale_mine=runlock.stale(self._runlock)):
            self._log.info("file.temp_removed", path=path, why="left by a process that is gone")
        if not self._runlock.exclusive:
            self._log.info("daemon.run_lock_shared", folder=self._runlock.folder,
                           why=self._runlock.why)
        self._app = self._status_app()  # a page refused (no token) before any work starts
        self.signals.install()
        try:
            ctx.engine = self._new_engine()
            for c in claiming.settled(folders):
                self.fates.log_settled(c)
            recovered = self.intake.take_leftover()
            self.intake.recover_stale_claims()
            self.intake.start_observer()
            assert self.intake.observer is not None
            backlog = self.intake.reconcile(count=False)
            ctx.quarantine_index.start()  # listed once, in a thread: the start does not wait
            self._serve()
            ctx.notify.start()
            ctx.metrics.ready = True  # before daemon.started: that line means "up and ready"
            self._log.info("daemon.started", daemon_pid=os.getpid(), **folders.named(),
                           observer=self.intake.observer.kind, workers=ctx.settings.engine.workers,
                           pipelines=[p.name for p in ctx.pipelines], backlog=backlog,
                           recovered_claims=recovered, on_success=ws.on_success,
                           max_worker_memory=ctx.engine.memory_cap)
            self.heartbeat.beat(force=True)
            self.heartbeat.notifier.ready(self._status(len(self.held.retrying()),
                                                       self._problems()))
            next_scan = time.monotonic() + ws.reconcile_interval
            while not self._stopping:
                self._tick()
                if time.monotonic() >= next_scan and not self._stopping:
                    self.intake.recover_stale_claims()
                    self.intake.reconcile()
                    next_scan = time.monotonic() + ctx.settings.watch.reconcile_interval
            return self._shutdown()
        finally:
            self._restore()

    def _serve(self) -> None:
        """Start the HTTP endpoints that are on: /metrics (metrics_port) and the status page
        (status_page); one server when they share a port."""
        ws, ops = self.ctx.settings.watch, self.ctx.settings.ops
        app = self._app
        if app is not None:
            self.status.full = True
            shared = ws.metrics_port and (ws.metrics_host, ws.metrics_port) == \
                (ops.status_host, ops.status_port)
            self._page = self._listen("ops.status_host/status_port", ops.status_host,
                                      ops.status_port, app)
            host, port = self._page.address[:2]
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - a name
            self.status.url = f"http://{shown}:{port}/"
            self._log.info("status.listening", host=host, port=port, url=self.status.url,
                           token=bool(app.token))
            if shared:
                return
        if ws.metrics_port:
            self._server = self._listen("watch.metrics_host/metrics_port", ws.metrics_host,
                                        ws.metrics_port, None)
            self._log.info("metrics.listening", host=self._server.address[0],
                           port=self._server.address[1])

    def _status_app(self) -> StatusApp | None:
        ops = self.ctx.settings.ops
        if not ops.status_page:
            return None
        from watcher.ops import web  # noqa: PLC0415 - only with the page on

        token = web.read_token(os.environ, ops.status_token_file)
        web.check_bind(ops.status_host, token)
        return web.StatusApp(lambda: self.status.latest, Actions(self.ctx), token=token)

    def _listen(self, key: str, host: str, port: int, app: StatusApp | None) -> MetricsServer:
        try:
            server = MetricsServer(self.ctx.metrics, host, port, app=app)
        except OSError as exc:  # no such host, port taken, no permission
            raise ConfigError(key, f"cannot serve on {host}:{port}: {exc}") from exc
        server.start()
        return server

    def _tick(self) -> None:
        self.heartbeat.stall_if_asked()
        self._handle_signals()
        if self._stopping:
            return
        self.heartbeat.beat()
        engine = self.ctx.engine
        assert self.intake.observer is not None and engine is not None
        self.intake.poll_observer()
        self.intake.claim_ready()
        self.dispatch.retry_due()
        self.fates.deferred_due()
        for e in list(self.ctx.draining):
            for r in e.poll(0):
                self.fates.fate(r)
            if not e.outstanding:
                e.close(0)
                self.ctx.draining.remove(e)
        for r in engine.poll(self._timeout(), wake=[self.signals.wake_fd]):
            self.fates.fate(r)
        self.signals.drain_wakes()

    def _timeout(self) -> float:
        t = TICK
        due = [c.retry_at for c in self.held.retry] + [d.retry_at for d in self.fates.deferred]
        if due:
            t = min(t, max(0.0, min(due) - time.monotonic()))
        return t

    # --- what the heartbeat says ------------------------------------------------------------------

    def _status(self, retrying: int, problems: list[str]) -> str:
        text = (f"{len(self.held.claims)} in flight, {retrying} waiting to retry, "
                f"{len(self.intake.tracker)} waiting, {self.ctx.counts['processed']} processed, "
                f"{self.ctx.counts['quarantined']} quarantined")
        return f"{text}; degraded: {problems[0]}" if problems else text

    def _problems(self) -> list[str]:
        """What keeps this daemon from being healthy, one line each (none: ok)."""
        out: list[str] = []
        retrying = self.held.retrying()
        if retrying:
            first = min(retrying, key=lambda c: c.first_failure_at)
            out.append(f"{len(retrying)} file(s) waiting to retry after failures not their "
                       f"own (e.g. {first.rel}, {first.transient_failures} failure(s): "
                       f"{first.last_error})")
        out += [p for p in (self.intake.claim_problem(), self.heartbeat.problem()) if p]
        deferred = self.fates.deferred
        if deferred:
            d = deferred[0]
            out.append(f"{len(deferred)} file(s) whose fate could not be carried out "
                       f"(e.g. {d.claim.rel}: {d.error})")
        es = self.ctx.settings.engine
        limit = es.task_timeout * (es.crash_retries + 2) + 60
        now = time.monotonic()
        stuck = [c for c in self.held.claims.values()
                 if c.submitted_at and now - c.submitted_at > limit]
        if stuck:
            out.append(f"{len(stuck)} claim(s) without a result for over {limit:g} s "
                       f"(e.g. {stuck[0].rel})")
        for e in [self.ctx.engine, *self.ctx.draining]:
            if e is not None and hasattr(e, "problems"):
                out.extend(e.problems())
        return out

    def _report(self) -> Report:
        engine, held = self.ctx.engine, self.held
        alive = engine.workers_alive if engine else 0
        problems = self._problems()
        retrying = len(held.retrying())
        return Report(in_flight=len(held.claims),
                      queue_depth=len(held.claims) + len(held.retry) + len(self.fates.deferred),
                      retrying=retrying, pending=len(self.intake.tracker),
                      deferred=len(self.fates.deferred), workers_alive=alive,
                      restarts=engine.stats.restarts if engine is not None else None,
                      problems=tuple(problems), counts=dict(self.ctx.counts),
                      status=self._status(retrying, problems))

    def _engine_pids(self) -> list[int]:
        return self.ctx.engine.pids if self.ctx.engine else []

    # --- signals, reload, shutdown ----------------------------------------------------------------

    def _handle_signals(self) -> None:
        pending = self.signals.pending
        while pending and not self._stopping:
            sig = pending.pop(0)
            if sig == signal.SIGHUP:
                self._reload()
            else:
                self._stopping = sig

    def _reload(self) -> None:
        ctx = self.ctx
        try:
            new = self._load()
        except Exception as exc:  # noqa: BLE001 - a user transform may raise anything on import
            error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            self._log.error("config.reload_failed", error=error, kept="the running config")
            return
        if folders_of(new).named() != ctx.folders.named():
            self._log.warning("config.folders_unchanged",
                              why="folders cannot change on reload; restart the daemon for that")
            new = replace(new, watch=replace(new.watch, **ctx.settings.watch.folders()))
        try:
            ctx.notify.configure(new.notify)
        except ConfigError as exc:
            self._log.error("config.reload_failed", error=str(exc), kept="the running config")
            return
        old_engine = ctx.engine
        ctx.settings = new
        ctx.metrics.know_pipelines(p.name for p in ctx.pipelines)
        self.intake.tracker.settle = new.watch.settle
        ctx.engine = self._new_engine()
        if old_engine is not None:
            withdrawn = old_engine.stop_intake()
            ctx.draining.append(old_engine)
            for t in withdrawn:
                c = self.held.claims.pop(t.seq, None)
                if c is not None:
                    self.dispatch.submit(c)  # planned again with the new pipelines
        self._log.info("config.reloaded", workers=new.engine.workers,
                       pipelines=[p.name for p in ctx.pipelines], source=new.source)

    def _shutdown(self) -> int:
        ctx, sig = self.ctx, self._stopping
        engine = ctx.engine
        assert engine is not None
        ctx.metrics.ready = False
        self.heartbeat.notifier.stopping(f"draining {engine.outstanding} file(s)")
        self._log.info("daemon.stopping", signal=signal.Signals(sig).name,
                       running=engine.outstanding, grace=ctx.settings.engine.grace)
        self.intake.stop()
        for t in engine.stop_intake():
            c = self.held.claims.pop(t.seq, None)
            if c is not None:
                self.held.forget(c)  # unstarted: stays in the work folder for the next start
        for e in [engine, *ctx.draining]:
            deadline = time.monotonic() + ctx.settings.engine.grace
            while e.outstanding and time.monotonic() < deadline and \
                    not self.signals.second_stop():
                for r in e.poll(TICK, respawn=False):
                    self.fates.fate(r)
                self.heartbeat.beat(state="draining")  # keep the watchdog fed while draining
            for r in e.close(0 if e.outstanding else 1.0):
                self.fates.fate(r)
        ctx.draining.clear()
        ctx.engine = None
        ctx.notify.stop()  # the last fates are in: a bounded flush, the rest dropped, counted
        left = len(list(claiming.leftover_claims(ctx.folders)))
        self.heartbeat.stopped()
        self._log.info("daemon.stopped", **ctx.counts, left_in_work=left,
                       left_in_inbox=len(list(sources.scan(
                           ctx.folders.inbox, recursive=ctx.settings.watch.recursive,
                           patterns=ctx.settings.watch.ignore))))
        self._runlock.release()  # every worker is gone
        return 0 if not self.signals.second_stop() else 128 + sig

    def _restore(self) -> None:
        self.signals.restore_wakeup()
        for server in (self._server, self._page):
            if server is not None:
                server.stop()
        self.ctx.quarantine_index.stop()
        self.heartbeat.notifier.close()
        self.ctx.notify.stop()  # a no-op after _shutdown's
        self.signals.restore_handlers()
        self.intake.stop()
        for e in [self.ctx.engine, *self.ctx.draining]:
            if e is not None:
                e.close(0)
