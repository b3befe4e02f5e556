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

from watcher.engine.helpers import start_forkserver


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "watch" and not {"-h", "--help", "--dry-run"} & set(args):
        start_forkserver()
    from watcher.cli import main as cli_main  # noqa: PLC0415

    return cli_main(args)


def run() -> None:
    """The console script: ``main``, then a quick exit.

    Once the command is done (workers joined, outputs durable, logs written), the interpreter's
    own teardown (freeing every module's objects, about 0.1 s after a batch) does nothing a user
    can see: the exit handlers run, the streams are flushed, and the process ends. A Ctrl-C
    before the command's own handling began is one line and exit 130 (``watcher.interrupt``).
    """
    from watcher import compat  # noqa: PLC0415

    try:
        code = main()
    except SystemExit as exc:  # argparse's usage errors, --help, --version
        code = exc.code
    except KeyboardInterrupt:  # Ctrl-C while the modules are imported: one line, exit 130
        from watcher import interrupt  # noqa: PLC0415

        code = interrupt.finish(sys.argv[1:])
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    compat.quick_exit(code)


if __name__ == "__main__":
    run()
