"""The workarounds that lean on libraries' private APIs or undocumented behaviour, in one place.

Each says what it reads or patches and why; ``tests/test_compat.py`` checks that what each relies
on is still there and behaves as assumed, so that a library upgrade fails a test instead of
silently undoing the workaround:

- ``multiprocessing_helper_pids`` and ``reap_orphans``: multiprocessing's forkserver and resource
  tracker pids, read from module-private singletons (a daemon running as PID 1 must not reap
  them);
- ``shorten_move_pairing``, ``watch_without_links``, ``OverflowWatch``: watchdog (>= 7.0, < 8)
  patched or overheard where it has no public API for what the inbox observer needs;
- ``quick_exit``: the interpreter's exit handlers run by ``atexit``'s private runner, then
  ``os._exit`` (the console script skips the interpreter's teardown).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

# --- multiprocessing: reaping as PID 1 -----------------------------------------------------------


def multiprocessing_helper_pids() -> set[int]:
    """The pids of this process's multiprocessing helpers: the forkserver and the resource
    tracker. multiprocessing has no public way to name them; they are the ``_forkserver_pid``
    and ``_pid`` of the module-private singletons ``forkserver._forkserver`` and
    ``resource_tracker._resource_tracker`` (None while not started). Empty when those are gone."""
    pids: set[Any] = set()
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver, resource_tracker  # noqa: PLC0415

        pids.add(forkserver._forkserver._forkserver_pid)
        pids.add(resource_tracker._resource_tracker._pid)
    return pids


def reap_orphans(own: Iterable[int]) -> None:
    """As PID 1 (a container), reap adopted orphans; never our own children (``own``, the
    live ``multiprocessing`` children and its helpers), whose exit status multiprocessing
    collects itself: each exited child is looked at without being reaped (WNOWAIT) first, and
    the first of our own stops the round."""
    import multiprocessing  # noqa: PLC0415

    mine = {p.pid for p in multiprocessing.active_children()}
    mine |= set(own)
    mine |= multiprocessing_helper_pids()
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in mine:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


# --- watchdog: the inbox observer ----------------------------------------------------------------

MOVE_PAIRING_DELAY = 0.01  # seconds an IN_MOVED_FROM waits for its IN_MOVED_TO


def shorten_move_pairing() -> None:
    """watchdog holds each IN_MOVED_FROM 0.5 s to pair it with its IN_MOVED_TO, in a FIFO: every
    claim (a rename out of the inbox) would hold back the events behind it, the next file's
    close-write included, by half a second. The kernel reports both halves of a rename in one
    read, so a 10 ms window pairs them as well. Sets the class attribute ``delay`` of watchdog
    7's ``InotifyMoveEventGrouper``, read when a watch's grouper is made; a watchdog without
    that class keeps its default."""
    try:
        from watchdog.observers.inotify_move_event_grouper import (  # noqa: PLC0415
            InotifyMoveEventGrouper,
        )
    except ImportError:  # another watchdog version: keep its default
        return
    InotifyMoveEventGrouper.delay = MOVE_PAIRING_DELAY


Walk = Callable[[bytes], Iterator[tuple[Any, list[Any], list[Any]]]]
PATCHED_GROUP_METHODS = ("_add_all_callbacks", "_recursive_simulate", "_add_callback")


def watch_without_links(walk: Walk) -> None:
    """watchdog adds watches for (and simulates events of) a new folder with ``os.walk``,
    which follows the folder itself when it has just been swapped for a link: it would list,
    and watch, a folder outside the inbox. Replaces the two private methods of
    ``InotifyWatchGroup`` that walk (``_add_all_callbacks``, ``_recursive_simulate``) with
    ones that walk with ``walk`` (``os.walk``'s triples, by descriptor), built on its private
    ``_add_callback``, ``is_recursive`` and the watch of a folder by its path
    (``_find_node_by_path(path).wd`` in watchdog 7.1, ``_active_callbacks_by_path`` in 7.0).
    A watchdog without them keeps its own."""
    try:
        from watchdog.observers import inotify as wd_inotify  # noqa: PLC0415
        from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent  # noqa: PLC0415
    except ImportError:
        return
    group = getattr(wd_inotify, "InotifyWatchGroup", None)
    if group is None or getattr(group, "_watcher_no_links", False):
        return
    if not all(hasattr(group, n) for n in PATCHED_GROUP_METHODS):
        return  # another watchdog version: keep its own
    by_node = hasattr(group, "_find_node_by_path")  # 7.1: a tree of nodes, found by path

    def add_all(self: Any, path: bytes) -> None:
        self._add_callback(path)
        if self.is_recursive:
            for root, dirnames, _ in walk(path):
                for dirname in dirnames:
                    self._add_callback(os.path.join(root, dirname))

    def watch_of(self: Any, path: bytes) -> Any:
        if by_node:
            node = self._find_node_by_path(path)
            return None if node is None else node.wd
        return self._active_callbacks_by_path.get(path)

    def simulate(self: Any, src_path: bytes) -> list[Any]:
        events = []
        for root, dirnames, filenames in walk(src_path):
            wd_root = watch_of(self, root)
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


class OverflowWatch(logging.Handler):
    """Hears watchdog's inotify backend say that the kernel's queue overflowed (IN_Q_OVERFLOW):
    watchdog has no event for it, only this warning of its ``inotify_c`` logger, raised on the
    observer thread. Calls ``on_overflow`` (the observer hands an overflow event on and wakes
    the loop, which rescans at once)."""

    LOGGER = "watchdog.observers.inotify_c"
    MESSAGE = "Inotify queue overflowed"

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(self.MESSAGE):
            self._on_overflow()


# --- the interpreter: a quick exit ---------------------------------------------------------------


def quick_exit(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown (freeing every module's
    objects, about 0.1 s after a batch, which does nothing a user can see): the exit handlers
    run (``atexit``'s private ``_run_exitfuncs``, as the interpreter runs them at exit), the
    standard streams are flushed, then ``os._exit``. A stream that cannot be flushed (stdout a
    closed pipe: the output did not get out) turns a 0 into 1."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code)
