"""The Dask executor's files: publishing a cluster task's staged outputs, and removing the temp
files its attempts leave.

A task on the cluster only writes temp files beside its outputs' final names; the coordinator
alone publishes them (``publish_staged``, no-clobber, as locally). What nobody will publish is
removed: the staged files of a result that does not count (``remove_staged``), every temp file
of some outputs once their task is decided or run again (``remove_all_temps``), and, a while
after each decision, what a late duplicate attempt wrote (``TempSweeper``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from watcher.errors import RejectedInput
from watcher.fs.durable import fsync_dir
from watcher.fs.staging import publish
from watcher.tasks import Result, Task

SWEEP_DELAY = 60.0  # seconds after a decision that late duplicates' temp files are swept


def publish_staged(task: Task, result: Result) -> Result:
    """Publish the staged outputs of ``task``'s successful ``result`` under their final names;
    the task's result: ``result`` with what was published, or the failure that stopped it
    (what was published before stays, named in ``outputs``; the rest is removed)."""
    written: list[str] = []
    pending = list(result.staged)
    try:
        while pending:
            tmp, final = pending[0]
            try:
                publish(tmp, final, overwrite=task.overwrite, root=task.root)
            except FileNotFoundError:
                raise RejectedInput(
                    "write-failed", f"{tmp} (written by a cluster worker) is not visible "
                    "here: inputs and outputs must be on storage every worker and the "
                    "coordinator share, under the same paths") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            pending.pop(0)
            written.append(final)
        if task.sync_dir:
            for folder in {os.path.dirname(f) or "." for f in written}:
                fsync_dir(folder)
    except (RejectedInput, OSError) as exc:
        remove_staged_pairs(pending)
        reason, error = (exc.reason, exc.detail) if isinstance(exc, RejectedInput) \
            else ("write-failed", str(exc))
        return Result(seq=task.seq, path=task.path, ok=False, outputs=tuple(written),
                      reason=reason, error=error, error_type=type(exc).__name__,
                      duration=result.duration, worker=result.worker, attempt=task.attempt,
                      bytes_in=result.bytes_in, bytes_out=0, warnings=result.warnings,
                      peak_rss_kb=result.peak_rss_kb)
    return replace(result, outputs=tuple(written), staged=())


def remove_staged(result: Any) -> None:
    """Remove the staged files of ``result`` (if it is a ``Result``): nobody will publish them."""
    if isinstance(result, Result):
        remove_staged_pairs(list(result.staged))


def remove_staged_pairs(pairs: list[tuple[str, str]]) -> None:
    for tmp, _ in pairs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remove_all_temps(finals: list[str], min_age: float = 0.0) -> None:
    """Temp files any attempt left for these outputs (workers that died, tasks run twice),
    untouched for ``min_age`` seconds. One directory scan per folder, by descriptor (a folder
    of the path swapped for a link is not entered)."""
    from watcher.fs import safefs  # noqa: PLC0415
    from watcher.fs.files import temp_owner  # noqa: PLC0415

    by_folder: dict[str, set[str]] = {}
    for final in finals:
        folder, name = os.path.split(final)
        by_folder.setdefault(folder or ".", set()).add(name)
    now = time.time()
    for folder, names in by_folder.items():
        try:
            found = safefs.locate(folder)
            fd = safefs.open_dir(found[0], found[1]) if found is not None else \
                os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in os.listdir(fd):
                if temp_owner(name) is None or name[1:].rsplit(".", 3)[0] not in names:
                    continue
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if min_age and now - st.st_mtime < min_age:
                        continue
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)


class TempSweeper:
    """The outputs of decided tasks, swept for temp files that a second attempt (a task re-run
    after its worker was lost) may leave after the decision."""

    def __init__(self) -> None:
        self._tasks: dict[int, Task] = {}  # submitted, result not yet returned
        self._decided: deque[tuple[float, str]] = deque()  # (time decided, final path)
        self._last_sweep = time.monotonic()

    def track(self, task: Task) -> None:
        """A task submitted: its outputs are swept once its result is returned."""
        self._tasks[task.seq] = task

    def decided(self, results: Iterable[Result], now: float) -> None:
        """These results were returned at ``now`` (this clock)."""
        for r in results:
            task = self._tasks.pop(r.seq, None)
            self._decided.extend((now, o.path) for o in (task.outputs if task else ()))

    def tick(self, now: float) -> None:
        """Sweep, at most once a ``SWEEP_DELAY``, the outputs decided that long ago."""
        if now - self._last_sweep > SWEEP_DELAY:
            self._last_sweep = now
            self.sweep(now - SWEEP_DELAY, SWEEP_DELAY)

    def sweep(self, before: float, min_age: float) -> None:
        """Remove temp files, untouched for ``min_age`` s, of outputs decided before ``before``:
        what a duplicate attempt of an already decided task wrote."""
        finals = []
        while self._decided and self._decided[0][0] <= before:
            finals.append(self._decided.popleft()[1])
        if finals:
            remove_all_temps(finals, min_age=min_age)
