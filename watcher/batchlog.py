"""What a batch tells a person while it runs: each input's fate line, the one line for the
inputs an interruption cancelled, the summary (with why inputs were skipped and how to redo
them), and the progress bar on a terminal."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from watcher.batch import ItemReport, Report
    from watcher.tasks import Result


def log_fate(logger: Any, item: ItemReport, r: Result, *, quiet: bool, console: bool) -> None:
    fields: dict[str, Any] = {"input": item.input, "outputs": list(r.outputs),
                              "duration_ms": round(r.duration * 1000, 1), "worker_pid": r.worker}
    if r.ok:
        fields.update(input_bytes=r.bytes_in, output_bytes=r.bytes_out)
        if r.warnings:
            fields["warnings"] = list(r.warnings)
        (logger.debug if quiet and not r.warnings else logger.info)("file.processed", **fields)
    elif item.status == "cancelled":
        # one line per input in JSON (every input's fate is a line); on a terminal only at
        # debug: an interrupted run of thousands is one batch.cancelled line there
        (logger.debug if console else logger.info)("file.cancelled", input=item.input,
                                                   reason="cancelled", error=r.error)
    else:
        fields.update(reason=r.reason, error=r.error, attempt=r.attempt)
        if r.warnings:
            fields["warnings"] = list(r.warnings)
        logger.error("file.failed", **fields)


def log_cancelled(logger: Any, count: int, report_to: str | None, on_conflict: str, *,
                   console: bool) -> None:
    """One line for the inputs an interruption cancelled: how many, and where their list is."""
    if report_to is None:
        where = "the returned report's items"
    elif report_to == "-":
        where = "the report on stdout"
    elif report_to:
        where = report_to
    elif console:
        where = "not kept: add --report FILE (or --log-level debug)"
    else:
        where = "the file.cancelled lines"
    hint = "run the same command again to finish them (existing outputs are skipped)" \
        if on_conflict == "skip" else None
    logger.warning("batch.cancelled", cancelled=count, list=where, hint=hint)


def log_summary(logger: Any, report: Report, on_conflict: str) -> None:
    wall = report.wall_time_s or 1e-9
    done = report.succeeded + report.failed
    extra: dict[str, Any] = {}
    if report.skipped:  # say why, and what to do: a rerun that did nothing is not a mystery
        extra["why"] = skipped_note(report.skipped, on_conflict)
    logger.info("batch.finished", **report.totals, wall_time_s=round(report.wall_time_s, 3),
                images_per_s=round(done / wall, 2), workers=report.workers,
                interrupted=report.interrupted, **extra)  # an int: 0 when not interrupted


def skipped_note(count: int, on_conflict: str) -> str:
    """``12 up to date: their outputs exist (on_conflict=skip); ...`` for the summary line."""
    return (f"{count} up to date: their outputs exist (on_conflict={on_conflict}); use "
            "--on-conflict overwrite (on_conflict=\"overwrite\") to redo them, or rename to "
            "keep both")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, unit: str = "img") -> Any:
    """A tqdm bar on stderr when ``enabled`` (a terminal), else one that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm  # noqa: PLC0415

    # No monitor thread: a batch forks its workers from this process, which must then run no
    # other thread (see engine.helpers.resolve_start_method).
    tqdm.monitor_interval = 0

    try:
        sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except OSError:
        sized = False
    # A terminal that reports no size (some ptys: 0 x 0) would get an invisible bar (no width,
    # and tqdm hides a bar below a screen of 0 rows): use 80 columns and 24 rows.
    return tqdm(total=total, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24)
