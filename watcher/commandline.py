"""The ``watcher`` command's argument parser: every subcommand and option, with its help.

Each subcommand has a one-line summary (``watcher --help``) and a description (``watcher
COMMAND --help``); every option has a help line (tests/test_cli_help.py walks this parser and
fails on any that has none). The setting flags come from the schema (``config.flags``). The man
page (``watcher.manpage``) and the shell completion scripts (``watcher.completion``) are made
from this same parser, so they list what the command really takes.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any, NoReturn

from watcher import __version__
from watcher.config import flags
from watcher.errors import REASONS, ExitCode

# What a shell completes for an argument: shtab reads the ``complete`` attribute of an action.
# These are shtab.FILE and shtab.DIRECTORY, spelt out so that parsing a command line does not
# import shtab (tests/test_cli_help.py checks they still match).
FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
DIRECTORY = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}

EPILOG = """exit codes:
  0    batch: every input succeeded (or was skipped because its outputs exist);
       watch: stopped by SIGTERM or SIGINT after draining (what systemd and containers
       expect); the other commands: done
  1    batch: the run completed but at least one input failed (see the log / --report);
       health: the daemon is not running, not ticking or degraded
  2    bad command line or configuration (a folder that cannot be written included);
       nothing was processed
  3    internal error (worker processes could not start, a bug)
  130  batch: interrupted by SIGINT (Ctrl-C); 143 by SIGTERM. Running tasks were allowed to
       finish. watch: 128+signal when a second signal stops it at once.
"""

BATCH_EPILOG = """exit codes:
  0    every input succeeded (or was skipped because its outputs exist)
  1    the run completed but at least one input failed (see the log / --report)
  2    bad command line or configuration, or an output folder that cannot be written;
       nothing was processed
  3    internal error (worker processes could not start, a bug)
  130  interrupted by SIGINT (Ctrl-C); 143 by SIGTERM. Running tasks were allowed to finish,
       the rest are reported cancelled; a second signal stops at once.
"""

WATCH_EPILOG = """Every setting flag can also come from its table in the config file or from its
environment variable (shown in brackets; an unknown WATCHER_* name is refused); flags win over
the environment, which wins over the file. All settings: docs/configuration.md.

signals:
  SIGTERM, SIGINT  stop taking files, let the files in hand finish (grace), exit 0
  a second one     stop at once (running files are killed; their inputs stay in the work
                   folder for the next start), exit 128+signal
  SIGHUP           reload the config file

exit codes:
  0    stopped by SIGTERM or SIGINT after draining
  2    bad configuration or folders (named in one line); nothing was taken
  3    internal error (worker processes could not start, a bug)
"""

DESCRIPTIONS = {
    "batch": "Process files, folders (recursively, mirroring sub-folders) and globs with one or "
             "more pipelines, in parallel worker processes, and exit.",
    "watch": "Run the inbox daemon: process every complete file that arrives in the inbox; move "
             "each input to the archive (or delete/keep it) or, with the reason beside it, to "
             "the quarantine.",
    "requeue": "Move quarantined files back into the inbox (their .error.json sidecars are "
               "removed), or give back the claims a dead daemon instance left in the work "
               "folder. The folders come from the same config, WATCHER_* variables and flags "
               "as watch.",
    "health": "Ask a running daemon whether it is healthy, from the heartbeat file in its work "
              "folder: print one line, exit 0 when it is alive, its loop ticked recently and it "
              "is not degraded (files waiting to retry, stuck claims or workers), 1 otherwise.",
    "status": "Show a running daemon's state as a compact table: state and problems, each "
              "worker with its file, the queue, what waits to retry, the last fates, the "
              "quarantine by reason. Read from its status endpoint when the page is on, else "
              "from the heartbeat file in its work folder. Exit 0 while a daemon runs, 1 when "
              "none does or it does not answer.",
    "check-config": "Validate a config file (and the WATCHER_* variables) and print the "
                    "effective settings as TOML that loads back; a mistake is refused naming "
                    "the file, table and key (exit 2).",
    "transforms": "List the built-in transforms with their parameters and defaults, the "
                  "aliases, and the failure reasons.",
    "make-samples": "Write sample images into a folder, to try watcher on: every format and "
                    "mode watcher handles, and one JPEG cut short on purpose, which the daemon "
                    "quarantines (reason: truncated). A progress bar on a terminal, then one "
                    "summary line.",
    "quarantine": "Read the quarantine of the daemon that the config (-c, $WATCHER_CONFIG or "
                  "./watcher.toml), the WATCHER_* variables and the folder flags describe, as "
                  "watch reads them: list its files with their reasons, or show one.",
    "completion": "Print a shell completion script for watcher, made from this parser. bash: "
                  "'source <(watcher completion bash)' in ~/.bashrc; zsh: save it as _watcher "
                  "in a folder of $fpath.",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with ExitCode.USAGE (2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def _completes(action: argparse.Action, what: dict[str, str]) -> argparse.Action:
    action.complete = what  # type: ignore[attr-defined]  # read by shtab
    return action


def _config_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    _completes(p.add_argument("-c", "--config", metavar="FILE", help=help_text), FILE)


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                   help="auto (default): JSON lines when the log's stream is not a terminal, "
                        "readable lines on one")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="the least important events logged (default: info)")


def _sub(sub: Any, name: str, summary: str, **kw: Any) -> argparse.ArgumentParser:
    # The epilogs are laid out by hand (RawDescriptionHelpFormatter), so the description is
    # wrapped here.
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=textwrap.fill(DESCRIPTIONS[name], 79),
        formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="watcher", description="Parallel image-processing pipeline: a batch "
                    "tool and an inbox daemon.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"watcher {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser,
                                help="what to do; 'watcher COMMAND --help' for its options")
    sub.required = True

    b = _sub(sub, "batch", "process a list of images and exit", epilog=BATCH_EPILOG,
             usage="%(prog)s [options] -o DIR INPUT ...")
    _completes(b.add_argument("inputs", nargs="*", metavar="INPUT",
                              help="image files, folders or globs; '-' reads a list of paths "
                                   "from stdin"), FILE)
    _completes(b.add_argument("-o", "--out", required=True, metavar="DIR",
                              help="output folder (created; it must be writable)"), DIRECTORY)
    _completes(b.add_argument("--list", metavar="FILE", action="append", default=[],
                              help="read input paths from FILE, one per line ('-' for stdin)"),
               FILE)
    b.add_argument("--ops", metavar="STEPS",
                   help='an ad-hoc pipeline, e.g. "auto_orient, thumbnail(128, 128)"; steps '
                        "are NAME or NAME(ARG, KEY=VALUE, ...), separated by ',' ';' or '|' "
                        "('watcher transforms' lists them)")
    b.add_argument("--suffix", metavar="S",
                   help="output name suffix (default: the pipeline's; for --ops, the step "
                        "names joined by '-')")
    _config_arg(b, "watcher.toml (default: ./watcher.toml if present, else the built-ins)")
    _completes(b.add_argument("--report", metavar="FILE",
                              help="write the full report as JSON ('-': stdout)"), FILE)
    _log_args(b)
    b.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    b.add_argument("--dry-run", action="store_true",
                   help="print what would be done to which file; write nothing")
    flags.add(b, "batch")
    b.set_defaults(subparser=b)

    w = _sub(sub, "watch", "run the inbox daemon (SIGTERM drains and exits 0)",
             epilog=WATCH_EPILOG, usage="%(prog)s [options]")
    _config_arg(w, "watcher.toml (default: $WATCHER_CONFIG, or ./watcher.toml if present, "
                   "else the built-ins)")
    _log_args(w)
    w.add_argument("--dry-run", action="store_true",
                   help="print what the daemon would do with each file in the inbox now, then "
                        "exit; nothing is written or moved")
    flags.add(w, "watch")
    w.set_defaults(subparser=w)

    q = _sub(sub, "quarantine", "list the quarantined files with their reasons, or show one")
    qs = q.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser,
                          help="list or show")
    qs.required = True
    ql = qs.add_parser("list", help="a table of the quarantined files: name, reason, age, "
                       "size, error; a count by reason on stderr",
                       description="A table of the quarantined files (name, reason, age, size, "
                       "error), and a count by reason on stderr.")
    ql.add_argument("--reason", action="append", default=[], metavar="REASON",
                    choices=list(REASONS),
                    help="only the files quarantined for this reason (repeatable; the "
                         "reasons are listed by 'watcher transforms')")
    qw = qs.add_parser("show", help="everything known of one quarantined file",
                       description="Everything the sidecar of one quarantined file says.")
    _completes(qw.add_argument("name", metavar="NAME",
                               help="its name in the quarantine, or its path"), FILE)
    for x in (ql, qw):
        x.add_argument("--json", action="store_true", help="JSON for scripts")
        _config_arg(x, "watcher.toml (for the folders; default as for watch)")
        flags.add(x, "quarantine")
        x.set_defaults(subparser=x)

    r = _sub(sub, "requeue", "move quarantined files (or a dead instance's claims) back into "
                             "the inbox", usage="%(prog)s [options] [PATH ...]")
    _completes(r.add_argument("paths", nargs="*", metavar="PATH",
                              help="quarantined files to move back"), FILE)
    r.add_argument("--all", action="store_true", help="every quarantined file")
    r.add_argument("--claims-of", metavar="INSTANCE", action="append", default=[],
                   help="move the claims of this (dead) daemon instance back into the inbox")
    r.add_argument("--stale-claims", action="store_true",
                   help="move back the claims of every instance whose heartbeat is older than "
                        "stale_claims_after")
    _config_arg(r, "watcher.toml (for the folders; default as for watch)")
    flags.add(r, "requeue")
    r.set_defaults(subparser=r)

    h = _sub(sub, "health", "exit 0 when the daemon is alive and not degraded, 1 otherwise, "
                            "with a one-line reason")
    _config_arg(h, "watcher.toml (for the work folder; default as for watch)")
    _completes(h.add_argument("--work", metavar="DIR", help="the daemon's work folder"),
               DIRECTORY)
    h.add_argument("--max-age", type=_positive_float, default=30.0, metavar="S",
                   help="the longest the supervisor loop may go without ticking (default 30)")
    h.add_argument("--live", action="store_true",
                   help="liveness only: ok while the loop ticks, even when degraded (for a "
                        "probe that restarts the daemon: a restart cures no full disk)")

    st = _sub(sub, "status", "the daemon's state: workers and their files, the queue, retries, "
                             "the last fates, the quarantine by reason")
    _config_arg(st, "watcher.toml (for the work folder and the status page's token; default "
                    "as for watch)")
    _completes(st.add_argument("--work", metavar="DIR", help="the daemon's work folder"),
               DIRECTORY)
    st.add_argument("--json", action="store_true", help="the status document as JSON, for "
                    "scripts")
    st.add_argument("--watch", action="store_true", help="redraw it live until Ctrl-C")
    st.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                    help="seconds between redraws with --watch (default 1)")

    c = _sub(sub, "check-config", "validate a config file and print the effective settings")
    _config_arg(c, "watcher.toml to check (default: $WATCHER_CONFIG, or ./watcher.toml if "
                   "present, else the built-ins)")

    _sub(sub, "transforms", "list the transforms, their parameters and the failure reasons")

    s = _sub(sub, "make-samples", "write sample images to try watcher on")
    _completes(s.add_argument("folder", metavar="FOLDER",
                              help="where the images are written (created)"), DIRECTORY)
    s.add_argument("-n", "--count", type=_positive_int, default=13, metavar="N",
                   help="how many images (default 13: each kind once; sizes cycle, so many "
                        "stay small)")
    s.add_argument("--list", action="store_true", help="print each path as it is written")

    k = _sub(sub, "completion", "print a shell completion script (bash or zsh)")
    k.add_argument("shell", choices=["bash", "zsh"], help="the shell the script is for")
    return parser
