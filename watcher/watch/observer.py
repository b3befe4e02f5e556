"""The inbox observer: watchdog's inotify (or polling) observer, supervised, its events handed to
the daemon loop as (kind, path) hints (``sources`` says when a file is complete).

The observer thread is supervised: if it dies it is restarted (the caller then rescans); where
inotify cannot be used (a network or virtual file system, or no inotify watches or instances
left) the polling observer is used instead, with an actionable message. The observers' own walks
and stats go through directory descriptors (``safefs``): a folder swapped for a link is never
entered, and any depth works. What this needs of watchdog beyond its public API is in
``watcher.compat``.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
from collections.abc import Callable, Iterator
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

from watcher import compat, log
from watcher.fs import safefs
from watcher.watch.sources import CLOSED, CREATED, DIR, MODIFIED, MOVED, OVERFLOW

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs",
              "lustre", "afs", "sshfs", "davfs", "vboxsf", "vmhgfs", "prl_fs")


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

            compat.shorten_move_pairing()
            compat.watch_without_links(_walk_no_links)
            safefs.root(self.inbox)  # registered: the observer's walks stay below it

            # full events: a file renamed in from outside is a move (complete), not a creation
            obs = InotifyObserver(generate_full_events=True)
        obs.daemon = True
        handler = _Handler(self.events, self._wake)
        if kind != "polling":
            self._overflow = compat.OverflowWatch(lambda: handler.put(OVERFLOW, self.inbox))
            logger = logging.getLogger(compat.OverflowWatch.LOGGER)
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
            logging.getLogger(compat.OverflowWatch.LOGGER).removeHandler(self._overflow)
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


def _inotify_advice(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return ("out of inotify watches: raise the limit, e.g. "
                "sysctl -w fs.inotify.max_user_watches=524288 (persist it in /etc/sysctl.d/)")
    if exc.errno == errno.EMFILE:
        return ("out of inotify instances: raise the limit, e.g. "
                "sysctl -w fs.inotify.max_user_instances=1024 (persist it in /etc/sysctl.d/)")
    return "inotify is not available here; set observer = \"polling\" to silence this"
