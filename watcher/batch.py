"""Batch mode: a finite list of inputs -> planned outputs -> the engine -> a report.

Inputs are files, folders (recursed, their sub-folders mirrored in the output) and globs. Output
names are planned here, in one place, so two inputs of a run never share one; what happens to a
file left by an earlier run is the ``on_conflict`` policy (skip, overwrite, rename). Signals only
set a flag; the loop stops handing out work, lets running tasks finish within the grace period and
reports the rest as cancelled.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from watcher import batchlog, console, log
from watcher.config import Settings
from watcher.engine.factory import create_executor
from watcher.engine.mainscript import refuse_in_bootstrap
from watcher.errors import ConfigError
from watcher.extensions import output_ext, place
from watcher.fs.durable import fsync_dir
from watcher.fs.files import remove_dead_temps, walk_images
from watcher.fs.folders import writable_folder
from watcher.fs.naming import OutputNames
from watcher.imaging.pipeline import Pipeline
from watcher.tasks import OutputPlan, Result, Task

_GLOB = set("*?[")


@dataclass(frozen=True)
class Input:
    path: str
    rel_dir: str = ""  # the sub-folder it sits in below a folder argument (mirrored in output)


@dataclass
class ItemReport:
    input: str
    status: str  # ok | failed | skipped | cancelled
    outputs: list[str] = field(default_factory=list)
    reason: str = ""
    error: str = ""
    duration_ms: float = 0.0  # the worker's time on it
    warnings: list[str] = field(default_factory=list)
    worker_pid: int = 0
    worker_peak_rss_kb: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    @property
    def duration(self) -> float:
        """Seconds (the name before the field vocabulary: ``duration_ms``)."""
        return self.duration_ms / 1000

    @property
    def worker(self) -> int:
        """The name before the field vocabulary: ``worker_pid``."""
        return self.worker_pid


@dataclass
class Report:
    """What a batch did: one item per input (outputs or error), totals and wall time."""

    items: list[ItemReport]
    wall_time_s: float = 0.0
    workers: int = 0
    interrupted: int = 0  # the signal number that stopped the run, 0 if none

    @property
    def wall_time(self) -> float:
        """The name before the field vocabulary: ``wall_time_s``."""
        return self.wall_time_s

    def count(self, status: str) -> int:
        return sum(1 for i in self.items if i.status == status)

    @property
    def succeeded(self) -> int:
        return self.count("ok")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def cancelled(self) -> int:
        return self.count("cancelled")

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(i.ok for i in self.items)

    @property
    def totals(self) -> dict[str, int]:
        return {"inputs": len(self.items), "succeeded": self.succeeded, "failed": self.failed,
                "skipped": self.skipped, "cancelled": self.cancelled,
                "outputs_written": sum(len(i.outputs) for i in self.items if i.status == "ok")}

    def to_dict(self) -> dict[str, Any]:
        return {"totals": self.totals, "wall_time_s": self.wall_time_s, "workers": self.workers,
                "interrupted": self.interrupted, "items": [asdict(i) for i in self.items]}


# --- inputs -------------------------------------------------------------------------------------

def expand(args: Iterable[str], inputs: list[Input] | None = None,
           missing: list[ItemReport] | None = None) -> tuple[list[Input], list[ItemReport]]:
    """Files, folders and globs -> inputs (first occurrence wins); paths that do not exist and
    globs that match nothing -> failures (reason ``missing``), and so is a folder the walk cannot
    enter (``permission-denied``, naming the folder), found before any worker starts.
    ``inputs``, ``missing``: lists to add to (what was found so far is in them when a Ctrl-C
    stops the walk of a huge tree)."""
    inputs = [] if inputs is None else inputs
    missing = [] if missing is None else missing
    seen: set[str] = set()

    def add(inp: Input) -> None:
        key = os.path.normcase(os.path.abspath(inp.path))
        if key not in seen:
            seen.add(key)
            inputs.append(inp)

    def unreadable(exc: OSError) -> None:  # a folder the walk cannot enter: its files unknown
        folder = str(exc.filename)
        reason = "permission-denied" if isinstance(exc, PermissionError) else "io-error"
        missing.append(ItemReport(folder, "failed", reason=reason,
                                  error=f"{folder}: cannot list this folder "
                                        f"({exc.strerror or exc}); the files in it were "
                                        "not processed"))

    for arg in args:
        if os.path.isdir(arg):
            for path in walk_images(arg, unreadable):
                add(Input(path, os.path.relpath(os.path.dirname(path) or ".", arg)))
        elif not os.path.lexists(arg) and _GLOB & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                missing.append(ItemReport(arg, "failed", reason="missing",
                                          error=f"{arg}: no file matches"))
            for m in matches:
                if os.path.isdir(m):
                    for path in walk_images(m, unreadable):
                        add(Input(path, os.path.relpath(os.path.dirname(path) or ".", m)))
                else:
                    add(Input(m))
        elif _absent(arg):
            missing.append(ItemReport(arg, "failed", reason="missing",
                                      error=f"{arg}: no such file or folder"))
        else:
            add(Input(arg))
    return inputs, missing


def cancelled_report(found: Sequence[Input], failures: Sequence[ItemReport],
                     signum: int) -> Report:
    """The report of a batch stopped by ``signum`` before any work began: the inputs found so
    far cancelled, those known to have failed failed (none at all: it was interrupted before any
    input was known)."""
    items = [*failures, *(ItemReport(i.path, "cancelled", reason="cancelled",
                                     error="interrupted before it started") for i in found)]
    return Report(items, workers=0, interrupted=signum)


def write_report(report: Report, dest: str) -> None:
    """The report as JSON to ``dest`` (a file, ``-`` for stdout)."""
    text = json.dumps(report.to_dict(), indent=2)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def _absent(path: str) -> bool:
    """``path`` certainly does not exist (an unreadable parent is left to the worker to say)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except (OSError, ValueError):
        return False
    return False


def read_list(stream: Iterable[str]) -> list[str]:
    """Paths from a list file or stdin: one per line; blank lines and '#' comments skipped."""
    return [line.rstrip("\n\r") for line in stream
            if line.strip() and not line.lstrip().startswith("#")]


# --- planning -----------------------------------------------------------------------------------

# A batch on a Dask cluster that cannot be reached gives up on its inputs after this (seconds),
# unless [engine] cluster_wait says otherwise (the daemon waits for ever).
BATCH_CLUSTER_WAIT = 300.0


@dataclass
class Plan:
    tasks: list[Task]
    items: dict[int, ItemReport]  # by task seq, filled as results come in
    done: list[ItemReport]  # decided without running (skipped by the conflict policy)
    order: list[str]  # inputs in the order given


def plan(inputs: Sequence[Input], out_dir: str, pipelines: Sequence[Pipeline],
         on_conflict: str, allowed: Sequence[str], *, nofollow: bool = False) -> Plan:
    alloc = OutputNames()
    tasks: list[Task] = []
    items: dict[int, ItemReport] = {}
    done: list[ItemReport] = []
    for seq, inp in enumerate(inputs):
        folder = os.path.normpath(os.path.join(out_dir, inp.rel_dir))
        stem = os.path.splitext(os.path.basename(inp.path))[0]
        outputs: list[OutputPlan] = []
        existing: list[str] = []
        for p in pipelines:
            ext = output_ext(p.output, inp.path, allowed)
            where, name, suffix = place(p.output, folder, stem, p.suffix, ext, inp.path, allowed)
            path = alloc.claim(where, name, suffix, ext, avoid_existing=on_conflict == "rename")
            if on_conflict == "skip" and os.path.lexists(path):
                existing.append(path)
            else:
                outputs.append(OutputPlan(pipeline=p.name, path=path))
        if not outputs:
            done.append(ItemReport(inp.path, "skipped", existing, reason="outputs-exist",
                                   error="every output exists (on_conflict=skip)"))
            continue
        tasks.append(Task(seq=seq, path=inp.path, outputs=tuple(outputs),
                          overwrite=on_conflict == "overwrite", nofollow=nofollow,
                          sync_dir=False, root=out_dir))
        items[seq] = ItemReport(inp.path, "pending", existing)
    return Plan(tasks, items, done, [i.path for i in inputs])


# --- running ------------------------------------------------------------------------------------

class _Signals:
    """Records SIGINT/SIGTERM; the batch loop acts on them. Installed only in the main thread."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(inputs: Sequence[Input], out_dir: str, pipelines: Sequence[Pipeline], settings: Settings,
        *, progress: bool = False, log_format: str = "json", log_level: str = "warning",
        failures: Sequence[ItemReport] = (), out_where: str = "output_dir",
        on_result: Callable[[ItemReport], None] | None = None,
        report_to: str | None = None) -> Report:
    """Process ``inputs`` with every pipeline in ``pipelines``; never raises for a bad input.

    Raises ``ConfigError`` (naming ``out_where``) before anything starts when ``out_dir`` cannot
    be created or written into. ``failures``: inputs already known to have failed (missing), each
    logged once here. No worker starts unless some input has an output to make. ``report_to``:
    where the caller writes the report (a file, ``-`` for stdout, ``""`` for nowhere; None: the
    caller reads the returned report), named by the line that sums up the inputs an
    interruption cancelled."""
    refuse_in_bootstrap()  # a worker re-running an unguarded script starts no batch
    t0 = time.perf_counter()
    logger = log.get("watcher.batch")
    names = [p.name for p in pipelines]
    if len(set(names)) != len(names):
        raise ConfigError("pipelines", f"a pipeline is named twice: {names}")
    writable_folder(out_dir, out_where)
    console.set_output_folder(out_dir)  # console lines show outputs relative to it
    report = Report([*failures], workers=0)
    for item in failures:
        logger.error("file.failed", input=item.input, reason=item.reason, error=item.error)
    if not inputs:
        if not failures:
            logger.info("batch.empty", output=out_dir, why="no inputs; nothing to do")
        report.wall_time_s = round(time.perf_counter() - t0, 6)
        return report

    p = plan(inputs, out_dir, pipelines, settings.on_conflict, settings.limits.formats)
    for item in p.done:
        logger.info("file.skipped", input=item.input, outputs=item.outputs, reason=item.reason)
    workers = max(1, min(settings.engine.workers, len(p.tasks)))
    wait = BATCH_CLUSTER_WAIT if settings.engine.cluster_wait is None \
        else settings.engine.cluster_wait
    engine = None
    if p.tasks:
        engine = create_executor(replace(settings.engine, workers=workers, cluster_wait=wait),
                                 {x.name: x for x in pipelines}, settings.limits,
                                 log_format=log_format, log_level=log_level)
        try:
            engine.start()
            # what an earlier run of these outputs left half-written (it was killed, or its
            # workers)
            for path in remove_dead_temps([o.path for t in p.tasks for o in t.outputs], out_dir,
                                          engine.writer_gone):
                logger.info("file.temp_removed", path=path, why="left by a process that is gone")
        except BaseException:
            engine.close(0)
            raise
        report.workers = workers
    bar = batchlog.progress_bar(len(inputs), progress)
    bar.update(len(p.done))

    def record(r: Result) -> None:
        item = p.items[r.seq]
        item.status = "ok" if r.ok else ("cancelled" if r.reason == "cancelled" else "failed")
        item.outputs = [*item.outputs, *r.outputs]
        item.reason, item.error = r.reason, r.error
        item.duration_ms = round(r.duration * 1000, 3)
        item.warnings = list(r.warnings)
        item.worker_pid, item.worker_peak_rss_kb = r.worker, r.peak_rss_kb
        batchlog.log_fate(logger, item, r, quiet=progress, console=log_format == "console")
        if item.status != "cancelled":  # the bar shows work done, not work given up
            bar.update(1)
        if on_result:
            on_result(item)

    if engine is not None:
        with _Signals() as sigs:
            try:
                for task in p.tasks:
                    engine.submit(task)
                while engine.outstanding and not sigs.received:
                    for r in engine.poll(0.25):
                        record(r)
                if sigs.received:
                    report.interrupted = sigs.received[0]
                    withdrawn = engine.stop_intake()
                    logger.warning("batch.interrupted",
                                   signal=signal.Signals(sigs.received[0]).name,
                                   running=engine.outstanding, not_started=len(withdrawn),
                                   grace=settings.engine.grace)
                    for t in withdrawn:
                        record(Result(seq=t.seq, path=t.path, ok=False, reason="cancelled",
                                      error="interrupted before it started"))
            finally:
                for r in engine.close(settings.engine.grace,
                                      abort=lambda: len(sigs.received) > 1):
                    record(r)
                if sigs.received:
                    report.interrupted = sigs.received[0]
    bar.close()
    # every output's data was fsynced before its rename; one fsync per folder now makes the
    # names durable: a batch's outputs are all durable when it returns
    for folder in {os.path.dirname(o) for i in p.items.values() for o in i.outputs}:
        with contextlib.suppress(OSError):
            fsync_dir(folder)

    report.items += p.done + [p.items[t.seq] for t in p.tasks]
    order = {path: i for i, path in enumerate(p.order)}
    report.items.sort(key=lambda i: order.get(i.input, -1))
    report.wall_time_s = round(time.perf_counter() - t0, 6)
    if report.cancelled:
        batchlog.log_cancelled(logger, report.cancelled, report_to, settings.on_conflict,
                       console=log_format == "console")
    batchlog.log_summary(logger, report, settings.on_conflict)
    return report
