"""Where paths come from in watch mode: events (from ``observer``), scans, and the stability
tracker that says when a file in the inbox is complete.

The observer's callback only hands a (kind, path) on and wakes the daemon loop; deciding whether a
file is complete happens in one place, the ``Stability`` tracker:
- closed after writing (inotify close-write) or moved into the inbox: complete at once;
- being written (inotify reported a write, no close yet): wait for the close, however long the
  writer pauses; only a file left unchanged for a long time (``stale``) is taken without one;
- an empty file (a writer may have opened it and not written yet, or closed it and will come
  back to append): also ``stale``, even after a close;
- anything else (created in place without a write seen, e.g. a hard link or a file made before
  its folder was watched; seen by a scan; or by the polling observer, which has no close events):
  complete when its size and mtime have not changed for the settle time.

Events are hints, not the truth: a backlog scan at start and a periodic reconcile scan catch what
the events missed. Scans and the tracker's looks go through directory descriptors (``safefs``):
a folder swapped for a link is never entered, any depth works, and a scan never raises.
"""

from __future__ import annotations

import errno
import fnmatch
import heapq
import itertools
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from watcher import log
from watcher.fs import safefs

CLOSED, MOVED, CREATED, MODIFIED = "closed", "moved", "created", "modified"
SCAN, DIR = "scan", "dir"
OVERFLOW = "overflow"  # the kernel's event queue overflowed: events were lost (rescan the inbox)


# --- names ---------------------------------------------------------------------------------------

def ignored(rel: str, patterns: Sequence[str]) -> bool:
    """Dot-files and dot-folders, and names matching an ignore pattern, are never touched."""
    parts = rel.split(os.sep)
    if any(p.startswith(".") for p in parts):
        return True
    return any(fnmatch.fnmatchcase(parts[-1], pat) for pat in patterns)


def scan(root: str | int, *, recursive: bool, patterns: Sequence[str],
         exclude: Sequence[str] = (), under: str = "") -> Iterator[str]:
    """Names (relative to ``root``, a folder or its descriptor) of the entries below ``under``
    that are not directories (links, FIFOs included: they are quarantined, not read), never
    descending into links, dot-folders or ``exclude`` (relative names).

    Walked with directory descriptors (``safefs.walk``): a folder swapped for a link is not
    entered, and any depth works. Never raises: a folder that vanished, cannot be read, became
    a link or cannot be opened is skipped and logged once for this scan."""
    excluded = {os.path.normpath(e) for e in exclude}
    if isinstance(root, str):
        excluded = {os.path.relpath(e, root) if os.path.isabs(e) else e for e in excluded}
        try:
            fd = safefs.root(root)
        except OSError as exc:
            _skipped(str(root), exc)
            return
    else:
        fd = root

    def skip(rel: str) -> bool:
        return rel.rsplit("/", 1)[-1].startswith(".") or rel in excluded

    try:
        for e in safefs.walk(fd, under, recursive=recursive, skip=skip, on_error=_skipped):
            if not e.is_dir and not ignored(e.rel, patterns):
                yield e.rel
    except (OSError, ValueError) as exc:  # safefs.walk itself does not raise; belt and braces
        _skipped(under or ".", exc)


def _skipped(rel: str, exc: BaseException) -> None:
    """A folder a scan could not enter: logged (once per folder per scan: walk reports each
    folder once); a vanished one is routine, the rest are worth a warning."""
    err = getattr(exc, "errno", None)
    why = {errno.ELOOP: "became a symbolic link; not followed",
           errno.ENOTDIR: "replaced by something that is not a folder",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EMFILE: "out of file descriptors (a very deep tree?)",
           errno.ENFILE: "out of file descriptors"}.get(err or 0, str(exc))
    logger = log.get("watcher.watch.sources")
    if err in (errno.ENOENT, errno.ENOTDIR):
        logger.debug("scan.folder_skipped", folder=rel, why="vanished" if err == errno.ENOENT
                     else why)
    else:
        logger.warning("scan.folder_skipped", folder=rel, why=why, error=str(exc))


# --- completeness --------------------------------------------------------------------------------

# A file waiting for its quiet period is looked at again after half of it (a change is seen
# within half the period, so it is taken between 1 and 1.5 quiet periods after its last change);
# a file ready to be taken is not looked at again until the caller takes it.
LOOK_SPACING = 0.5


@dataclass(slots=True)
class _Entry:
    first: float
    changed: float  # when size/mtime last changed (or an event said it was written)
    size: int = -1
    mtime: int = -1
    complete: bool = False  # closed after writing, or moved in
    writing: bool = False  # an open-for-write was seen and no close yet (inotify)
    turn: int = 0  # its latest look scheduled: heap items of earlier turns are stale


class Stability:
    """Decides when a file in the inbox is complete. Pure logic: time and stat are injected.

    The cost of a call does not grow with the number of files waiting: each file has one
    scheduled look (a heap of due times), and only files whose look is due are stat'ed. A hint
    makes a file's look due at once; a file waiting for its quiet period is looked at twice per
    period; a file found ready is offered, oldest first, and looked at again only when the
    caller asks for it (``ready`` is lazy: a caller that stops after n files looked at n)."""

    def __init__(self, settle: float, clock: Callable[[], float] = time.monotonic,
                 stat_fn: Callable[[str], os.stat_result] = os.lstat, *,
                 close_events: bool = True) -> None:
        self.settle = settle
        self.close_events = close_events  # False with the polling observer
        self._clock = clock
        self._stat = stat_fn
        self._entries: dict[str, _Entry] = {}
        self._looks: list[tuple[float, int, str]] = []  # (when to look, turn, path)
        self._due: list[tuple[float, int, str]] = []  # looks due: (first seen, turn, path)
        self._turns = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def use_stat(self, stat_fn: Callable[[str], os.stat_result]) -> None:
        """Look at paths with ``stat_fn`` from now on (the daemon's: relative to the inbox's
        descriptor, never through a link, any depth)."""
        self._stat = stat_fn

    def __contains__(self, path: str) -> bool:
        return path in self._entries

    def hint(self, path: str, kind: str) -> None:
        now = self._clock()
        e = self._entries.get(path)
        if e is None:
            e = self._entries[path] = _Entry(now, now)
        if kind in (CLOSED, MOVED):
            e.complete, e.writing = True, False
        elif kind == MODIFIED:
            e.complete = False  # being written (again): a close will say when it is done
            e.writing = self.close_events
            e.changed = now
        elif kind == CREATED:
            e.changed = now
        self._schedule(path, e, now)  # looked at by the next call

    @property
    def stale(self) -> float:
        """How long a file being written must stay unchanged to be taken without a close."""
        return max(30.0, 10 * self.settle)

    def forget(self, path: str) -> None:
        self._entries.pop(path, None)  # its heap items are skipped as stale

    def due(self) -> list[str]:
        """Every path complete now, oldest first (``ready``, all of it). Vanished paths are
        forgotten."""
        return list(self.ready())

    def ready(self) -> Iterator[str]:
        """Paths complete now, oldest first, each looked at as it is reached: stop early and
        the rest are not stat'ed (they stay due for the next call). Only paths whose look is
        due are looked at; vanished ones are forgotten. A path yielded and not forgotten is
        offered again by the next call."""
        now = self._clock()
        looks, due = self._looks, self._due
        while looks and looks[0][0] <= now:  # each scheduled look moves here once
            _, turn, path = heapq.heappop(looks)
            e = self._entries.get(path)
            if e is not None and e.turn == turn:
                heapq.heappush(due, (e.first, turn, path))
        while due:
            _, turn, path = heapq.heappop(due)
            e = self._entries.get(path)
            if e is None or e.turn != turn:
                continue  # forgotten, or hinted again since (a newer look is scheduled)
            looked = self._look(path, e, now)
            if looked is None:
                continue
            complete, at = looked
            self._schedule(path, e, max(at, now))  # ``now``: the next call, not this one
            if complete:
                yield path

    def _schedule(self, path: str, e: _Entry, at: float) -> None:
        e.turn = next(self._turns)
        heapq.heappush(self._looks, (at, e.turn, path))

    def _look(self, path: str, e: _Entry, now: float) -> tuple[bool, float] | None:
        """Stat ``path``: (complete now, when to look next), or None when it is gone (then
        forgotten)."""
        try:
            st = self._stat(path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError | NotADirectoryError) or \
                    exc.errno == errno.ELOOP:
                # gone, or a folder on its way was replaced (by a file, a link): a scan
                # of what is there now finds it again if it is still in the inbox
                del self._entries[path]
                return None
            return False, now + self.settle * LOOK_SPACING  # unreadable for now: look again
        if not stat.S_ISREG(st.st_mode):
            return True, now  # links and special files: nothing to wait for
        # An empty file may have just been opened by a writer that has not written yet, or
        # closed by one that comes back to append: even closed, it waits the long time.
        empty = st.st_size == 0
        wait = self.stale if (e.writing or empty) else self.settle
        if (st.st_size, st.st_mtime_ns) != (e.size, e.mtime):
            e.size, e.mtime = st.st_size, st.st_mtime_ns
            if not e.complete:
                e.changed = now
                return False, now + wait * LOOK_SPACING
        if (e.complete and not empty) or now - e.changed >= wait:
            return True, now
        return False, min(e.changed + wait, now + wait * LOOK_SPACING)
