"""Dispatch: a claimed file judged (by lstat, never opened), its outputs planned, and handed to
the engine; what must never be read is quarantined at once, and transient failures are handed
over again when their back-off has passed.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from dataclasses import replace

from watcher.extensions import output_ext, place
from watcher.fs import files, naming
from watcher.tasks import OutputPlan, Task
from watcher.watch import claiming, duplicates, moves
from watcher.watch.claiming import Claim, identity
from watcher.watch.context import Context, InFlight
from watcher.watch.fates import Fates


class Dispatch:
    """Hands claims to the engine (``dispatch``, ``submit``, ``retry_due``), each with the
    output names it holds (``fs.naming``, through ``InFlight.names``)."""

    def __init__(self, ctx: Context, held: InFlight, fates: Fates) -> None:
        self._ctx = ctx
        self._log = ctx.log
        self._held = held
        self._fates = fates

    def dispatch(self, c: Claim) -> None:
        """Quarantine what must never be read (judged by lstat of the claimed name in the work
        folder: nothing is opened); queue the rest."""
        try:
            st = os.lstat(c.work_path)
        except FileNotFoundError:
            self._held.forget(c)
            self._log.warning("file.vanished", input=c.rel, why="gone from the work folder")
            return
        if stat.S_ISLNK(st.st_mode):
            self._fates.quarantine(c, "symlink", "a symbolic link; its target was not read", "", [])
            return
        if stat.S_ISDIR(st.st_mode):
            self._put_back(c)
            return
        if not stat.S_ISREG(st.st_mode):
            self._fates.quarantine(c, "not-a-file", "not a regular file (FIFO, socket or device); "
                                   "it was not opened", "", [])
            return
        if st.st_nlink > 1 and self._ctx.settings.watch.hard_links == "quarantine":
            self._fates.quarantine(c, "hard-link", f"it has {st.st_nlink} hard links: its data may "
                                   "belong to a file elsewhere; it was not opened (hard_links = "
                                   "\"process\" takes such files)", "", [])
            return
        too_long, flat = self._too_long(c)
        if flat:
            self._quarantine_flat(c, too_long)
            return
        if too_long:
            self._fates.quarantine(c, "path-too-long", too_long, "", [])
            return
        self.submit(c)

    def _put_back(self, c: Claim) -> None:
        """A name that became a folder between the look and the claim: back into the inbox,
        where its files are scanned and taken one by one."""
        try:
            moves.keep(self._ctx.folders, c)
        except OSError as exc:
            self._fates.quarantine(c, "not-a-file", f"a folder, claimed in a race, that could not "
                                   f"be put back: {exc}", "", [])
            return
        claiming.drop_record(c)
        self._held.forget(c)
        self._log.warning("file.not_claimed", input=c.rel, why="it is a folder (it replaced "
                          "a file); put back, its files are taken one by one")

    def _too_long(self, c: Claim) -> tuple[str, bool]:
        """Why the input's outputs, archive or quarantine path would be too long for the file
        system ("" when they fit), and whether its quarantine path is: then it is quarantined
        flat (``_quarantine_flat``). Archive and quarantine names are shortened to fit; the
        output names are planned whole."""
        limit = files.PATH_MAX
        mirrored = [os.path.join(self._ctx.folders.archive, c.rel),
                    os.path.join(self._ctx.folders.quarantine, c.rel + moves.SIDECAR)]
        for p in mirrored:
            size = len(os.fsencode(os.path.dirname(p))) + files.NAME_MAX + 1
            if size >= limit:
                return (f"{c.rel}: its archive or quarantine path would be up to {size} bytes, "
                        f"more than the {limit - 1} the system allows", True)
        for o in self.natural_outputs(c.rel, c.work_path):
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
        self._fates.quarantine(flat, "path-too-long", error, "", [])
        self._held.rels.discard(c.rel)

    def _plan(self, c: Claim) -> tuple[tuple[OutputPlan, ...], bool]:
        """The outputs ``c`` writes, and whether they may replace files of those names.

        Through the one naming component: no two claims ever hold the same output path, and a
        new input never takes the name of a file already there (it gets a counter). A claim
        that recorded its outputs (a retry, or a restart after a crash) gets exactly those back
        and may replace them: they are its own."""
        pipes = self._ctx.pipelines
        recorded = [p for _, p in c.outputs]
        if c.outputs and [n for n, _ in c.outputs] == [p.name for p in pipes] and \
                self._held.names.reuse(recorded, c.seq):
            return tuple(OutputPlan(pipeline=n, path=p) for n, p in c.outputs), not c.adopted
        self._held.names.release(c.seq)
        rel_dir, name = os.path.split(c.rel)
        stem = os.path.splitext(name)[0]
        folder = os.path.join(self._ctx.folders.output, rel_dir)
        formats = self._ctx.settings.limits.formats
        outputs = []
        for p in pipes:
            ext = output_ext(p.output, c.work_path, formats)
            where, name, suffix = place(p.output, folder, stem, p.suffix, ext, c.work_path,
                                        formats)
            outputs.append(OutputPlan(pipeline=p.name, path=self._held.names.claim(
                where, name, suffix, ext, avoid_existing=True, owner=c.seq)))
        return tuple(outputs), False

    def natural_outputs(self, rel: str, path: str) -> list[str]:
        """The first-choice output paths of an input (keep mode: are they there already?)."""
        rel_dir, name = os.path.split(rel)
        stem = os.path.splitext(name)[0]
        folder = os.path.join(self._ctx.folders.output, rel_dir)
        formats = self._ctx.settings.limits.formats
        out = []
        for p in self._ctx.pipelines:
            ext = output_ext(p.output, path, formats)
            where, name, suffix = place(p.output, folder, stem, p.suffix, ext, path, formats)
            out.append(os.path.join(where, naming.output_name(name, suffix, ext)))
        return out

    def submit(self, c: Claim) -> None:
        assert self._ctx.engine is not None
        if not c.digest and self._duplicate(c):
            return
        outputs, own = self._plan(c)
        c.outputs = tuple((o.pipeline, o.path) for o in outputs)
        try:
            claiming.save_record(c)  # durable before any output is written
        except OSError as exc:
            self._fates.transient(c, "write-failed", f"cannot record the claim: {exc}",
                                  {"input": c.rel})
            return
        task = Task(seq=c.seq, path=c.work_path, outputs=outputs, overwrite=own, nofollow=True,
                    max_links=1 if self._ctx.settings.watch.hard_links == "quarantine" else 0,
                    root=self._ctx.folders.output)
        c.seen = identity(c.work_path)
        c.submitted_at = time.monotonic()
        self._held.claims[c.seq] = c
        self._ctx.engine.submit(task)
        self._log.info("file.queued", input=c.rel, seq=c.seq)

    def _duplicate(self, c: Claim) -> bool:
        """Hash ``c`` (its bytes, the configuration); True when it is a duplicate of an input
        processed before and was handed to its fate (``duplicates = "skip"``)."""
        c.digest = duplicates.content_hash(c.work_path) or ""
        c.config = duplicates.config_hash(self._ctx.pipelines, self._ctx.settings.limits)
        ws = self._ctx.settings.watch
        # (keep mode puts an input back in the inbox: a duplicate kept there would come back)
        if not c.digest or ws.duplicates != "skip" or ws.on_success == "keep":
            return False
        try:
            earlier = self._ctx.seen().lookup(c.digest, c.config)
        except (sqlite3.Error, OSError) as exc:
            self._fates.seen_unavailable(exc)
            return False
        if earlier is None:
            return False
        self._fates.duplicate(c, earlier)
        return True

    def retry_due(self) -> None:
        now = time.monotonic()
        for c in [c for c in self._held.retry if c.retry_at <= now]:
            self._held.retry.remove(c)
            self.submit(c)
