"""Where paths come from in watch mode: the inbox observer, the stability tracker, scans.

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
the events missed. Scans, the tracker's looks and the observers' own walks go through directory
descriptors (``safefs``): a folder swapped for a link is never entered, any depth works, and a
scan never raises. The observer thread is supervised: if it dies it is restarted (the caller then
rescans); where inotify cannot be used (a network or virtual file system, or no inotify watches
or instances left) the polling observer is used instead, with an actionable message.
"""

from __future__ import annotations

import errno
import fnmatch
import heapq
import itertools
import logging
import os
import queue
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from watcher import log
from watcher.fs import safefs

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs",
              "lustre", "afs", "sshfs", "davfs", "vboxsf", "vmhgfs", "prl_fs")

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


# --- file system type ----------------------------------------------------------------------------

def fs_type(path: str, mountinfo: str | None = None) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                mountinfo = f.read()
        except OSError:
            return "unknown"
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def wants_polling(kind: str) -> bool:
    return kind in NETWORK_FS or kind.startswith(("fuse", "nfs"))


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


# --- the observer ---------------------------------------------------------------------------

class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: hand the path on, wake the loop, nothing else."""

    def __init__(self, events: queue.SimpleQueue[tuple[str, str]], wake: Callable[[], None]):
        self._events = events
        self._wake = wake

    def put(self, kind: str, path: str | bytes) -> None:
        self._events.put((kind, os.fsdecode(path)))
        self._wake()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent):
            self.put(CLOSED, event.src_path)
        elif isinstance(event, FileMovedEvent):
            self.put(MOVED, event.dest_path)
        elif isinstance(event, DirMovedEvent | DirCreatedEvent):
            self.put(DIR, getattr(event, "dest_path", "") or event.src_path)
        elif isinstance(event, FileCreatedEvent):
            self.put(CREATED, event.src_path)
        elif isinstance(event, FileModifiedEvent):
            self.put(MODIFIED, event.src_path)


class _OverflowWatch(logging.Handler):
    """Hears watchdog's inotify backend say that the kernel's queue overflowed (IN_Q_OVERFLOW):
    watchdog has no event for it, only this warning of its ``inotify_c`` logger, raised on the
    observer thread. Hands an OVERFLOW event on and wakes the loop, which rescans at once."""

    LOGGER = "watchdog.observers.inotify_c"
    MESSAGE = "Inotify queue overflowed"

    def __init__(self, put: Callable[[str, str], None], inbox: str) -> None:
        super().__init__(logging.WARNING)
        self._put = put
        self._inbox = inbox

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(self.MESSAGE):
            self._put(OVERFLOW, self._inbox)


class InboxObserver:
    """The supervised watchdog observer of one inbox."""

    def __init__(self, inbox: str, *, kind: str, recursive: bool, poll_interval: float,
                 wake: Callable[[], None]) -> None:
        self.inbox = inbox
        self.requested = kind
        self.recursive = recursive
        self.poll_interval = poll_interval
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._wake = wake
        self._observer: Any = None
        self._overflow: logging.Handler | None = None
        self.kind = ""
        self.restarts = 0
        self._log = log.get("watcher.observer")

    def choose(self) -> str:
        if self.requested != "auto":
            return self.requested
        fs = fs_type(self.inbox)
        if wants_polling(fs):
            self._log.info("observer.polling_chosen", fs=fs, inbox=self.inbox,
                           why="events do not arrive reliably on network/virtual file systems")
            return "polling"
        return "inotify"

    def start(self) -> None:
        kind = self.kind or self.choose()
        try:
            self._start(kind)
        except OSError as exc:
            if kind != "inotify":
                raise
            self._log.error("observer.inotify_unavailable", error=str(exc),
                            fix=_inotify_advice(exc), fallback="polling")
            self._start("polling")

    def _start(self, kind: str) -> None:
        if kind == "polling":
            from watchdog.observers.polling import PollingObserverVFS  # noqa: PLC0415

            safefs.root(self.inbox)  # registered: the snapshots stay below it
            obs: Any = PollingObserverVFS(_lstat_below, _listdir_below,
                                          polling_interval=self.poll_interval)
        else:
            from watchdog.observers.inotify import InotifyObserver  # noqa: PLC0415

            _shorten_move_pairing()
            _watch_without_links()
            safefs.root(self.inbox)  # registered: the observer's walks stay below it

            # full events: a file renamed in from outside is a move (complete), not a creation
            obs = InotifyObserver(generate_full_events=True)
        obs.daemon = True
        handler = _Handler(self.events, self._wake)
        if kind != "polling":
            self._overflow = _OverflowWatch(handler.put, self.inbox)
            logger = logging.getLogger(_OverflowWatch.LOGGER)
            logger.addHandler(self._overflow)
            if logger.getEffectiveLevel() > logging.WARNING:  # --log-level error: heard anyway
                logger.setLevel(logging.WARNING)
                logger.propagate = False  # and not shown above the level asked for
        obs.schedule(handler, self.inbox, recursive=self.recursive)
        obs.start()
        self._observer, self.kind = obs, kind
        self._log.info("observer.started", kind=kind, inbox=self.inbox, recursive=self.recursive)

    def healthy(self) -> bool:
        """False once the observer thread has died (the caller restarts it and rescans)."""
        return self._observer is not None and self._observer.is_alive()

    def restart(self) -> None:
        self.restarts += 1
        self._log.warning("observer.restarting", kind=self.kind, restarts=self.restarts)
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._overflow is not None:
            logging.getLogger(_OverflowWatch.LOGGER).removeHandler(self._overflow)
            self._overflow = None
        obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(5)
            except Exception as exc:  # noqa: BLE001 - a dead observer may fail to stop cleanly
                self._log.warning("observer.stop_failed", error=str(exc))

    def drain(self) -> list[tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out


def _shorten_move_pairing() -> None:
    """watchdog holds each IN_MOVED_FROM 0.5 s to pair it with its IN_MOVED_TO, in a FIFO: every
    claim (a rename out of the inbox) would hold back the events behind it, the next file's
    close-write included, by half a second. The kernel reports both halves of a rename in one
    read, so a 10 ms window pairs them as well."""
    try:
        from watchdog.observers.inotify_move_event_grouper import (  # noqa: PLC0415
            InotifyMoveEventGrouper,
        )
    except ImportError:  # another watchdog version: keep its default
        return
    InotifyMoveEventGrouper.delay = 0.01


def _below(path: str) -> tuple[int, str]:
    found = safefs.locate(os.fsdecode(path))
    if found is None:
        raise OSError(errno.ENOENT, "not below the inbox", path)
    return found


def _lstat_below(path: str) -> os.stat_result:
    """The polling observer's stat: an lstat by descriptor below the inbox (a link is not a
    folder to walk into; any depth works)."""
    fd, rel = _below(path)
    return os.fstat(fd) if rel == "." else safefs.lstat(fd, rel)


def _listdir_below(path: str | None) -> list[os.DirEntry[str]]:
    """The polling observer's listdir: the folder opened by descriptor, never through a link
    (one swapped for a link reads as 'not a folder', which the snapshot skips)."""
    fd, rel = _below(path or ".")
    try:
        dfd = safefs.open_dir(fd, "" if rel == "." else rel)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotADirectoryError(errno.ENOTDIR, "a symbolic link", path) from exc
        raise
    try:
        with os.scandir(dfd) as it:
            return list(it)
    finally:
        os.close(dfd)


def _walk_no_links(top: bytes | str) -> Iterator[tuple[Any, list[Any], list[Any]]]:
    """``os.walk(top)``'s triples, walked by descriptor below the registered root holding
    ``top`` (``safefs``): ``top`` itself or a folder below it swapped for a link is not
    entered (os.walk follows a linked ``top``). Nothing outside a registered root."""
    found = safefs.locate(os.fsdecode(top))
    if found is None:
        return
    fd, rel = found
    base = "" if rel == "." else rel
    groups: dict[str, tuple[list[str], list[str]]] = {"": ([], [])}
    failed: list[str] = []
    for e in safefs.walk(fd, base, on_error=lambda rel, exc: failed.append(rel)):
        sub = e.rel[len(base) + 1:] if base else e.rel
        folder = groups.setdefault(sub.rpartition("/")[0], ([], []))
        (folder[0] if e.is_dir else folder[1]).append(e.name)
    if base in failed or (not base and "" in failed):
        return  # not a folder (any more), or a link: nothing to walk
    cast = os.fsencode if isinstance(top, bytes) else os.fsdecode
    for sub, (dirs, names) in groups.items():
        yield (cast(os.path.join(os.fsdecode(top), sub)) if sub else top,
               [cast(d) for d in dirs], [cast(n) for n in names])


def _watch_without_links() -> None:
    """watchdog adds watches for (and simulates events of) a new folder with ``os.walk``,
    which follows the folder itself when it has just been swapped for a link: it would list,
    and watch, a folder outside the inbox. Walk by descriptor instead (``_walk_no_links``)."""
    try:
        from watchdog.observers import inotify as wd_inotify  # noqa: PLC0415
        from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent  # noqa: PLC0415
    except ImportError:
        return
    group = getattr(wd_inotify, "InotifyWatchGroup", None)
    if group is None or getattr(group, "_watcher_no_links", False):
        return
    if not all(hasattr(group, n) for n in ("_add_all_callbacks", "_recursive_simulate",
                                            "_add_callback")):
        return  # another watchdog version: keep its own

    def add_all(self: Any, path: bytes) -> None:
        self._add_callback(path)
        if self.is_recursive:
            for root, dirnames, _ in _walk_no_links(path):
                for dirname in dirnames:
                    self._add_callback(os.path.join(root, dirname))

    def simulate(self: Any, src_path: bytes) -> list[Any]:
        events = []
        for root, dirnames, filenames in _walk_no_links(src_path):
            wd_root = self._active_callbacks_by_path.get(root)
            if wd_root is None:
                continue
            for dirname in dirnames:
                mask = InotifyConstants.IN_CREATE | InotifyConstants.IN_ISDIR
                events.append(InotifyEvent(wd_root, mask, 0, dirname))
            for filename in filenames:
                events.append(InotifyEvent(wd_root, InotifyConstants.IN_CREATE, 0, filename))
        return events

    group._add_all_callbacks = add_all
    group._recursive_simulate = simulate
    group._watcher_no_links = True


def _inotify_advice(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return ("out of inotify watches: raise the limit, e.g. "
                "sysctl -w fs.inotify.max_user_watches=524288 (persist it in /etc/sysctl.d/)")
    if exc.errno == errno.EMFILE:
        return ("out of inotify instances: raise the limit, e.g. "
                "sysctl -w fs.inotify.max_user_instances=1024 (persist it in /etc/sysctl.d/)")
    return "inotify is not available here; set observer = \"polling\" to silence this"
