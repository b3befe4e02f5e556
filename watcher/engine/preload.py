"""Imported by the worker forkserver before it forks any worker (``engine.helpers.PRELOAD``).

Two things happen here, once, in the forkserver:

- it ignores SIGTERM, SIGINT and SIGHUP. A signal sent to the whole process group (``kill -TERM
  -PGID``: ``docker stop`` on a shell entry point, systemd's ``KillMode=control-group``, a
  terminal's Ctrl-C) reaches the forkserver too; killed by it, it would take every worker with
  it (their parent-death signal) in the middle of their tasks. The forkserver needs no signal to
  stop: it exits when the process that started it closes its end of the forkserver's pipe (and
  a SIGHUP is the daemon's, to reload). Workers forked from it start with these ignored and
  install their own handlers first thing (``worker.worker_main``); multiprocessing's resource
  tracker ignores SIGTERM and SIGINT by itself.
- Pillow and the default formats' plugins are loaded, so a worker starts with them (see
  ``watcher.imaging.pil``).
"""

from __future__ import annotations

import signal
import sys


def _in_forkserver() -> bool:
    """Whether this import runs inside multiprocessing's forkserver (its ``main`` is on the
    stack): anywhere else, ignoring SIGTERM would make a process deaf to it."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_globals.get("__name__") == "multiprocessing.forkserver" and \
                frame.f_code.co_name == "main":
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def shield_forkserver() -> bool:
    """Ignore SIGTERM, SIGINT and SIGHUP in the forkserver; True if this is the forkserver."""
    if not _in_forkserver():
        return False
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    return True


shield_forkserver()

from watcher.imaging.pil import load_plugins  # noqa: E402 - after the signals: a group signal may come early

load_plugins()
