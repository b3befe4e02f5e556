"""The ``watcher`` command's entry point: starts the worker forkserver before anything heavy.

The forkserver is a fresh interpreter that imports the worker modules (Pillow and its codecs);
started here, before this process imports the batch and daemon stack and parses its arguments,
the two start-ups overlap instead of adding up (about 0.1 s of every run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def start_forkserver() -> None:
    """Start the forkserver that engines of this process fork their workers from, if not yet."""
    import contextlib  # noqa: PLC0415
    import multiprocessing  # noqa: PLC0415
    from multiprocessing import forkserver  # noqa: PLC0415

    with contextlib.suppress(Exception):
        multiprocessing.get_context("forkserver").set_forkserver_preload(["watcher.worker"])
        forkserver.ensure_running()


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("batch", "watch") and not {"-h", "--help"} & set(args):
        start_forkserver()
    from .cli import main as cli_main  # noqa: PLC0415

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
