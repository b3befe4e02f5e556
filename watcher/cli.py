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
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any, NoReturn

from watcher import __version__, batch, config, log, transforms
from watcher.errors import REASONS, ConfigError, ExitCode, WatcherError
from watcher.imaging.formats import OUTPUT_FORMATS
from watcher.launch import start_forkserver

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
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Process files, folders (recursively, mirroring sub-folders) "
                       "and globs with one or more pipelines, in parallel worker processes.")
    b.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders or globs; '-' reads a list of paths from stdin")
    b.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    b.add_argument("--list", metavar="FILE", action="append", default=[],
                   help="read input paths from FILE, one per line ('-' for stdin)")
    b.add_argument("-p", "--pipeline", action="append", default=[], metavar="NAME",
                   help="pipeline from the config or built-ins (repeatable; each makes an "
                        "output). Built-ins: thumbnail, web, processed")
    b.add_argument("--ops", metavar="STEPS",
                   help='an ad-hoc pipeline, e.g. "auto_orient, thumbnail(128,128)"')
    b.add_argument("--suffix", help="output name suffix (default: the pipeline's; for --ops, "
                                    "the step names joined by '-')")
    b.add_argument("--format", choices=["same", *OUTPUT_FORMATS],
                   help="output format for this run (overrides the pipelines')")
    b.add_argument("--quality", type=int, metavar="1-100", help="JPEG/WebP/AVIF quality")
    b.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (default: ./watcher.toml "
                   "if present, else the built-ins)")
    b.add_argument("-j", "--workers", type=_positive_int, help="worker processes (default: "
                   "one per CPU)")
    b.add_argument("--timeout", type=_positive_float, help="seconds one input may take")
    b.add_argument("--max-worker-memory", metavar="SIZE",
                   help="memory one worker may use, e.g. 1GiB (default: auto)")
    _executor_args(b)
    b.add_argument("--on-conflict", choices=config.CONFLICT_POLICIES,
                   help="an output file already exists: skip the input's output (default), "
                        "overwrite it, or rename the new one (name_2.ext)")
    b.add_argument("--report", metavar="FILE", help="write the full report as JSON ('-': stdout)")
    _log_args(b)
    b.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    b.set_defaults(subparser=b)

    w = sub.add_parser("watch", help="run the inbox daemon", epilog=WATCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Process every complete file that arrives in the inbox; move "
                       "each input to the archive (or delete/keep it) or to the quarantine.")
    w.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (default: $WATCHER_CONFIG"
                   ", or ./watcher.toml if present, else the built-ins)")
    _watch_args(w)
    _log_args(w)
    w.set_defaults(subparser=w)

    r = sub.add_parser("requeue", help="move quarantined files back into the inbox")
    r.add_argument("paths", nargs="*", metavar="PATH", help="quarantined files")
    r.add_argument("--all", action="store_true", help="every quarantined file")
    r.add_argument("--claims-of", metavar="INSTANCE", action="append", default=[],
                   help="move the claims of this (dead) daemon instance back into the inbox")
    r.add_argument("--stale-claims", action="store_true",
                   help="move back the claims of every instance whose heartbeat is older than "
                        "stale_claims_after")
    r.add_argument("-c", "--config", metavar="FILE", help="watcher.toml (for the folders)")
    _watch_args(r, folders_only=True)
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
                                            "settings (environment included)")
    c.add_argument("-c", "--config", metavar="FILE", help="watcher.toml to check")

    sub.add_parser("transforms", help="list the built-in transforms and their parameters")

    s = sub.add_parser("make-samples", help="write a set of sample images to try watcher on")
    s.add_argument("folder")
    s.add_argument("-n", "--count", type=_positive_int, default=12)
    return parser


WATCH_EPILOG = """Every option can also come from the config file's [watch] table or from an
environment variable WATCHER_<NAME> (e.g. WATCHER_INBOX, WATCHER_SETTLE, WATCHER_WORKERS,
WATCHER_PIPELINES=thumbnail,web); flags win over the environment, which wins over the file.
Signals: SIGTERM/SIGINT drain and exit 0 (a second one stops at once); SIGHUP reloads the config.
"""


def _watch_args(p: argparse.ArgumentParser, folders_only: bool = False) -> None:
    for name in ("inbox", "output", "archive", "quarantine", "work"):
        p.add_argument(f"--{name}", metavar="DIR")
    p.add_argument("--instance", metavar="NAME",
                   help="this daemon's name when several share one inbox ({host}: the host "
                        "name); it claims into WORK/NAME")
    if folders_only:
        return
    p.add_argument("--stale-claims-after", type=_positive_float, metavar="S",
                   help="claims of another instance whose heartbeat is older go back to the "
                        "inbox (default 600)")
    p.add_argument("-p", "--pipeline", action="append", default=[], metavar="NAME")
    p.add_argument("-j", "--workers", type=_positive_int)
    p.add_argument("--timeout", type=_positive_float, help="seconds one file may take")
    _executor_args(p)
    p.add_argument("--max-tasks-per-worker", type=int, metavar="N")
    p.add_argument("--observer", choices=["auto", "inotify", "polling"])
    p.add_argument("--poll-interval", type=_positive_float, metavar="S")
    p.add_argument("--settle", type=float, metavar="S",
                   help="a file unchanged this long is complete (polling, scans)")
    p.add_argument("--on-success", choices=["archive", "delete", "keep"])
    p.add_argument("--reconcile-interval", type=_positive_float, metavar="S")
    p.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-in-flight", type=int, metavar="N")
    p.add_argument("--retry-max", type=int, metavar="N",
                   help="tries after failures not the input's fault, then it is quarantined "
                        "as gave-up (default 10)")
    p.add_argument("--retry-max-age", type=_positive_float, metavar="S",
                   help="seconds after the first such failure to keep trying (default 3600)")
    p.add_argument("--pixel-limit", type=_positive_int)
    p.add_argument("--max-file-size", metavar="SIZE")
    p.add_argument("--max-worker-memory", metavar="SIZE",
                   help="memory one worker may use, e.g. 1GiB (default: auto, from the "
                        "machine's or the cgroup's memory and the worker count)")
    p.add_argument("--grace", type=float, metavar="S", help="drain time on SIGTERM")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve /metrics, /healthz, /readyz on this port (default: off)")
    p.add_argument("--metrics-host", metavar="ADDR", help="address to bind (default 127.0.0.1)")


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=config.EXECUTORS,
                   help="where tasks run: local worker processes (default), a Dask cluster "
                        "(dask, with --scheduler), or a Dask cluster started here (dask-local)")
    p.add_argument("--scheduler", metavar="ADDR",
                   help="the Dask scheduler, e.g. tcp://10.0.0.5:8786 (--executor dask)")


def watch_loader(args: argparse.Namespace) -> Any:
    """A function giving the effective settings: file, then WATCHER_*, then flags. Called again
    on SIGHUP."""
    def load() -> config.Settings:
        path = args.config or os.environ.get("WATCHER_CONFIG") or _config_path(None)
        s = config.load(path)
        s = config.from_environment(s, os.environ)
        flags = {k: (getattr(args, k), "--" + k.replace("_", "-"))
                 for k in config.WATCH_KEYS if getattr(args, k, None) is not None}
        s = replace(s, watch=config.watch_settings(s.watch, flags))
        over = {k: getattr(args, k, None) for k in ("workers", "timeout",
                                                    "max_tasks_per_worker", "pixel_limit",
                                                    "grace", "executor", "scheduler")}
        if getattr(args, "max_file_size", None):
            over["max_file_size"] = config.parse_size(args.max_file_size, "--max-file-size")
        if getattr(args, "max_worker_memory", None):
            over["max_worker_memory"] = config.worker_memory(args.max_worker_memory,
                                                             "--max-worker-memory")
        s = config.apply_overrides(s, **{k: v for k, v in over.items() if v is not None})
        if getattr(args, "pipeline", None):
            s.select(args.pipeline)  # names exist
            s = replace(s, use=tuple(args.pipeline))
        return s
    return load


def cmd_watch(args: argparse.Namespace) -> int:
    from watcher.watch.daemon import Daemon  # noqa: PLC0415

    fmt = log.resolve_format(args.log_format, sys.stdout)
    log.configure("daemon", fmt, args.log_level, stream=sys.stdout)
    return Daemon(watch_loader(args), log_format=fmt, log_level=args.log_level).run()


def cmd_health(args: argparse.Namespace) -> int:
    from watcher.ops import health  # noqa: PLC0415

    work = args.work
    if not work:
        args.inbox = args.output = args.archive = args.quarantine = None
        work = watch_loader(args)().watch.work
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
    s = watch_loader(args)()
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


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                   help="auto: JSON when stderr is not a terminal")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def _config_path(given: str | None) -> str | None:
    if given:
        return given
    return "watcher.toml" if os.path.isfile("watcher.toml") else None


def cmd_batch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    fmt = log.resolve_format(args.log_format)
    log.configure("main", fmt, args.log_level)
    settings = config.load(_config_path(args.config), workers=args.workers, timeout=args.timeout,
                           on_conflict=args.on_conflict, executor=args.executor,
                           scheduler=args.scheduler, max_worker_memory=None if
                           args.max_worker_memory is None else config.worker_memory(
                               args.max_worker_memory, "--max-worker-memory"))
    if args.ops and args.pipeline:
        parser.error("give --ops or --pipeline, not both")
    try:
        pipes = _pipelines(args, settings, parser)
    except ConfigError as exc:
        parser.error(str(exc))
    paths = [a for a in args.inputs if a != "-"]
    return _run_batch(args, settings, pipes, paths, fmt)


def _pipelines(args: argparse.Namespace, settings: config.Settings,
               parser: argparse.ArgumentParser) -> tuple[Any, ...]:
    if args.ops:
        steps = [config.parse_step(x, "--ops") for x in config.split_ops(args.ops)]
        if not steps:
            parser.error("--ops: no steps given")
        suffix = args.suffix or "-".join(s.name for s in steps)
        pipes: tuple[Any, ...] = (config.pipeline_from(steps, "ops", suffix),)
    else:
        pipes = settings.select(args.pipeline)
        if args.suffix:
            if len(pipes) > 1:
                parser.error("--suffix needs exactly one pipeline")
            pipes = (replace(pipes[0], suffix=args.suffix),)
    if args.format or args.quality is not None:
        if args.quality is not None and not 1 <= args.quality <= 100:
            parser.error(f"--quality: must be 1-100, got {args.quality}")
        changes = {k: v for k, v in (("format", args.format), ("quality", args.quality))
                   if v is not None}
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
    progress = sys.stderr.isatty() and not args.no_progress
    report = batch.run(found, args.out, pipes, settings, progress=progress, log_format=fmt,
                       log_level="warning", failures=missing)
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
    settings = config.from_environment(config.load(path), os.environ)
    doc = {
        "source": settings.source,
        "watch": asdict(settings.watch),
        "engine": asdict(settings.engine),
        "input": asdict(settings.limits),
        "output": {"pipelines": list(settings.use), "on_conflict": settings.on_conflict},
        "pipelines": {name: {"suffix": p.suffix,
                             "steps": [_step_text(s) for s in p.steps],
                             **asdict(p.output)} for name, p in settings.pipelines.items()},
    }
    print(json.dumps(doc, indent=2, default=list))
    print(f"config OK: {settings.source}", file=sys.stderr)
    return ExitCode.OK


def _step_text(step: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in step.params if v is not None)
    return f"{step.name}({args})" if args else step.name


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
        if args.command == "health":
            return cmd_health(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "transforms":
            return cmd_transforms()
        if args.command == "make-samples":
            from watcher.samples import make_samples  # noqa: PLC0415

            for path in make_samples(args.folder, args.count):
                print(path)
            return ExitCode.OK
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
