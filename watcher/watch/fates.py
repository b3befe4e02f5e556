"""Fates: each finished file's one fate, decided exactly once and carried out: processed
(archived, deleted or kept), quarantined with a sidecar, or retried later when the failure was
not the input's fault; a fate whose move fails waits in the work folder and is tried again.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watcher.errors import TRANSIENT_REASONS
from watcher.fs import files
from watcher.tasks import Result
from watcher.watch import claiming, duplicates, fatedoc, moves
from watcher.watch.claiming import Claim, identity
from watcher.watch.context import Context, InFlight

# Failures not the input's fault, after each of which other inputs succeeded: this many, and the
# evidence says the fault is this input's after all (it is quarantined "gave-up").
ISOLATED_FAILURES = 3


class Fates:
    """Decides and carries out the fates of the results the engines return (``fate``), and of
    what a killed run settled without logging it (``log_settled``).

    Whose fault is a failure (the one rule; see the README's "Reasons"):
    - the input's: every reason but write-failed and io-error (the worker decoded, or failed
      to decode, the data itself: corrupt, truncated, not-an-image, a bomb, a crash it
      caused twice...), and a write that failed because of the input's own name or path
      (ENAMETOOLONG: path-too-long). Quarantined at once.
    - not the input's: write-failed and io-error (the file system refused a write, a read
      failed at the system level). The input stays in the work folder and is retried after a
      back-off, at most retry_max times and retry_max_age seconds; past either bound, or
      after ISOLATED_FAILURES failures each followed by other inputs succeeding (the same
      write works for others: evidence that the fault is this input's), it is quarantined as
      "gave-up" with the last error.
    A fate whose own move fails (a full archive or quarantine) is not re-processed: the input
    stays in the work folder and the move is retried (``_Deferred``).

    ``kept(dest)`` hears where keep mode put a processed input back in the inbox. Each fate
    line is followed by its notification (``_notify``: a queue put, when that fate is wanted).
    """

    def __init__(self, ctx: Context, held: InFlight, kept: Callable[[str], None]) -> None:
        self._ctx = ctx
        self._log = ctx.log
        self._held = held
        self._kept = kept
        self.deferred: list[_Deferred] = []  # fates decided whose move failed (a full disk)
        self._successes = 0  # inputs processed since start: evidence for isolated failures
        self._seen_warned = False

    def fate(self, r: Result) -> None:
        c = self._held.claims.pop(r.seq, None)
        if c is None:
            return  # a late duplicate: the fate was decided already
        common = {"input": c.rel, "claim": c.token, "outputs": list(r.outputs),
                  "worker_pid": r.worker,
                  "duration_ms": round(r.duration * 1000, 1), "attempt": r.attempt}
        if r.reason not in ("cancelled", "missing") and identity(c.work_path) != c.seen:
            # A writer still had it open and changed it after it was claimed: the result (an
            # output, or "truncated") may be of a version that no longer is. Made again from
            # what is there now, bounded like any retry.
            self.transient(c, "changed", "the input changed while it was processed", common, r)
        elif r.ok:
            self._successes += 1
            self._carry_out(c, "archive", lambda: self._processed(c, r, common))
        elif r.reason == "cancelled":
            self._held.forget(c)  # stays in the work folder: the next start takes it up
            self._log.info("file.left", input=c.rel, where=c.work_path, why=r.error)
        elif r.reason == "missing":
            self._held.forget(c)
            self._log.warning("file.vanished", input=c.rel, claim=c.token, why=r.error)
            self._notify("vanished", c, r, reason="missing", error=r.error)
            self._ctx.board.record("vanished", c.rel, error=r.error)
            claiming.drop_record(c)
        elif r.reason == "write-failed" and "[Errno 36]" in r.error:  # ENAMETOOLONG
            self.quarantine(c, "path-too-long", r.error, r.error_type, list(r.outputs), r)
        elif r.reason == "output-conflict":
            # someone else wrote a name meanwhile: plan others; what this attempt published
            # under its own names before the conflict goes (the next attempt names anew)
            for path in r.outputs:
                files.remove_output(path, self._ctx.folders.output)
            c.outputs = ()
            self.transient(c, r.reason, r.error, common, r)
        elif r.reason in TRANSIENT_REASONS:
            self.transient(c, r.reason, r.error, common, r)
        else:
            self.quarantine(c, r.reason, r.error, r.error_type, list(r.outputs), r)

    def _processed(self, c: Claim, r: Result, common: dict[str, Any]) -> None:
        where = self._success(c)
        self._remember(c, list(r.outputs))
        self._held.forget(c)
        self._ctx.counts["processed"] += 1
        for p in self._ctx.pipelines:
            self._ctx.metrics.processed.labels(p.name).inc()
        self._ctx.metrics.duration.observe(r.duration)
        self._ctx.metrics.input_bytes.inc(r.bytes_in)
        self._ctx.metrics.output_bytes.inc(r.bytes_out)
        self._ctx.board.record("processed", c.rel, outputs=tuple(r.outputs), where=where or "",
                               duration_s=round(r.duration, 3), input_bytes=r.bytes_in,
                               output_bytes=r.bytes_out)
        self._log.info("file.processed", **common, on_success=self._ctx.settings.watch.on_success,
                       moved_to=where, input_bytes=r.bytes_in, output_bytes=r.bytes_out,
                       **({"warnings": list(r.warnings)} if r.warnings else {}))
        self._notify("processed", c, r, outputs=list(r.outputs), moved_to=where)
        claiming.drop_record(c)  # after the line: a kill between leaves it for the next start

    def _remember(self, c: Claim, outputs: list[str]) -> None:
        """Record a processed input for duplicates, now that its fate was carried out."""
        if not c.digest:
            return
        try:
            self._ctx.seen().record(c.digest, c.config, c.rel, outputs)
        except (sqlite3.Error, OSError) as exc:
            self.seen_unavailable(exc)

    def seen_unavailable(self, exc: BaseException) -> None:
        if not self._seen_warned:
            self._seen_warned = True
            self._log.warning("duplicates.unavailable", error=str(exc),
                              database=self._ctx.seen().path,
                              why="the database of processed inputs cannot be used; inputs "
                                  "are processed as if new")

    def duplicate(self, c: Claim, earlier: duplicates.Earlier) -> None:
        """``c`` has the bytes of ``earlier`` under the same configuration: not processed
        again; its input leaves the work folder as a processed one would."""
        def act() -> None:
            where = self._success(c)
            self._held.forget(c)
            self._log.info("file.duplicate", input=c.rel, claim=c.token,
                           earlier_input=earlier.input, earlier_outputs=earlier.outputs,
                           earlier_at=time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                    time.localtime(earlier.at)),
                           on_success=self._ctx.settings.watch.on_success, moved_to=where,
                           why="its bytes and the pipeline configuration were processed "
                               "before (duplicates = \"process\" processes it again)")
            claiming.drop_record(c)

        self._carry_out(c, "archive", act)

    def _success(self, c: Claim) -> str | None:
        mode = self._ctx.settings.watch.on_success
        if mode == "delete":
            moves.delete(c)
            return None
        if mode == "keep":
            dest = moves.keep(self._ctx.folders, c)
            self._kept(dest)
            return dest
        return moves.archive(self._ctx.folders, c)

    def log_settled(self, c: Claim) -> None:
        """The fate line a killed run never wrote: its claim's file had left the work folder
        (archived, quarantined, deleted) but its record was still there. Marked
        ``recovered``; the record goes after it."""
        fate, doc = claiming.fate_of(self._ctx.folders, c)
        outputs = [path for _, path in c.outputs]
        why = "logged at this start: the run that carried out the fate was killed before " \
              "writing this line"
        if fate == "processed":
            self._ctx.counts["processed"] += 1
            self._log.info("file.processed", input=c.rel, claim=c.token, outputs=outputs,
                           on_success=self._ctx.settings.watch.on_success, recovered=True, why=why)
            self._notify("processed", c, None, outputs=outputs, recovered=True)
        elif fate == "quarantined":
            self._ctx.counts["quarantined"] += 1
            self._log.error("file.quarantined", input=c.rel, claim=c.token,
                            reason=doc.get("reason"),
                            error=doc.get("error"), error_type=doc.get("error_type"),
                            quarantined_as=os.path.join(self._ctx.folders.quarantine,
                                                        str(doc.get("quarantined_as", ""))),
                            recovered=True, why=why)
            self._notify("quarantined", c, None, reason=doc.get("reason"), error=doc.get("error"),
                         error_type=doc.get("error_type"), recovered=True)
        elif fate == "vanished":
            self._log.warning("file.vanished", input=c.rel, claim=c.token, recovered=True,
                              why="its claim's file is gone from the work folder and not "
                                  "every output it planned exists")
            self._notify("vanished", c, None, recovered=True)
        claiming.drop_record(c)

    def transient(self, c: Claim, reason: str, error: str, common: dict[str, Any],
                  r: Result | None = None) -> None:
        ws = self._ctx.settings.watch
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
            self._ctx.counts["gave_up"] += 1
            self.quarantine(c, "gave-up", f"{why}; last error: {c.last_error}", "",
                            [p for _, p in c.outputs])
            return
        delay = min(ws.retry_backoff_max, ws.retry_backoff * 2 ** (c.transient_failures - 1))
        delay *= random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not cryptography
        c.retry_at = time.monotonic() + delay
        self._held.retry.append(c)
        with contextlib.suppress(OSError):
            claiming.save_record(c)  # the count survives a restart
        self._ctx.counts["retried"] += 1
        self._ctx.board.record("retried", c.rel, reason=reason, error=error)
        self._ctx.metrics.retried.labels(reason).inc()
        self._log.warning("file.retried", **common, reason=reason, error=error,
                          failures=c.transient_failures, retry_in_s=round(delay, 2),
                          retries_left=ws.retry_max - c.transient_failures + 1,
                          why="not the input's fault: kept and retried later")
        self._notify("retried", c, r, reason=reason, error=error)

    def quarantine(self, c: Claim, reason: str, error: str, error_type: str,
                   outputs: list[str], r: Result | None = None) -> None:
        for path in outputs:  # outputs of an input that failed elsewhere would be orphans
            files.remove_output(path, self._ctx.folders.output)
        info = {"reason": reason, "error": error, "error_type": error_type,
                "pipelines": [p.name for p in self._ctx.pipelines],
                "attempts": r.attempt if r else 0, "worker_pid": r.worker if r else None,
                "transient_failures": c.transient_failures,
                "warnings": list(r.warnings) if r else []}

        def carry_out() -> None:
            dest = moves.quarantine(self._ctx.folders, c, info)
            self._held.forget(c)
            self._ctx.counts["quarantined"] += 1
            self._ctx.metrics.quarantined.labels(reason).inc()
            self._ctx.quarantine_index.add(dest, reason, error)
            self._ctx.board.record("quarantined", c.rel, reason=reason, error=error,
                                   where=dest, input_bytes=r.bytes_in if r else 0,
                                   duration_s=round(r.duration, 3) if r else 0.0)
            self._log.error("file.quarantined", input=c.rel, claim=c.token, reason=reason,
                            error=error,
                            error_type=error_type, quarantined_as=dest,
                            worker_pid=r.worker if r else None,
                            attempt=r.attempt if r else 0)
            self._notify("quarantined", c, r, outputs=outputs, reason=reason, error=error,
                         error_type=error_type, moved_to=dest)
            claiming.drop_record(c)

        self._carry_out(c, "quarantine", carry_out)

    def _notify(self, fate: str, c: Claim, r: Result | None, **fields: Any) -> None:
        """Queue this fate's document when notifications want it (O(1), never blocks)."""
        notify = self._ctx.notify
        if notify.wants(fate):
            ws = self._ctx.settings.watch
            notify.put(fatedoc.document(fate, c, r, inbox=self._ctx.folders.inbox,
                                        instance=ws.instance_name if ws.instance else "",
                                        **fields))

    def _carry_out(self, c: Claim, what: str, act: Callable[[], None]) -> None:
        """Carry out a decided fate; when its move fails (a full disk), keep the input in the
        work folder and try the same move again later: the fate is not decided again."""
        try:
            act()
        except OSError as exc:
            d = _Deferred(c, what, act)
            self._defer(d, exc)

    def _defer(self, d: _Deferred, exc: OSError) -> None:
        ws = self._ctx.settings.watch
        d.failures += 1
        d.error = str(exc)
        delay = min(ws.retry_backoff_max, ws.retry_backoff * 2 ** (d.failures - 1))
        d.retry_at = time.monotonic() + delay
        self.deferred.append(d)
        if d.failures == 1 or d.failures % 10 == 0:
            self._log.warning("file.fate_deferred", input=d.claim.rel, fate=d.what,
                              error=d.error, failures=d.failures, retry_in_s=round(delay, 2),
                              why="the move out of the work folder failed; the input stays "
                                  "there and the move is tried again")

    def deferred_due(self) -> None:
        now = time.monotonic()
        for d in [d for d in self.deferred if d.retry_at <= now]:
            self.deferred.remove(d)
            try:
                d.act()
            except OSError as exc:
                self._defer(d, exc)


@dataclass
class _Deferred:
    """A fate decided whose move out of the work folder failed; ``act`` tries it again."""

    claim: Claim
    what: str  # archive | quarantine
    act: Callable[[], None]
    failures: int = 0
    retry_at: float = 0.0
    error: str = ""
