"""Frozen task and result types: what crosses the queue between the engine and its workers.

A task carries paths and pipeline names, never pixels. A result carries what was written, or why
not. Both are small, hashable and picklable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputPlan:
    """One output to write: which pipeline makes it and the final path it gets."""

    pipeline: str
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """Process ``path`` with each planned output. ``seq`` is unique per engine run."""

    seq: int
    path: str
    outputs: tuple[OutputPlan, ...]
    attempt: int = 1
    # Replace an existing output file (True), or refuse to clobber a different one (False).
    overwrite: bool = False
    # Open the input with O_NOFOLLOW: a symlink is rejected, never read (watch mode).
    nofollow: bool = False
    # fsync the output folder after each rename (watch mode: the input is archived next);
    # a batch fsyncs each output folder once at its end instead.
    sync_dir: bool = True
    # Refuse an input with more hard links than this, judged on the open descriptor
    # ("hard-link"); 0: no limit (watch mode sets 1 unless hard_links = "process").
    max_links: int = 0
    # The output folder the outputs are below: from it to each output's folder no link is
    # followed (a link there is "unsafe-output"). "": the outputs' paths are used as given.
    root: str = ""

    def retry(self) -> Task:
        return replace(self, attempt=self.attempt + 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """What happened to one task. ``ok`` with ``outputs``, or ``reason`` and ``error``."""

    seq: int
    path: str
    ok: bool
    outputs: tuple[str, ...] = ()
    reason: str = ""
    error: str = ""
    error_type: str = ""
    duration: float = 0.0
    worker: int = 0
    attempt: int = 1
    bytes_in: int = 0
    bytes_out: int = 0
    warnings: tuple[str, ...] = field(default=())
    peak_rss_kb: int = 0  # the worker's peak resident memory so far
    # (temp, final) pairs written and fsynced but not yet published: a task on a cluster only
    # writes; the coordinator publishes (executor "dask").
    staged: tuple[tuple[str, str], ...] = ()
