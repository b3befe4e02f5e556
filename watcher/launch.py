"""The ``watcher`` command's entry point: for ``watch``, starts the worker forkserver before
anything heavy.

The forkserver is a fresh interpreter that imports the worker modules (Pillow and its codecs);
started here, before this process imports the daemon stack and parses its arguments, the two
start-ups overlap instead of adding up (about 0.1 s). A batch forks its workers from this
process instead (start method "auto"), which is quicker still, and needs no forkserver.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "watch" and not {"-h", "--help"} & set(args):
        start_forkserver()
    from watcher.cli import main as cli_main  # noqa: PLC0415

    return cli_main(args)


def run() -> None:
    """The console script: ``main``, then a quick exit.

    Once the command is done (workers joined, outputs durable, logs written), the interpreter's
    own teardown (freeing every module's objects, about 0.1 s after a batch) does nothing a user
    can see: the exit handlers run, the streams are flushed, and the process ends.
    """
    from watcher import compat  # noqa: PLC0415

    try:
        code = main()
    except SystemExit as exc:  # argparse's usage errors, --help, --version
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    compat.quick_exit(code)


if __name__ == "__main__":
    run()
