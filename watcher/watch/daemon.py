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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from watcher import batch, log
from watcher.config import Settings
from watcher.engine import runlock
from watcher.engine.supervisor import create_engine
from watcher.errors import TRANSIENT_REASONS, ConfigError
from watcher.fs import files, naming, safefs
from watcher.fs.naming import OutputNames
from watcher.imaging.pipeline import Pipeline
from watcher.ops import health
from watcher.ops.metrics import Metrics, MetricsServer
from watcher.ops.notify import Notifier
from watcher.tasks import OutputPlan, Result, Task
from watcher.watch import claiming, lifecycle, moves, observer, sources
from watcher.watch.claiming import Claim, NotClaimed
from watcher.watch.lifecycle import Folders

if TYPE_CHECKING:
    from watcher.engine.cluster import AnyEngine

TICK = 0.25  # longest wait between ticks; events, results and signals wake the loop sooner
# Failures not the input's fault, after each of which other inputs succeeded: this many, and the
# evidence says the fault is this input's after all (it is quarantined "gave-up").
ISOLATED_FAILURES = 3
BEAT = 1.0  # seconds between heartbeats (file, STATUS)
STALL_HOOK = "WATCHER_DEBUG_STALL_FILE"  # tests: while this file exists, the loop is wedged


class Daemon:
    def __init__(self, load: Callable[[], Settings], *, log_format: str = "json",
                 log_level: str = "info") -> None:
        self._load = lambda: _for_watch(load())
        self.settings = self._load()
        self.folders = _folders(self.settings)
        self._log_format = log_format
        self._log_level = log_level
        self._log = log.get("watcher.watch.daemon")
        self.engine: AnyEngine | None = None
        self._draining: list[AnyEngine] = []
        self.claims: dict[int, Claim] = {}  # claimed, not yet decided
        self._rels: set[str] = set()  # their inbox-relative names: one in flight per name
        self._retry: list[Claim] = []  # transient failures waiting for their back-off
        self._deferred: list[_Deferred] = []  # fates decided whose move failed (a full disk)
        self.names = OutputNames()  # the outputs each claim holds, by claim seq
        self._successes = 0  # inputs processed since start: evidence for isolated failures
        self._kept: dict[str, tuple[int, int]] = {}  # keep mode: inputs left in the inbox
        # inbox files whose claim failed (a full disk, no permission): path -> (next try,
        # failures, last error)
        self._claim_wait: dict[str, tuple[float, int, str]] = {}
        self._signals: list[int] = []
        self._seq = 0
        self._stopping = 0
        self.tracker = sources.Stability(self.settings.watch.settle)
        self.observer: observer.InboxObserver | None = None
        self.counts = {"processed": 0, "quarantined": 0, "retried": 0, "skipped": 0,
                       "reconcile_found": 0, "gave_up": 0, "overflows": 0}
        self.notifier = Notifier()
        self.metrics = Metrics()
        self._server: MetricsServer | None = None
        self._next_beat = 0.0
        self._beat_failures = 0
        self._restarts_seen = 0
        self._stall_file = os.environ.get(STALL_HOOK, "")
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)

    # --- set-up ---------------------------------------------------------------------------------

    @property
    def _pipelines(self) -> tuple[Pipeline, ...]:
        return self.settings.select([])

    @property
    def _max_in_flight(self) -> int:
        return self.settings.watch.max_in_flight or 4 * self.settings.engine.workers

    def _new_engine(self) -> AnyEngine:
        pipes = self._pipelines
        eng = self.settings.engine
        if eng.start_method == "auto":  # the observer runs threads: no plain fork
            eng = replace(eng, start_method="forkserver")
        e = create_engine(eng, {p.name: p for p in pipes}, self.settings.limits,
                   log_format=self._log_format, log_level="warning")
        e.start()
        return e

    def _install_signals(self) -> dict[int, Any]:
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            old[sig] = signal.signal(sig, self._record)
        old[-1] = signal.set_wakeup_fd(self._wake_w)  # a signal also wakes the loop at once
        return old

    def _record(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # --- run --------------------------------------------------------------------------------------

    def run(self) -> int:
        ws = self.settings.watch
        self.folders.check()
        self._runlock = runlock.acquire(self.folders)  # held for the run (see engine.runlock)
        for path in lifecycle.remove_stale_temps(self.folders,
                                                 stale_mine=runlock.stale(self._runlock)):
            self._log.info("file.temp_removed", path=path, why="left by a process that is gone")
        if not self._runlock.exclusive:
            self._log.info("daemon.run_lock_shared", folder=self._runlock.folder,
                           why=self._runlock.why)
        old = self._install_signals()
        try:
            self.engine = self._new_engine()
            for c in claiming.settled(self.folders):
                self._log_settled(c)
            recovered = 0
            for c in claiming.leftover(self.folders, self._next_seq, keep_settled=True):
                self._rels.add(c.rel)
                self._dispatch(c)
                recovered += 1
            self._recover_stale_claims()
            self.observer = observer.InboxObserver(
                self.folders.inbox, kind=ws.observer, recursive=ws.recursive,
                poll_interval=ws.poll_interval, wake=self.wake)
            self.observer.start()
            self.tracker.close_events = self.observer.kind == "inotify"
            backlog = self._reconcile(count=False)
            if ws.metrics_port:
                self._server = MetricsServer(self.metrics, ws.metrics_host, ws.metrics_port)
                self._server.start()
                self._log.info("metrics.listening", host=self._server.address[0],
                               port=self._server.address[1])
            self.metrics.ready = True  # before daemon.started: that line means "up and ready"
            self._log.info("daemon.started", pid=os.getpid(), **self.folders.named(),
                           observer=self.observer.kind, workers=self.settings.engine.workers,
                           pipelines=[p.name for p in self._pipelines], backlog=backlog,
                           recovered=recovered, on_success=ws.on_success,
                           max_worker_memory=getattr(self.engine, "memory_cap", None))
            self._beat(force=True)
            self.notifier.ready(self._status(len(self._retrying()), self._problems()))
            next_scan = time.monotonic() + ws.reconcile_interval
            while not self._stopping:
                self._tick()
                if time.monotonic() >= next_scan and not self._stopping:
                    self._recover_stale_claims()
                    self._reconcile()
                    next_scan = time.monotonic() + self.settings.watch.reconcile_interval
            return self._shutdown()
        finally:
            self._restore(old)

    def _status(self, retrying: int, problems: list[str]) -> str:
        text = (f"{len(self.claims)} in flight, {retrying} waiting to retry, "
                f"{len(self.tracker)} waiting, {self.counts['processed']} processed, "
                f"{self.counts['quarantined']} quarantined")
        return f"{text}; degraded: {problems[0]}" if problems else text

    def _retrying(self) -> list[Claim]:
        """Claims that failed for reasons not their own: waiting for their back-off, or being
        tried again now."""
        return self._retry + [c for c in self.claims.values() if c.transient_failures]

    def _problems(self) -> list[str]:
        """What keeps this daemon from being healthy, one line each (none: ok)."""
        out: list[str] = []
        retrying = self._retrying()
        if retrying:
            first = min(retrying, key=lambda c: c.first_failure_at)
            out.append(f"{len(retrying)} file(s) waiting to retry after failures not their "
                       f"own (e.g. {first.rel}, {first.transient_failures} failure(s): "
                       f"{first.last_error})")
        for path in [p for p in self._claim_wait if p not in self.tracker]:
            del self._claim_wait[path]  # gone from the inbox (or claimed by another instance)
        if self._claim_wait:
            path, (_, failures, error) = next(iter(self._claim_wait.items()))
            out.append(f"{len(self._claim_wait)} file(s) in the inbox that cannot be claimed "
                       f"(e.g. {os.path.relpath(path, self.folders.inbox)}, {failures} "
                       f"failure(s): {error})")
        if self._beat_failures:
            out.append(f"the heartbeat cannot be written ({self._beat_failures} failure(s) "
                       "in a row): the work folder's disk is full or unwritable")
        if self._deferred:
            d = self._deferred[0]
            out.append(f"{len(self._deferred)} file(s) whose fate could not be carried out "
                       f"(e.g. {d.claim.rel}: {d.error})")
        es = self.settings.engine
        limit = es.task_timeout * (es.crash_retries + 2) + 60
        now = time.monotonic()
        stuck = [c for c in self.claims.values()
                 if c.submitted_at and now - c.submitted_at > limit]
        if stuck:
            out.append(f"{len(stuck)} claim(s) without a result for over {limit:g} s "
                       f"(e.g. {stuck[0].rel})")
        for e in [self.engine, *self._draining]:
            if e is not None and hasattr(e, "problems"):
                out.extend(e.problems())
        return out

    def _beat(self, force: bool = False, state: str = "running") -> None:
        """Once a second: heartbeat file, gauges, STATUS; every tick: the systemd watchdog."""
        now = time.monotonic()
        self.metrics.last_tick = now
        self.notifier.ping(now)
        if not force and now < self._next_beat:
            return
        self._next_beat = now + BEAT
        alive = self.engine.workers_alive if self.engine else 0
        problems = self._problems()
        retrying = len(self._retrying())
        self.metrics.in_flight.set(len(self.claims) + len(self._retry) + len(self._deferred))
        self.metrics.retry_waiting.set(retrying)
        self.metrics.pending.set(len(self.tracker))
        self.metrics.workers.set(alive)
        if self.engine is not None and self.engine.stats.restarts > self._restarts_seen:
            self.metrics.restarts.inc(self.engine.stats.restarts - self._restarts_seen)
            self._restarts_seen = self.engine.stats.restarts
        if problems and state == "running":
            state = "degraded"
        try:
            health.write(health.heartbeat_path(self.folders.work), {
                "state": state, "in_flight": len(self.claims), "pending": len(self.tracker),
                "retrying": retrying, "deferred": len(self._deferred),
                "problems": problems, "workers_alive": alive, **self.counts})
            self._beat_failures = 0
        except OSError as exc:
            # A full disk must not make a live daemon look dead: the old heartbeat's time is
            # refreshed (no space needed), and the write is tried again next second.
            self._beat_failures += 1
            touched = health.touch(health.heartbeat_path(self.folders.work))
            if self._beat_failures == 1 or self._beat_failures % 60 == 0:
                self._log.warning("heartbeat.write_failed", error=str(exc),
                                  failures=self._beat_failures, touched=touched)
        self.notifier.status(self._status(retrying, problems))
        if os.getpid() == 1:
            self._reap_orphans()

    def _reap_orphans(self) -> None:
        """As PID 1 (a container), reap adopted orphans; never our own children, whose exit
        status multiprocessing collects itself."""
        import multiprocessing  # noqa: PLC0415

        own = {p.pid for p in multiprocessing.active_children()}
        own |= set(self.engine.pids if self.engine else [])
        with contextlib.suppress(Exception):
            from multiprocessing import forkserver, resource_tracker  # noqa: PLC0415

            own.add(forkserver._forkserver._forkserver_pid)
            own.add(resource_tracker._resource_tracker._pid)
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in own:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)

    def _stall_if_asked(self) -> None:
        if self._stall_file and os.path.exists(self._stall_file):
            self._log.warning("daemon.stalling", hook=STALL_HOOK, file=self._stall_file)
            while os.path.exists(self._stall_file):  # no ticks, no pings: a wedged supervisor
                time.sleep(0.2)

    def _restore(self, old: dict[int, Any]) -> None:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(old.pop(-1))
        if self._server is not None:
            self._server.stop()
        self.notifier.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if self.observer is not None:
            self.observer.stop()
        for e in [self.engine, *self._draining]:
            if e is not None:
                e.close(0)

    def _tick(self) -> None:
        self._stall_if_asked()
        self._handle_signals()
        if self._stopping:
            return
        self._beat()
        assert self.observer is not None and self.engine is not None
        overflowed = False
        for kind, path in self.observer.drain():
            if kind == sources.OVERFLOW:
                overflowed = True
                continue
            self._hint(kind, path)
        if overflowed:  # events were lost: what they would have said is found by a scan now
            self.counts["overflows"] += 1
            self.metrics.overflows.inc()
            self._log.warning("observer.overflowed", inbox=self.folders.inbox,
                              overflows=self.counts["overflows"],
                              why="the kernel's event queue overflowed; rescanning the inbox")
            self._reconcile()
        if not self.observer.healthy():
            self.observer.restart()
            self.tracker.close_events = self.observer.kind == "inotify"
            self._reconcile()
        self._claim_ready()
        self._retry_due()
        self._deferred_due()
        for e in list(self._draining):
            for r in e.poll(0):
                self._fate(r)
            if not e.outstanding:
                e.close(0)
                self._draining.remove(e)
        for r in self.engine.poll(self._timeout(), wake=[self._wake_r]):
            self._fate(r)
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def _timeout(self) -> float:
        t = TICK
        due = [c.retry_at for c in self._retry] + [d.retry_at for d in self._deferred]
        if due:
            t = min(t, max(0.0, min(due) - time.monotonic()))
        return t

    # --- intake ------------------------------------------------------------------------------

    def _hint(self, kind: str, path: str) -> None:
        inbox = self.folders.inbox
        if not path.startswith(inbox.rstrip("/") + "/"):
            return
        rel = os.path.relpath(path, inbox)
        if sources.ignored(rel, self.settings.watch.ignore):
            return
        if kind == sources.DIR:
            if self.settings.watch.recursive:  # walked by descriptor: a link is not entered
                for r in sources.scan(self._intake_fd(), recursive=True,
                                      patterns=self.settings.watch.ignore, under=rel):
                    self._hint(sources.SCAN, os.path.join(inbox, r))
            return
        try:
            st = safefs.lstat(self._intake_fd(), rel)
        except OSError:  # gone, or a folder on its way is a link now (or not a folder)
            self.tracker.forget(path)
            return
        if stat.S_ISDIR(st.st_mode):
            return
        if self._kept.get(rel) == (st.st_size, st.st_mtime_ns):
            return  # an input processed in keep mode, unchanged since
        if path not in self.tracker:
            self._log.debug("file.detected", input=rel, how=kind)
        self.tracker.hint(path, kind)

    def _recover_stale_claims(self) -> None:
        """Claims another instance left and will not finish (its heartbeat is old) are taken
        into this instance's work folder, with their records, and processed here."""
        if self.folders.work_root is None:
            return
        try:
            taken = lifecycle.adopt_claims(self.folders, self.settings.watch.stale_claims_after,
                                           self._next_seq)
        except OSError as exc:
            self._log.warning("claims.recover_failed", error=str(exc))
            return
        # what the dead instance's workers left half-written for these claims' outputs
        for path in files.remove_dead_temps([p for _, c in taken for _, p in c.outputs],
                                            self.folders.output):
            self._log.info("file.temp_removed", path=path, why="left by a process that is gone")
        for src, c in taken:
            self._log.warning("claim.recovered", claim=src, to=c.work_path, input=c.rel,
                              why="its instance's heartbeat is older than "
                                  f"{self.settings.watch.stale_claims_after:g} s")
            self._rels.add(c.rel)
            self._dispatch(c)

    def _reconcile(self, count: bool = True) -> int:
        """Scan the inbox for files no event told about; returns how many were new. Never
        raises: a folder it cannot walk is skipped (and logged by the scan)."""
        ws = self.settings.watch
        found = 0
        try:
            fd = self._intake_fd()
            for rel in sources.scan(fd, recursive=ws.recursive, patterns=ws.ignore):
                path = os.path.join(self.folders.inbox, rel)
                if path in self.tracker or rel in self._rels:
                    continue
                before = len(self.tracker)
                self._hint(sources.SCAN, path)
                found += len(self.tracker) - before
        except OSError as exc:
            self._log.error("reconcile.failed", inbox=self.folders.inbox, error=str(exc))
        if count and found:
            self.counts["reconcile_found"] += found
            self.metrics.reconcile_found.inc(found)
            self._log.warning("reconcile.found", files=found,
                              why="no event arrived for them (missed or overflowed)")
        self._log.debug("reconcile.done", new=found, pending=len(self.tracker),
                        in_flight=len(self.claims))
        return found

    def _claim_ready(self) -> None:
        room = self._max_in_flight - len(self.claims)
        if room <= 0:
            return  # back-pressure: the rest wait in the inbox, never dropped
        for path in self.tracker.ready():  # lazily: stop at the room left, the rest unlooked
            if room <= 0:
                break
            rel = os.path.relpath(path, self.folders.inbox)
            if rel in self._rels:
                continue  # the same name is in flight; take this one when it is done
            if path in self._claim_wait and self._claim_wait[path][0] > time.monotonic():
                continue
            if self.settings.watch.on_success == "keep" and self._outputs_exist(path, rel):
                continue
            try:
                c = claiming.claim(self.folders, path, self._next_seq(), time.time())
            except NotClaimed as exc:
                if not safefs.exists(self._intake_fd(), rel):
                    self.tracker.forget(path)  # gone, or only reachable through a link now
                cause = getattr(exc.__cause__, "errno", None)
                if cause in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                    self._log.warning("file.not_claimed", input=rel, why=str(exc))
                else:
                    self._log.debug("file.not_claimed", input=rel, why=str(exc))
                continue
            except OSError as exc:
                failures = self._claim_wait.get(path, (0.0, 0, ""))[1] + 1
                delay = min(60.0, 0.5 * 2 ** (failures - 1))
                self._claim_wait[path] = (time.monotonic() + delay, failures, str(exc))
                if failures == 1 or failures % 10 == 0:
                    self._log.warning("file.claim_failed", input=rel, error=str(exc),
                                      failures=failures, retry_in_s=delay)
                continue
            self._claim_wait.pop(path, None)
            self.tracker.forget(path)
            self._rels.add(rel)
            room -= 1
            self._dispatch(c)

    def _outputs_exist(self, path: str, rel: str) -> bool:
        outputs = self._natural_outputs(rel, path)
        if outputs and all(os.path.exists(o) for o in outputs):
            st = os.lstat(path)
            self._kept[rel] = (st.st_size, st.st_mtime_ns)
            self.tracker.forget(path)
            self.counts["skipped"] += 1
            self._log.info("file.skipped", input=rel, outputs=outputs,
                           reason="outputs-exist")
            return True
        return False

    def _dispatch(self, c: Claim) -> None:
        """Quarantine what must never be read (judged by lstat of the claimed name in the work
        folder: nothing is opened); queue the rest."""
        try:
            st = os.lstat(c.work_path)
        except FileNotFoundError:
            self._forget(c)
            self._log.warning("file.vanished", input=c.rel, why="gone from the work folder")
            return
        if stat.S_ISLNK(st.st_mode):
            self._quarantine(c, "symlink", "a symbolic link; its target was not read", "", [])
            return
        if stat.S_ISDIR(st.st_mode):
            self._put_back(c)
            return
        if not stat.S_ISREG(st.st_mode):
            self._quarantine(c, "not-a-file", "not a regular file (FIFO, socket or device); "
                             "it was not opened", "", [])
            return
        if st.st_nlink > 1 and self.settings.watch.hard_links == "quarantine":
            self._quarantine(c, "hard-link", f"it has {st.st_nlink} hard links: its data may "
                             "belong to a file elsewhere; it was not opened (hard_links = "
                             "\"process\" takes such files)", "", [])
            return
        too_long, flat = self._too_long(c)
        if flat:
            self._quarantine_flat(c, too_long)
            return
        if too_long:
            self._quarantine(c, "path-too-long", too_long, "", [])
            return
        self._submit(c)

    def _intake_fd(self) -> int:
        """The inbox's descriptor (opened once: below it no link is followed); the tracker
        looks at files through it too, so that any depth works."""
        fd = safefs.root(self.folders.inbox)
        if getattr(self, "_intake_bound", None) != fd:
            inbox = self.folders.inbox
            self.tracker.use_stat(lambda p: safefs.lstat(fd, os.path.relpath(p, inbox)))
            self._intake_bound = fd
        return fd

    def _put_back(self, c: Claim) -> None:
        """A name that became a folder between the look and the claim: back into the inbox,
        where its files are scanned and taken one by one."""
        try:
            moves.keep(self.folders, c)
        except OSError as exc:
            self._quarantine(c, "not-a-file", f"a folder, claimed in a race, that could not "
                             f"be put back: {exc}", "", [])
            return
        claiming.drop_record(c)
        self._forget(c)
        self._log.warning("file.not_claimed", input=c.rel, why="it is a folder (it replaced "
                          "a file); put back, its files are taken one by one")

    def _too_long(self, c: Claim) -> tuple[str, bool]:
        """Why the input's outputs, archive or quarantine path would be too long for the file
        system ("" when they fit), and whether its quarantine path is: then it is quarantined
        flat (``_quarantine_flat``). Archive and quarantine names are shortened to fit; the
        output names are planned whole."""
        limit = files.PATH_MAX
        mirrored = [os.path.join(self.folders.archive, c.rel),
                    os.path.join(self.folders.quarantine, c.rel + moves.SIDECAR)]
        for p in mirrored:
            size = len(os.fsencode(os.path.dirname(p))) + files.NAME_MAX + 1
            if size >= limit:
                return (f"{c.rel}: its archive or quarantine path would be up to {size} bytes, "
                        f"more than the {limit - 1} the system allows", True)
        for o in self._natural_outputs(c.rel, c.work_path):
            # names are shortened to fit NAME_MAX (naming); the folders mirror the inbox's
            size = len(os.fsencode(os.path.dirname(o))) + files.NAME_MAX + 1
            if size >= limit:
                return (f"{c.rel}: its output {o} would be up to {size} bytes, more than the "
                        f"{limit - 1} the system allows", False)
        return "", False

    def _quarantine_flat(self, c: Claim, error: str) -> None:
        """Quarantine at the quarantine's top under a short name; the sidecar's error holds
        the whole original path below the inbox."""
        flat = replace(c, rel=files.short_name(os.path.basename(c.rel), files.NAME_MAX - 16))
        self._log.warning("file.path_too_long", input=c.rel, quarantined_as=flat.rel)
        self._quarantine(flat, "path-too-long", error, "", [])
        self._rels.discard(c.rel)

    def _plan(self, c: Claim) -> tuple[tuple[OutputPlan, ...], bool]:
        """The outputs ``c`` writes, and whether they may replace files of those names.

        Through the one naming component: no two claims ever hold the same output path, and a
        new input never takes the name of a file already there (it gets a counter). A claim
        that recorded its outputs (a retry, or a restart after a crash) gets exactly those back
        and may replace them: they are its own."""
        pipes = self._pipelines
        recorded = [p for _, p in c.outputs]
        if c.outputs and [n for n, _ in c.outputs] == [p.name for p in pipes] and \
                self.names.reuse(recorded, c.seq):
            return tuple(OutputPlan(n, p) for n, p in c.outputs), not c.adopted
        self.names.release(c.seq)
        rel_dir, name = os.path.split(c.rel)
        stem = os.path.splitext(name)[0]
        folder = os.path.join(self.folders.output, rel_dir)
        formats = self.settings.limits.formats
        outputs = tuple(OutputPlan(p.name, self.names.claim(
            folder, stem, p.suffix, batch.output_ext(p.output, c.work_path, formats),
            avoid_existing=True, owner=c.seq)) for p in pipes)
        return outputs, False

    def _natural_outputs(self, rel: str, path: str) -> list[str]:
        """The first-choice output paths of an input (keep mode: are they there already?)."""
        rel_dir, name = os.path.split(rel)
        stem = os.path.splitext(name)[0]
        folder = os.path.join(self.folders.output, rel_dir)
        formats = self.settings.limits.formats
        return [os.path.join(folder, naming.output_name(
            stem, p.suffix, batch.output_ext(p.output, path, formats))) for p in self._pipelines]

    def _submit(self, c: Claim) -> None:
        assert self.engine is not None
        outputs, own = self._plan(c)
        c.outputs = tuple((o.pipeline, o.path) for o in outputs)
        try:
            claiming.save_record(c)  # durable before any output is written
        except OSError as exc:
            self._transient(c, "write-failed", f"cannot record the claim: {exc}",
                            {"input": c.rel})
            return
        task = Task(c.seq, c.work_path, outputs, overwrite=own, nofollow=True,
                    max_links=1 if self.settings.watch.hard_links == "quarantine" else 0,
                    root=self.folders.output)
        c.seen = _identity(c.work_path)
        c.submitted_at = time.monotonic()
        self.claims[c.seq] = c
        self.engine.submit(task)
        self._log.info("file.queued", input=c.rel, seq=c.seq)

    def _retry_due(self) -> None:
        now = time.monotonic()
        for c in [c for c in self._retry if c.retry_at <= now]:
            self._retry.remove(c)
            self._submit(c)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- fates ----------------------------------------------------------------------------------
    #
    # Whose fault is a failure (the one rule; see the README's "Reasons"):
    # - the input's: every reason but write-failed and io-error (the worker decoded, or failed
    #   to decode, the data itself: corrupt, truncated, not-an-image, a bomb, a crash it
    #   caused twice...), and a write that failed because of the input's own name or path
    #   (ENAMETOOLONG: path-too-long). Quarantined at once.
    # - not the input's: write-failed and io-error (the file system refused a write, a read
    #   failed at the system level). The input stays in the work folder and is retried after a
    #   back-off, at most retry_max times and retry_max_age seconds; past either bound, or
    #   after ISOLATED_FAILURES failures each followed by other inputs succeeding (the same
    #   write works for others: evidence that the fault is this input's), it is quarantined as
    #   "gave-up" with the last error.
    # A fate whose own move fails (a full archive or quarantine) is not re-processed: the input
    # stays in the work folder and the move is retried (``_Deferred``).

    def _fate(self, r: Result) -> None:
        c = self.claims.pop(r.seq, None)
        if c is None:
            return  # a late duplicate: the fate was decided already
        common = {"input": c.rel, "claim": c.token, "outputs": list(r.outputs), "worker": r.worker,
                  "duration_ms": round(r.duration * 1000, 1), "attempt": r.attempt}
        if r.reason not in ("cancelled", "missing") and _identity(c.work_path) != c.seen:
            # A writer still had it open and changed it after it was claimed: the result (an
            # output, or "truncated") may be of a version that no longer is. Made again from
            # what is there now, bounded like any retry.
            self._transient(c, "changed", "the input changed while it was processed", common)
        elif r.ok:
            self._successes += 1
            self._carry_out(c, "archive", lambda: self._processed(c, r, common))
        elif r.reason == "cancelled":
            self._forget(c)  # stays in the work folder: the next start takes it up
            self._log.info("file.left", input=c.rel, where=c.work_path, why=r.error)
        elif r.reason == "missing":
            self._forget(c)
            self._log.warning("file.vanished", input=c.rel, claim=c.token, why=r.error)
            claiming.drop_record(c)
        elif r.reason == "write-failed" and "[Errno 36]" in r.error:  # ENAMETOOLONG
            self._quarantine(c, "path-too-long", r.error, r.error_type, list(r.outputs), r)
        elif r.reason == "output-conflict":
            # someone else wrote a name meanwhile: plan others; what this attempt published
            # under its own names before the conflict goes (the next attempt names anew)
            for path in r.outputs:
                files.remove_output(path, self.folders.output)
            c.outputs = ()
            self._transient(c, r.reason, r.error, common)
        elif r.reason in TRANSIENT_REASONS:
            self._transient(c, r.reason, r.error, common)
        else:
            self._quarantine(c, r.reason, r.error, r.error_type, list(r.outputs), r)

    def _processed(self, c: Claim, r: Result, common: dict[str, Any]) -> None:
        where = self._success(c)
        self._forget(c)
        self.counts["processed"] += 1
        for p in self._pipelines:
            self.metrics.processed.labels(p.name).inc()
        self.metrics.duration.observe(r.duration)
        self.metrics.bytes_in.inc(r.bytes_in)
        self.metrics.bytes_out.inc(r.bytes_out)
        self._log.info("file.processed", **common, on_success=self.settings.watch.on_success,
                       moved_to=where, bytes_in=r.bytes_in, bytes_out=r.bytes_out,
                       **({"warnings": list(r.warnings)} if r.warnings else {}))
        claiming.drop_record(c)  # after the line: a kill between leaves it for the next start

    def _success(self, c: Claim) -> str | None:
        mode = self.settings.watch.on_success
        if mode == "delete":
            moves.delete(c)
            return None
        if mode == "keep":
            dest = moves.keep(self.folders, c)
            st = os.lstat(dest)
            self._kept[os.path.relpath(dest, self.folders.inbox)] = (st.st_size, st.st_mtime_ns)
            return dest
        return moves.archive(self.folders, c)

    def _log_settled(self, c: Claim) -> None:
        """The fate line a killed run never wrote: its claim's file had left the work folder
        (archived, quarantined, deleted) but its record was still there. Marked
        ``recovered``; the record goes after it."""
        fate, doc = claiming.fate_of(self.folders, c)
        outputs = [path for _, path in c.outputs]
        why = "logged at this start: the run that carried out the fate was killed before " \
              "writing this line"
        if fate == "processed":
            self.counts["processed"] += 1
            self._log.info("file.processed", input=c.rel, claim=c.token, outputs=outputs,
                           on_success=self.settings.watch.on_success, recovered=True, why=why)
        elif fate == "quarantined":
            self.counts["quarantined"] += 1
            self._log.error("file.quarantined", input=c.rel, claim=c.token,
                            reason=doc.get("reason"),
                            error=doc.get("error"), error_type=doc.get("error_type"),
                            quarantined_as=os.path.join(self.folders.quarantine,
                                                        str(doc.get("quarantined_as", ""))),
                            recovered=True, why=why)
        elif fate == "vanished":
            self._log.warning("file.vanished", input=c.rel, claim=c.token, recovered=True,
                              why="its claim's file is gone from the work folder and not "
                                  "every output it planned exists")
        claiming.drop_record(c)

    def _transient(self, c: Claim, reason: str, error: str, common: dict[str, Any]) -> None:
        ws = self.settings.watch
        now = time.time()
        if c.transient_failures and self._successes > c.successes_seen:
            c.isolated_failures += 1  # others succeeded since its last failure
        c.successes_seen = self._successes
        c.transient_failures += 1
        c.first_failure_at = c.first_failure_at or now
        c.last_error = f"{reason}: {error}"
        age = now - c.first_failure_at
        why = ""
        if c.transient_failures > ws.retry_max:
            why = f"failed {c.transient_failures} times (retry_max = {ws.retry_max})"
        elif age > ws.retry_max_age:
            why = f"still failing {age:.0f} s after the first time (retry_max_age = " \
                  f"{ws.retry_max_age:g})"
        elif c.isolated_failures >= ISOLATED_FAILURES:
            why = (f"failed {c.transient_failures} times while other inputs succeeded: the "
                   "fault looks like this input's")
        if why:
            self.counts["gave_up"] += 1
            self._quarantine(c, "gave-up", f"{why}; last error: {c.last_error}", "",
                             [p for _, p in c.outputs])
            return
        delay = min(ws.retry_backoff_max, ws.retry_backoff * 2 ** (c.transient_failures - 1))
        delay *= random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not cryptography
        c.retry_at = time.monotonic() + delay
        self._retry.append(c)
        with contextlib.suppress(OSError):
            claiming.save_record(c)  # the count survives a restart
        self.counts["retried"] += 1
        self.metrics.retried.labels(reason).inc()
        self._log.warning("file.retried", **common, reason=reason, error=error,
                          failures=c.transient_failures, retry_in_s=round(delay, 2),
                          retries_left=ws.retry_max - c.transient_failures + 1,
                          why="not the input's fault: kept and retried later")

    def _quarantine(self, c: Claim, reason: str, error: str, error_type: str,
                    outputs: list[str], r: Result | None = None) -> None:
        for path in outputs:  # outputs of an input that failed elsewhere would be orphans
            files.remove_output(path, self.folders.output)
        info = {"reason": reason, "error": error, "error_type": error_type,
                "pipelines": [p.name for p in self._pipelines],
                "attempts": r.attempt if r else 0, "worker_pid": r.worker if r else None,
                "transient_failures": c.transient_failures,
                "warnings": list(r.warnings) if r else []}

        def carry_out() -> None:
            dest = moves.quarantine(self.folders, c, info)
            self._forget(c)
            self.counts["quarantined"] += 1
            self.metrics.quarantined.labels(reason).inc()
            self._log.error("file.quarantined", input=c.rel, claim=c.token, reason=reason,
                            error=error,
                            error_type=error_type, quarantined_as=dest,
                            worker=r.worker if r else None, attempt=r.attempt if r else 0)
            claiming.drop_record(c)

        self._carry_out(c, "quarantine", carry_out)

    def _carry_out(self, c: Claim, what: str, act: Callable[[], None]) -> None:
        """Carry out a decided fate; when its move fails (a full disk), keep the input in the
        work folder and try the same move again later: the fate is not decided again."""
        try:
            act()
        except OSError as exc:
            d = _Deferred(c, what, act)
            self._defer(d, exc)

    def _defer(self, d: _Deferred, exc: OSError) -> None:
        ws = self.settings.watch
        d.failures += 1
        d.error = str(exc)
        delay = min(ws.retry_backoff_max, ws.retry_backoff * 2 ** (d.failures - 1))
        d.retry_at = time.monotonic() + delay
        self._deferred.append(d)
        if d.failures == 1 or d.failures % 10 == 0:
            self._log.warning("file.fate_deferred", input=d.claim.rel, fate=d.what,
                              error=d.error, failures=d.failures, retry_in_s=round(delay, 2),
                              why="the move out of the work folder failed; the input stays "
                                  "there and the move is tried again")

    def _deferred_due(self) -> None:
        now = time.monotonic()
        for d in [d for d in self._deferred if d.retry_at <= now]:
            self._deferred.remove(d)
            try:
                d.act()
            except OSError as exc:
                self._defer(d, exc)

    def _forget(self, c: Claim) -> None:
        self._rels.discard(c.rel)
        self.claims.pop(c.seq, None)
        self.names.release(c.seq)

    # --- signals ----------------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self._signals and not self._stopping:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                self._reload()
            else:
                self._stopping = sig

    def _reload(self) -> None:
        try:
            new = self._load()
        except ConfigError as exc:
            self._log.error("config.reload_failed", error=str(exc), kept="the running config")
            return
        if _folders(new).named() != self.folders.named():
            self._log.warning("config.folders_unchanged",
                              why="folders cannot change on reload; restart the daemon for that")
            new = replace(new, watch=replace(new.watch, **self.settings.watch.folders()))
        old_engine = self.engine
        self.settings = new
        self.tracker.settle = new.watch.settle
        self.engine = self._new_engine()
        if old_engine is not None:
            withdrawn = old_engine.stop_intake()
            self._draining.append(old_engine)
            for t in withdrawn:
                c = self.claims.pop(t.seq, None)
                if c is not None:
                    self._submit(c)  # planned again with the new pipelines
        self._log.info("config.reloaded", workers=new.engine.workers,
                       pipelines=[p.name for p in self._pipelines], source=new.source)

    def _shutdown(self) -> int:
        sig = self._stopping
        assert self.engine is not None
        self.metrics.ready = False
        self.notifier.stopping(f"draining {self.engine.outstanding} file(s)")
        self._log.info("daemon.stopping", signal=signal.Signals(sig).name,
                       running=self.engine.outstanding, grace=self.settings.engine.grace)
        if self.observer is not None:
            self.observer.stop()
        withdrawn = self.engine.stop_intake()
        for t in withdrawn:
            c = self.claims.pop(t.seq, None)
            if c is not None:
                self._forget(c)  # unstarted: stays in the work folder for the next start
        for e in [self.engine, *self._draining]:
            deadline = time.monotonic() + self.settings.engine.grace
            while e.outstanding and time.monotonic() < deadline and not self._second_signal():
                for r in e.poll(TICK, respawn=False):
                    self._fate(r)
                self._beat(state="stopping")  # keep the watchdog fed while draining
            for r in e.close(0 if e.outstanding else 1.0):
                self._fate(r)
        self._draining.clear()
        self.engine = None
        left = len(list(claiming.leftover_claims(self.folders)))
        with contextlib.suppress(OSError):
            health.write(health.heartbeat_path(self.folders.work), {"state": "stopped"})
        self._log.info("daemon.stopped", **self.counts, left_in_work=left,
                       left_in_inbox=len(list(sources.scan(
                           self.folders.inbox, recursive=self.settings.watch.recursive,
                           patterns=self.settings.watch.ignore))))
        self._runlock.release()  # every worker is gone
        return 0 if not self._second_signal() else 128 + sig

    def _second_signal(self) -> bool:
        return any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals)


@dataclass
class _Deferred:
    """A fate decided whose move out of the work folder failed; ``act`` tries it again."""

    claim: Claim
    what: str  # archive | quarantine
    act: Callable[[], None]
    failures: int = 0
    retry_at: float = 0.0
    error: str = ""


def _identity(path: str) -> tuple[int, int, int] | None:
    """(size, mtime, ctime) of a claimed file, to tell whether it changed while processed."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _folders(s: Settings) -> Folders:
    """The daemon's folders; with an instance name, its own work folder below ``work``."""
    ws = s.watch
    return Folders(ws.folders(), work_root=ws.work if ws.instance else None)


def _for_watch(settings: Settings) -> Settings:
    """``settings``, refused where watch mode cannot honour them."""
    if settings.engine.start_method == "fork":
        raise ConfigError("engine.start_method", "'fork' is not safe in watch mode (the inbox "
                          "observer runs threads); use auto, forkserver or spawn")
    return settings
