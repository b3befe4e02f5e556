"""The ``watcher`` command: parse, load settings, set up logging, run, map the outcome to an
exit code.

    watcher batch img_*.bmp --out thumbnails/ --pipeline thumbnail
    watcher batch photos/ --out web/ --ops "auto_orient, resize(width=1600)" --format webp
    watcher check-config --config watcher.toml
    watcher transforms
    watcher make-samples samples/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NoReturn

from watcher import __version__, batch, config, log, transforms
from watcher.config import dump, flags
from watcher.engine.helpers import start_forkserver
from watcher.errors import REASONS, ConfigError, ExitCode, WatcherError

EPILOG = """exit codes:
  0    every input succeeded (or was skipped because its outputs exist)
  1    the run completed but at least one input failed (see the log / --report)
  2    bad command line or configuration; nothing was processed
  3    internal error (worker processes could not start, a bug)
  130  interrupted by SIGINT (Ctrl-C); 143 by SIGTERM. Running tasks were allowed to finish.
"""


class _Parser(argparse.ArgumentParser):
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="watcher", description="Parallel image-processing pipeline: a batch "
                     "tool and an inbox daemon.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"watcher {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    b = sub.add_parser("batch", help="process a list of images and exit", epilog=EPILOG,
                       usage="%(prog)s [options] -o DIR INPUT ...",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Process files, folders (recursively, mirroring sub-folders) "
                       "and globs with one or more pipelines, in parallel worker processes.")
    b.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders or globs; '-' reads a list of paths from stdin")
    b.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    b.add_argument("--list", metavar="FILE", action="append", default=[],
                   help="read input paths from FILE, one per line ('-' for stdin)")
    b.add_argument("--ops", metavar="STEPS",
                   help='an ad-hoc pipeline, e.g. "auto_orient, thumbnail(128,128)"')
    b.add_argument("--suffix", help="output name suffix (default: the pipeline's; for --ops, "
                                    "the step names joined by '-')")
    b.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (default: ./watcher.toml "
                   "if present, else the built-ins)")
    b.add_argument("--report", metavar="FILE", help="write the full report as JSON ('-': stdout)")
    _log_args(b)
    b.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    b.add_argument("--dry-run", action="store_true",
                   help="print what would be done to which file; write nothing")
    flags.add(b, "batch")
    b.set_defaults(subparser=b)

    w = sub.add_parser("watch", help="run the inbox daemon", epilog=WATCH_EPILOG,
                       usage="%(prog)s [options]",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Process every complete file that arrives in the inbox; move "
                       "each input to the archive (or delete/keep it) or to the quarantine.")
    w.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (default: $WATCHER_CONFIG"
                   ", or ./watcher.toml if present, else the built-ins)")
    _log_args(w)
    w.add_argument("--dry-run", action="store_true",
                   help="print what the daemon would do with each file in the inbox now, then "
                        "exit; nothing is written or moved")
    flags.add(w, "watch")
    w.set_defaults(subparser=w)

    q = sub.add_parser("quarantine", help="list the quarantined files, or show one",
                       description="The quarantine of the daemon that watcher.toml (-c, "
                       "$WATCHER_CONFIG or ./watcher.toml), WATCHER_* and the folder flags "
                       "describe, as `watch` reads them.")
    qs = q.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    qs.required = True
    ql = qs.add_parser("list", help="a table of the quarantined files: name, reason, age, "
                       "size, error; a count by reason on stderr")
    ql.add_argument("--reason", action="append", default=[], metavar="REASON",
                    help="only the files quarantined for this reason (repeatable)")
    qw = qs.add_parser("show", help="everything known of one quarantined file")
    qw.add_argument("name", metavar="NAME", help="its name in the quarantine, or its path")
    for x in (ql, qw):
        x.add_argument("--json", action="store_true", help="JSON for scripts")
        x.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (for the folders)")
        flags.add(x, "quarantine")
        x.set_defaults(subparser=x)

    r = sub.add_parser("requeue", help="move quarantined files back into the inbox",
                       usage="%(prog)s [options] [PATH ...]")
    r.add_argument("paths", nargs="*", metavar="PATH", help="quarantined files")
    r.add_argument("--all", action="store_true", help="every quarantined file")
    r.add_argument("--claims-of", metavar="INSTANCE", action="append", default=[],
                   help="move the claims of this (dead) daemon instance back into the inbox")
    r.add_argument("--stale-claims", action="store_true",
                   help="move back the claims of every instance whose heartbeat is older than "
                        "stale_claims_after")
    r.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (for the folders)")
    flags.add(r, "requeue")
    r.set_defaults(subparser=r)

    h = sub.add_parser("health", help="exit 0 when the daemon is alive, its loop ticked "
                                      "recently and it is not degraded (files waiting to "
                                      "retry, stuck claims or workers), 1 otherwise, with a "
                                      "one-line reason")
    h.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (for the work folder)")
    h.add_argument("--work", metavar="DIR", help="the daemon's work folder")
    h.add_argument("--max-age", type=_positive_float, default=30.0, metavar="S",
                   help="the longest the supervisor loop may go without ticking (default 30)")
    h.add_argument("--live", action="store_true",
                   help="liveness only: ok while the loop ticks, even when degraded (for a "
                        "probe that restarts the daemon: a restart cures no full disk)")

    c = sub.add_parser("check-config", help="validate a config file and print the effective "
                                            "settings (environment included) as TOML that "
                                            "loads back")
    c.add_argument("-c", "--config", metavar="FILE", help="watcher.toml to check")

    sub.add_parser("transforms", help="list the built-in transforms and their parameters")

    s = sub.add_parser("make-samples", help="write a set of sample images to try watcher on "
                       "(every format and mode, and one broken file for the quarantine)")
    s.add_argument("folder", help="where to write them (created if missing)")
    s.add_argument("-n", "--count", type=_positive_int, default=13,
                   help="how many (default 13: one of each kind; sizes cycle, so many stay small)")
    s.add_argument("--list", action="store_true", help="print each path as it is written")
    return parser


WATCH_EPILOG = """Every setting flag can also come from its table in the config file or from its
environment variable (shown in brackets; an unknown WATCHER_* name is refused); flags win over
the environment, which wins over the file. All settings: docs/configuration.md.
Signals: SIGTERM/SIGINT drain and exit 0 (a second one stops at once); SIGHUP reloads the config.
"""


def watch_loader(args: argparse.Namespace, command: str = "watch") -> Any:
    """A function giving the effective settings: file, then WATCHER_*, then flags. Called again
    on SIGHUP."""
    # The file is chosen once: a reload rereads it, and refuses (keeping the running settings)
    # if it is gone, rather than falling back to the built-ins.
    path = args.config or os.environ.get("WATCHER_CONFIG") or _config_path(None)

    def load() -> config.Settings:
        s = config.from_environment(config.load(path, final=False), os.environ, final=False)
        return flags.apply_flags(s, args, command)
    return load


def cmd_watch(args: argparse.Namespace) -> int:
    from watcher.watch.daemon import Daemon  # noqa: PLC0415

    fmt = log.resolve_format(args.log_format, sys.stdout)
    log.configure("daemon", fmt, args.log_level, stream=sys.stdout)
    loader = watch_loader(args)
    try:
        loader()
    except ConfigError as exc:
        if exc.where.startswith("-"):  # a bad flag: a usage error, as in a batch
            args.subparser.error(str(exc))
        raise
    if args.dry_run:
        from watcher import dryrun  # noqa: PLC0415

        settings = loader()
        dryrun.watch_plan(settings, settings.select([]), sys.stdout)
        return ExitCode.OK
    return Daemon(loader, log_format=fmt, log_level=args.log_level).run()


def cmd_health(args: argparse.Namespace) -> int:
    from watcher.ops import health  # noqa: PLC0415

    work = args.work or watch_loader(args, "health")().watch.work
    ok, line = health.check(health.heartbeat_path(work), args.max_age, live_only=args.live)
    print(line)
    return ExitCode.OK if ok else ExitCode.SOME_FAILED


def cmd_requeue(args: argparse.Namespace) -> int:
    from watcher.watch.lifecycle import Folders, recover_claims, requeue  # noqa: PLC0415

    claims = bool(args.claims_of or args.stale_claims)
    if claims and (args.paths or args.all):
        args.subparser.error("--claims-of/--stale-claims move claims; give them alone")
    if not claims and bool(args.paths) == bool(args.all):
        args.subparser.error("give quarantined PATHs, --all, --claims-of or --stale-claims")
    s = watch_loader(args, "requeue")()
    folders = Folders(s.watch.folders(), work_root=s.watch.work)
    if claims:
        moved = recover_claims(folders, s.watch.stale_claims_after,
                               only=args.claims_of or None)
    else:
        moved = requeue(folders, None if args.all else list(args.paths))
    for src, dest in moved:
        print(f"{src} -> {dest}")
    print(f"requeued {len(moved)} file(s)", file=sys.stderr)
    return ExitCode.OK


def cmd_quarantine(args: argparse.Namespace) -> int:
    from watcher.watch import quarantine  # noqa: PLC0415

    folder = watch_loader(args, "quarantine")().watch.folders()["quarantine"]
    if args.action == "show":
        entry = quarantine.find(folder, args.name)
        print(json.dumps(entry.to_dict(), indent=2) if args.json else quarantine.describe(entry))
        return ExitCode.OK
    rows = list(quarantine.entries(folder, reasons=args.reason))
    if args.json:
        print(json.dumps([e.to_dict() for e in rows], indent=2))
    elif rows:
        print(quarantine.table(rows, shutil.get_terminal_size((120, 24)).columns))
    print(quarantine.summary(rows) + f" ({folder})", file=sys.stderr)
    return ExitCode.OK


def cmd_make_samples(args: argparse.Namespace) -> int:
    from watcher import samples  # noqa: PLC0415

    bar = batch.progress_bar(args.count, sys.stderr.isatty(), unit="file")

    def written(path: str) -> None:
        if args.list:
            print(path)
        bar.update(1)
    try:
        print(samples.write_all(args.folder, args.count, written))
    finally:
        bar.close()
    return ExitCode.OK


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                   help="auto: JSON when the log's stream is not a terminal, else console "
                        "(one short line per event; no colour when NO_COLOR is set)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def _config_path(given: str | None) -> str | None:
    if given:
        return given
    return "watcher.toml" if os.path.isfile("watcher.toml") else None


def cmd_batch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    fmt = log.resolve_format(args.log_format)
    log.configure("main", fmt, args.log_level)
    settings = config.load(_config_path(args.config), final=False)
    if args.ops and getattr(args, "output.pipelines", None):
        parser.error("give --ops or --pipeline, not both")
    try:
        settings = flags.apply_flags(settings, args, "batch")
        pipes = _pipelines(args, settings, parser)
    except ConfigError as exc:
        parser.error(str(exc))
    paths = [a for a in args.inputs if a != "-"]
    return _run_batch(args, settings, pipes, paths, fmt)


def _pipelines(args: argparse.Namespace, settings: config.Settings,
               parser: argparse.ArgumentParser) -> tuple[Any, ...]:
    if args.suffix:
        config.check_suffix(args.suffix, "--suffix")
    if args.ops:
        steps = [config.parse_step(x, "--ops") for x in config.split_ops(args.ops)]
        if not steps:
            parser.error("--ops: no steps given")
        suffix = args.suffix or "-".join(s.name for s in steps)
        pipes: tuple[Any, ...] = (config.pipeline_from(steps, "ops", suffix),)
    else:
        pipes = settings.select(())
        if args.suffix:
            if len(pipes) > 1:
                parser.error("--suffix needs exactly one pipeline")
            pipes = (replace(pipes[0], suffix=args.suffix),)
    changes = flags.output_options(args, "batch")
    if changes:
        pipes = tuple(replace(p, output=replace(p.output, **changes)) for p in pipes)
    return pipes


def _run_batch(args: argparse.Namespace, settings: config.Settings, pipes: tuple[Any, ...],
               paths: list[str], fmt: str) -> int:
    logger = log.get("watcher.cli")
    lists = list(args.list) + (["-"] if "-" in args.inputs else [])
    for name in lists:
        if name == "-":
            paths += batch.read_list(sys.stdin)
        else:
            try:
                with open(name, encoding="utf-8") as f:
                    paths += batch.read_list(f)
            except OSError as exc:
                raise ConfigError(f"--list {name}", exc.strerror or str(exc)) from exc
    found, missing = batch.expand(paths)
    if args.dry_run:
        from watcher import dryrun  # noqa: PLC0415

        failing = dryrun.batch_plan(found, missing, args.out, pipes, settings, sys.stdout)
        return ExitCode.SOME_FAILED if failing else ExitCode.OK
    progress = sys.stderr.isatty() and not args.no_progress
    report = batch.run(found, args.out, pipes, settings, progress=progress, log_format=fmt,
                       log_level="warning", failures=missing, report_to=args.report or "")
    for item in missing:
        logger.error("file.failed", input=item.input, reason=item.reason, error=item.error)
    if args.report:
        text = json.dumps(report.to_dict(), indent=2)
        if args.report == "-":
            print(text)
        else:
            with open(args.report, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    if report.interrupted:
        return 128 + report.interrupted
    return ExitCode.OK if report.ok else ExitCode.SOME_FAILED


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("WATCHER_CONFIG") or _config_path(None)
    settings = config.from_environment(config.load(path, final=False), os.environ)
    print(dump.to_toml(settings), end="")
    print(f"config OK: {settings.source}", file=sys.stderr)
    return ExitCode.OK


def cmd_transforms() -> int:
    for name, spec in sorted(transforms.REGISTRY.items()):
        params = ", ".join(f"{p.name}: {p.kind.__name__}"
                           + ("" if p.default is transforms._REQUIRED else f" = {p.default!r}")
                           for p in spec.params)
        doc = (spec.func.__doc__ or "").strip().splitlines()[0]
        print(f"{name}({params})\n    {doc}")
    aliases = ", ".join(f"{a} = {b}" for a, b in sorted(transforms.ALIASES.items()))
    print(f"\naliases: {aliases}")
    print("\nfailure reasons: " + ", ".join(REASONS))
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "watch":
        start_forkserver()  # already running when started through watcher.launch
    try:
        if args.command == "batch":
            return cmd_batch(args, args.subparser)
        if args.command == "watch":
            return cmd_watch(args)
        if args.command == "requeue":
            return cmd_requeue(args)
        if args.command == "quarantine":
            return cmd_quarantine(args)
        if args.command == "health":
            return cmd_health(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "transforms":
            return cmd_transforms()
        if args.command == "make-samples":
            return cmd_make_samples(args)
    except ConfigError as exc:
        print(f"watcher: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except WatcherError as exc:
        print(f"watcher: error: {exc}", file=sys.stderr)
        return ExitCode.INTERNAL
    except Exception:  # noqa: BLE001 - a bug: log its traceback, exit with the documented code
        log.get("watcher.cli").exception("watcher.internal_error")
        return ExitCode.INTERNAL
    parser.error(f"unknown command {args.command!r}")
    return ExitCode.USAGE  # not reached: error() exits


if __name__ == "__main__":
    sys.exit(main())
