"""Intake: files noticed in the inbox (observer events, the backlog scan, reconcile scans), told
complete by the stability tracker, and claimed up to the in-flight limit; claims left by an
earlier run or by a stale instance taken up again.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable

from watcher.fs import files, safefs
from watcher.watch import claiming, lifecycle, sources
from watcher.watch.claiming import NotClaimed
from watcher.watch.context import Context, InFlight
from watcher.watch.dispatch import Dispatch
from watcher.watch.observer import InboxObserver


class Intake:
    """The inbox side of the daemon: its observer, its tracker, and the claims made from it."""

    def __init__(self, ctx: Context, held: InFlight, dispatch: Dispatch,
                 wake: Callable[[], None]) -> None:
        self._ctx = ctx
        self._log = ctx.log
        self._held = held
        self._dispatch = dispatch
        self._wake = wake
        self.tracker = sources.Stability(ctx.settings.watch.settle)
        self.observer: InboxObserver | None = None
        self._kept: dict[str, tuple[int, int]] = {}  # keep mode: inputs left in the inbox
        # inbox files whose claim failed (a full disk, no permission): path -> (next try,
        # failures, last error)
        self._claim_wait: dict[str, tuple[float, int, str]] = {}
        self._intake_bound: int | None = None

    def take_leftover(self) -> int:
        """Dispatch the claims an earlier run left in the work folder; how many."""
        recovered = 0
        for c in claiming.leftover(self._ctx.folders, self._held.next_seq, keep_settled=True):
            self._held.rels.add(c.rel)
            self._dispatch.dispatch(c)
            recovered += 1
        return recovered

    def start_observer(self) -> None:
        ws = self._ctx.settings.watch
        self.observer = InboxObserver(
            self._ctx.folders.inbox, kind=ws.observer, recursive=ws.recursive,
            poll_interval=ws.poll_interval, wake=self._wake)
        self.observer.start()
        self.tracker.close_events = self.observer.kind == "inotify"

    def poll_observer(self) -> None:
        """Hand the observer's events to the tracker; rescan after an overflow, and restart a
        dead observer (and rescan)."""
        assert self.observer is not None
        overflowed = False
        for kind, path in self.observer.drain():
            if kind == sources.OVERFLOW:
                overflowed = True
                continue
            self._hint(kind, path)
        if overflowed:  # events were lost: what they would have said is found by a scan now
            self._ctx.counts["overflows"] += 1
            self._ctx.metrics.overflows.inc()
            self._log.warning("observer.overflowed", inbox=self._ctx.folders.inbox,
                              overflows=self._ctx.counts["overflows"],
                              why="the kernel's event queue overflowed; rescanning the inbox")
            self.reconcile()
        if not self.observer.healthy():
            self.observer.restart()
            self.tracker.close_events = self.observer.kind == "inotify"
            self.reconcile()

    def remember_kept(self, dest: str) -> None:
        """Keep mode put a processed input back at ``dest``: unchanged, it is not taken again."""
        st = os.lstat(dest)
        self._kept[os.path.relpath(dest, self._ctx.folders.inbox)] = (st.st_size, st.st_mtime_ns)

    def claim_problem(self) -> str:
        """The files in the inbox that cannot be claimed, as one problem line ("" if none)."""
        for path in [p for p in self._claim_wait if p not in self.tracker]:
            del self._claim_wait[path]  # gone from the inbox (or claimed by another instance)
        if not self._claim_wait:
            return ""
        path, (_, failures, error) = next(iter(self._claim_wait.items()))
        return (f"{len(self._claim_wait)} file(s) in the inbox that cannot be claimed "
                f"(e.g. {os.path.relpath(path, self._ctx.folders.inbox)}, {failures} "
                f"failure(s): {error})")

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()

    def _hint(self, kind: str, path: str) -> None:
        inbox = self._ctx.folders.inbox
        if not path.startswith(inbox.rstrip("/") + "/"):
            return
        rel = os.path.relpath(path, inbox)
        if sources.ignored(rel, self._ctx.settings.watch.ignore):
            return
        if kind == sources.DIR:
            if self._ctx.settings.watch.recursive:  # walked by descriptor: a link is not entered
                for r in sources.scan(self._intake_fd(), recursive=True,
                                      patterns=self._ctx.settings.watch.ignore, under=rel):
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

    def recover_stale_claims(self) -> None:
        """Claims another instance left and will not finish (its heartbeat is old) are taken
        into this instance's work folder, with their records, and processed here."""
        if self._ctx.folders.work_root is None:
            return
        try:
            taken = lifecycle.adopt_claims(
                self._ctx.folders, self._ctx.settings.watch.stale_claims_after,
                self._held.next_seq)
        except OSError as exc:
            self._log.warning("claims.recover_failed", error=str(exc))
            return
        # what the dead instance's workers left half-written for these claims' outputs
        for path in files.remove_dead_temps([p for _, c in taken for _, p in c.outputs],
                                            self._ctx.folders.output):
            self._log.info("file.temp_removed", path=path, why="left by a process that is gone")
        for src, c in taken:
            self._log.warning("claim.recovered", claim_path=src, to=c.work_path, input=c.rel,
                              why="its instance's heartbeat is older than "
                                  f"{self._ctx.settings.watch.stale_claims_after:g} s")
            self._held.rels.add(c.rel)
            self._dispatch.dispatch(c)

    def reconcile(self, count: bool = True) -> int:
        """Scan the inbox for files no event told about; returns how many were new. Never
        raises: a folder it cannot walk is skipped (and logged by the scan)."""
        ws = self._ctx.settings.watch
        found = 0
        try:
            fd = self._intake_fd()
            for rel in sources.scan(fd, recursive=ws.recursive, patterns=ws.ignore):
                path = os.path.join(self._ctx.folders.inbox, rel)
                if path in self.tracker or rel in self._held.rels:
                    continue
                before = len(self.tracker)
                self._hint(sources.SCAN, path)
                found += len(self.tracker) - before
        except OSError as exc:
            self._log.error("reconcile.failed", inbox=self._ctx.folders.inbox, error=str(exc))
        if count and found:
            self._ctx.counts["reconcile_found"] += found
            self._ctx.metrics.reconcile_found.inc(found)
            self._log.warning("reconcile.found", files=found,
                              why="no event arrived for them (missed or overflowed)")
        self._log.debug("reconcile.done", files=found, pending=len(self.tracker),
                        in_flight=len(self._held.claims))
        return found

    def claim_ready(self) -> None:
        room = self._ctx.max_in_flight - len(self._held.claims)
        if room <= 0:
            return  # back-pressure: the rest wait in the inbox, never dropped
        for path in self.tracker.ready():  # lazily: stop at the room left, the rest unlooked
            if room <= 0:
                break
            rel = os.path.relpath(path, self._ctx.folders.inbox)
            if rel in self._held.rels:
                continue  # the same name is in flight; take this one when it is done
            if path in self._claim_wait and self._claim_wait[path][0] > time.monotonic():
                continue
            if self._ctx.settings.watch.on_success == "keep" and self._outputs_exist(path, rel):
                continue
            try:
                c = claiming.claim(self._ctx.folders, path, self._held.next_seq(), time.time())
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
            self._held.rels.add(rel)
            room -= 1
            self._dispatch.dispatch(c)

    def _outputs_exist(self, path: str, rel: str) -> bool:
        outputs = self._dispatch.natural_outputs(rel, path)
        if outputs and all(os.path.exists(o) for o in outputs):
            st = os.lstat(path)
            self._kept[rel] = (st.st_size, st.st_mtime_ns)
            self.tracker.forget(path)
            self._ctx.counts["skipped"] += 1
            self._log.info("file.skipped", input=rel, outputs=outputs,
                           reason="outputs-exist")
            return True
        return False

    def _intake_fd(self) -> int:
        """The inbox's descriptor (opened once: below it no link is followed); the tracker
        looks at files through it too, so that any depth works."""
        fd = safefs.root(self._ctx.folders.inbox)
        if self._intake_bound != fd:
            inbox = self._ctx.folders.inbox
            self.tracker.use_stat(lambda p: safefs.lstat(fd, os.path.relpath(p, inbox)))
            self._intake_bound = fd
        return fd
