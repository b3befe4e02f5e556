"""A command stopped by Ctrl-C (SIGINT) before its work began: while the interpreter imports
its modules, its arguments and config are read, or a batch walks a huge tree for its inputs.

No traceback: one line, exit 130. A batch asked for a ``--report`` still writes it: the inputs
found so far as ``cancelled`` (those already known to be missing as failed), or no inputs at
all, ``interrupted`` set: it was interrupted before any work. Once a batch's workers run, the
batch itself handles the signal (``watcher.batch.run``).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from watcher import log

if TYPE_CHECKING:
    from watcher.batch import Input, ItemReport

EXIT = 128 + signal.SIGINT


def report_dest(args: argparse.Namespace | Sequence[str] | None) -> str | None:
    """Where a batch's ``--report`` goes (None: not a batch, or none asked), from the parsed
    arguments or, before they were parsed, from the command line itself."""
    if args is None or isinstance(args, argparse.Namespace):
        ns = args
    else:
        from watcher.commandline import build_parser  # noqa: PLC0415 - only when interrupted

        try:
            ns, _ = build_parser().parse_known_args(list(args))
        except (SystemExit, Exception):  # noqa: BLE001 - not a command line that asks for one
            return None
    if ns is None or getattr(ns, "command", None) != "batch":
        return None
    return getattr(ns, "report", None) or None


def finish(args: argparse.Namespace | Sequence[str] | None, found: Sequence[Input] = (),
           missing: Sequence[ItemReport] = ()) -> int:
    """Say the command was interrupted (a ``batch.interrupted`` line once the log is set up,
    else ``watcher: interrupted``), write the batch's report if one was asked; the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: the report is written still
    dest = report_dest(args)
    if log.is_configured() and (dest is not None or found or missing or _is_batch(args)):
        logger = log.get("watcher.batch")
        logger.warning("batch.interrupted", signal="SIGINT", running=0,
                       not_started=len(found), why="interrupted before any work began")
    else:
        print("watcher: interrupted", file=sys.stderr)
    if dest:
        from watcher import batch  # noqa: PLC0415 - only when a report is asked

        with contextlib.suppress(OSError):
            batch.write_report(batch.cancelled_report(found, missing, signal.SIGINT), dest)
    return EXIT


def _is_batch(args: argparse.Namespace | Sequence[str] | None) -> bool:
    return isinstance(args, argparse.Namespace) and getattr(args, "command", None) == "batch"
