"""``--dry-run``: what a batch or the daemon would do to which file, printed, nothing written.

Each input is looked at as a run would look at it, without writing anything anywhere: the batch
plans its outputs with the same naming (``batch.plan``: an existing output is skipped or gets a
counter as ``on_conflict`` says), the daemon's inbox is scanned as the daemon scans it (ignore
patterns, dot-files, no link followed), and each file's header is read as the decoder reads it
(``codec.probe``: not an image, a format not allowed, too large, a damaged header). A fault in
the pixels themselves is found only by decoding them: the dry run says "header ok".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import TextIO

from watcher import batch
from watcher.config.loader import Settings
from watcher.errors import ConfigError, RejectedInput
from watcher.extensions import output_ext, place
from watcher.fs import naming, safefs
from watcher.imaging import codec
from watcher.imaging.pipeline import Pipeline
from watcher.settings.schema import DecodeLimits
from watcher.textsafe import visible


def _look(path: str, limits: DecodeLimits, nofollow: bool) -> tuple[str, str]:
    """("", what the header says) for an input a run would process; (reason, error) for one it
    would refuse."""
    try:
        fmt, pixels, frames = codec.probe(path, limits=limits, nofollow=nofollow)
    except RejectedInput as exc:
        return exc.reason, exc.detail
    except OSError as exc:
        return "read-failed", f"{path}: {exc.strerror or exc}"
    extra = f", {frames} frames" if frames > 1 else ""
    return "", f"{fmt}, {pixels / 1e6:.1f} MP{extra}, header ok"


def batch_plan(inputs: Sequence[batch.Input], failures: Sequence[batch.ItemReport],
               out_dir: str, pipelines: Sequence[Pipeline], settings: Settings,
               out: TextIO) -> int:
    """Print what ``watcher batch`` would do; return how many inputs would fail."""
    limits = settings.limits
    p = batch.plan(inputs, out_dir, pipelines, settings.on_conflict, limits.formats)
    failing = len(failures)
    for item in failures:
        print(f"fail     {visible(item.input)}: {item.reason}: {visible(item.error)}", file=out)
    for item in p.done:
        print(f"skip     {visible(item.input)}: {visible(item.error)}", file=out)
    for task in p.tasks:
        reason, what = _look(task.path, limits, nofollow=False)
        if reason:
            failing += 1
            print(f"fail     {visible(task.path)}: {reason}: {visible(what)}", file=out)
            continue
        verb = "replace " if task.overwrite and any(os.path.lexists(o.path)
                                                     for o in task.outputs) else "process "
        print(f"{verb} {visible(task.path)} ({visible(what)})", file=out)
        for o in task.outputs:
            print(f"           -> {visible(o.path)}  [{o.pipeline}]", file=out)
    print(f"dry run: {len(p.tasks) - failing + len(failures)} to process, {len(p.done)} "
          f"skipped, {failing} would fail; nothing was written", file=out)
    return failing


def watch_plan(settings: Settings, pipelines: Sequence[Pipeline], out: TextIO) -> int:
    """Print what the daemon would do with each file in the inbox now; return how many it
    would quarantine."""
    ws = settings.watch
    folders = ws.folders()
    inbox = folders["inbox"]
    from watcher.watch.layout import check_layout  # noqa: PLC0415

    check_layout(folders, ws.work if ws.instance else None)  # as the daemon refuses them
    for key, path in folders.items():
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ConfigError(f"watch.{key}", f"{path} is not a folder")
    if not os.path.isdir(inbox):
        print(f"dry run: the inbox {inbox} does not exist (the daemon would create it); "
              "nothing to do", file=out)
        return 0
    from watcher.watch import sources  # noqa: PLC0415 - the daemon stack only for watch

    fate = {"archive": f"archive to {folders['archive']}", "delete": "delete the input",
            "keep": "leave the input in the inbox"}[ws.on_success]
    root = safefs.root(inbox)  # kept by safefs for the process: not closed here
    counts = {"process": 0, "quarantine": 0}
    for rel in sources.scan(root, recursive=ws.recursive, patterns=ws.ignore):
        reason, what = _judge(root, rel, inbox, settings)
        if reason:
            counts["quarantine"] += 1
            print(f"quarantine {visible(rel)}: {reason}: {visible(what)}", file=out)
            continue
        counts["process"] += 1
        print(f"process  {visible(rel)} ({visible(what)}); then {visible(fate)}", file=out)
        rel_dir, name = os.path.split(rel)
        stem = os.path.splitext(name)[0]
        for p in pipelines:
            src = os.path.join(inbox, rel)
            ext = output_ext(p.output, src, settings.limits.formats)
            where, base, suffix = place(p.output, os.path.join(folders["output"], rel_dir),
                                        stem, p.suffix, ext, src, settings.limits.formats)
            dest = os.path.join(where, naming.output_name(base, suffix, ext))
            taken = " (exists: a free name with a counter)" if os.path.lexists(dest) else ""
            print(f"           -> {visible(dest)}  [{p.name}]{taken}", file=out)
    print(f"dry run: {counts['process']} to process, {counts['quarantine']} to quarantine; "
          "nothing was written or moved", file=out)
    return counts["quarantine"]


def _judge(root: int, rel: str, inbox: str, settings: Settings) -> tuple[str, str]:
    """What the daemon's dispatch (by lstat) and then its decoder (the header) would say."""
    try:
        st = safefs.lstat(root, rel)
    except OSError as exc:
        return "missing", f"cannot be looked at: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "symlink", "a symbolic link; its target would not be read"
    if not stat.S_ISREG(st.st_mode):
        return "not-a-file", f"not a regular file ({safefs.kind(st.st_mode)})"
    if st.st_nlink > 1 and settings.watch.hard_links == "quarantine":
        return "hard-link", f"it has {st.st_nlink} hard links (hard_links = \"quarantine\")"
    reason, what = _look(os.path.join(inbox, rel), settings.limits, nofollow=True)
    if st.st_size == 0:
        what = f"empty now: taken only once unchanged for a long time; then {what}"
    return reason, what
