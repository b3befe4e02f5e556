"""multiprocessing's helper processes, as the engine needs them: the worker forkserver (and what
it imports first) and the resource tracker, each started deaf to the process group's SIGHUP.

``watcher.launch`` starts the forkserver before the ``watch`` command imports anything heavy;
the supervisor starts whichever is not running yet.
"""

from __future__ import annotations

import sys

# What the worker forkserver imports before forking workers: first ``watcher.engine.preload`` (it
# makes the forkserver ignore SIGTERM/SIGINT sent to the process group, and loads Pillow and its
# default plugins), then the worker loop. The engine asks for the same list (a forkserver serves
# one preload).
PRELOAD = ["watcher.engine.preload", "watcher.engine.worker"]


# A warnings filter for the helper interpreters multiprocessing starts (the resource tracker,
# the forkserver), which take this process's -W options: after a kill -9 of this process, the
# resource tracker cleans up the semaphores it left and says so with a plain-text warning on the
# stderr it shares with the JSON log lines. The cleanup is what matters; the line is dropped.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def quiet_helpers() -> None:
    """Give the helper interpreters started from now on QUIET_TRACKER (see above)."""
    if QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(QUIET_TRACKER)


def start_helpers(*, forkserver: bool) -> None:
    """Start multiprocessing's resource tracker (and, if asked, the worker forkserver) if not yet,
    deaf to SIGHUP.

    The resource tracker ignores SIGINT and SIGTERM by itself, not SIGHUP, which a closing
    terminal sends to its whole process group (the daemon's own is a reload): it would die, and
    the next worker started would fail to register its lock. A signal ignored at exec stays
    ignored, so the helpers are started with SIGHUP ignored for that moment (from the main
    thread only: elsewhere they start as multiprocessing starts them).
    """
    import contextlib  # noqa: PLC0415
    import multiprocessing  # noqa: PLC0415
    import signal  # noqa: PLC0415
    from multiprocessing import forkserver as fs  # noqa: PLC0415
    from multiprocessing import resource_tracker  # noqa: PLC0415

    quiet_helpers()
    try:
        old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    except ValueError:  # not the main thread
        old = None
    try:
        with contextlib.suppress(Exception):
            resource_tracker.ensure_running()
            if forkserver:
                multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
                fs.ensure_running()
    finally:
        if old is not None:
            signal.signal(signal.SIGHUP, old)


def start_forkserver() -> None:
    """Start the forkserver that engines of this process fork their workers from, if not yet."""
    start_helpers(forkserver=True)


def resolve_start_method(method: str) -> str:
    """The start method ``method`` ("auto" or one by name) stands for in this process now.

    "auto" is "fork" where this process runs no other thread (a forked worker then starts at
    once, with nothing held by a thread it did not inherit), else "forkserver". A caller that
    starts threads of its own later (the daemon) asks for "forkserver" instead.
    """
    if method != "auto":
        return method
    import multiprocessing  # noqa: PLC0415
    import threading  # noqa: PLC0415

    forkable = "fork" in multiprocessing.get_all_start_methods()
    return "fork" if forkable and threading.active_count() == 1 else "forkserver"
