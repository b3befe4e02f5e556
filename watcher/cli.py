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
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from watcher import batch, batchlog, config, interrupt, log, transforms
from watcher.commandline import build_parser
from watcher.config import dump, flags
from watcher.engine.helpers import start_forkserver
from watcher.errors import REASONS, ConfigError, ExitCode, RejectedInput, WatcherError
from watcher.imaging import formats
from watcher.textsafe import visible

__all__ = ["build_parser", "main", "watch_loader"]


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


def cmd_status(args: argparse.Namespace) -> int:
    from watcher import statuscmd  # noqa: PLC0415

    s = watch_loader(args, "status")()
    work = args.work or s.watch.folders()["work"]
    return statuscmd.run(lambda: statuscmd.read(work, s.ops.status_token_file),
                         as_json=args.json, watch=args.watch, interval=args.interval)


def cmd_requeue(args: argparse.Namespace) -> int:
    from watcher.watch.lifecycle import Folders, recover_claims, requeue  # noqa: PLC0415

    claims = bool(args.claims_of or args.stale_claims)
    if claims and (args.paths or args.all):
        args.subparser.error("--claims-of/--stale-claims move claims; give them alone")
    if not claims and bool(args.paths) == bool(args.all):
        args.subparser.error("give quarantined PATHs, --all, --claims-of or --stale-claims")
    inbox, quarantine = getattr(args, "watch.inbox", None), getattr(args, "watch.quarantine", None)
    errors: list[tuple[str, str]] = []
    if not claims and inbox and quarantine and not args.config:
        # both folders named (the sidecar's retry command): nothing else is read, so it works
        # from any folder, whatever watcher.toml or WATCHER_* is there
        s = None
        moved = requeue(inbox, quarantine, None if args.all else list(args.paths), errors)
    else:
        s = watch_loader(args, "requeue")()
        folders = Folders(s.watch.folders(), work_root=s.watch.work)
        if claims:
            moved = recover_claims(folders, s.watch.stale_claims_after,
                                   only=args.claims_of or None)
        else:
            moved = requeue(folders.inbox, folders.quarantine,
                            None if args.all else list(args.paths), errors)
    for src, dest in moved:
        print(f"{visible(src)} -> {visible(dest)}")
    for path, why in errors:
        print(f"watcher: not requeued: {visible(path)}: {visible(why)}", file=sys.stderr)
    print(f"requeued {len(moved)} file(s)" + (f", {len(errors)} not" if errors else ""),
          file=sys.stderr)
    return ExitCode.SOME_FAILED if errors else ExitCode.OK


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

    bar = batchlog.progress_bar(args.count, sys.stderr.isatty(), unit="file")

    def written(path: str) -> None:
        if args.list:
            print(path)
        bar.update(1)
    try:
        print(samples.write_all(args.folder, args.count, written))
    except (OSError, RejectedInput) as exc:  # a file, a read-only folder, a full disk
        bar.close()
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, FileExistsError | NotADirectoryError):
            what = "a file stands where the folder should be"
        where = getattr(exc, "filename", None) or args.folder
        print(f"watcher make-samples: cannot write {visible(str(where))}: {visible(what)}",
              file=sys.stderr)
        return ExitCode.USAGE
    finally:
        bar.close()
    return ExitCode.OK


def _config_path(given: str | None) -> str | None:
    if given:
        return given
    return "watcher.toml" if os.path.isfile("watcher.toml") else None


def cmd_batch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    fmt = log.resolve_format(args.log_format)
    log.configure("main", fmt, args.log_level)
    settings = config.load(_config_path(args.config), final=False)
    if args.ops is not None and getattr(args, "output.pipelines", None):
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
    if args.ops is not None:
        steps = config.parse_ops(args.ops, "--ops")
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
    found: list[batch.Input] = []
    missing: list[batch.ItemReport] = []
    try:
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
        batch.expand(paths, found, missing)
        if args.dry_run:
            from watcher import dryrun  # noqa: PLC0415

            failing = dryrun.batch_plan(found, missing, args.out, pipes, settings, sys.stdout)
            return ExitCode.SOME_FAILED if failing else ExitCode.OK
        progress = sys.stderr.isatty() and not args.no_progress
        report = batch.run(found, args.out, pipes, settings, progress=progress, log_format=fmt,
                           log_level="warning", failures=missing, out_where="--out",
                           report_to=args.report or "")
    except KeyboardInterrupt:  # before the workers ran: expanding, planning, starting
        return interrupt.finish(args, found, missing)
    if args.report:
        batch.write_report(report, args.report)
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
    print("\nformats (read/write, library):")
    for f in formats.FORMATS:
        print(f"    {f.name}: {'read/write' if f.output else 'read'}, {f.library}")
    print("\nfailure reasons: " + ", ".join(REASONS))
    return ExitCode.OK


# commands whose output is a listing: a reader that goes away early (``| head``) ends them
# quietly, as it ends other Unix tools; the daemon, and a batch that processes, are not among them
_LISTINGS = frozenset({"transforms", "completion", "check-config", "quarantine", "health",
                       "status", "make-samples"})


def _lists(args: argparse.Namespace) -> bool:
    return args.command in _LISTINGS or (args.command in ("batch", "watch") and args.dry_run)


def _output_closed() -> int:
    """stdout's reader is gone (``watcher transforms | head -1``): end as ``ls | head`` does,
    killed by SIGPIPE, nothing said (what is still buffered goes to /dev/null)."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "watch" and not args.dry_run:
        start_forkserver()  # already running when started through watcher.launch
    try:
        code = _dispatch(args, parser)
        if _lists(args):
            sys.stdout.flush()  # a reader gone is found here, not in the flush at exit
        return code
    except KeyboardInterrupt:  # Ctrl-C before the command's own handling began
        return interrupt.finish(args)
    except BrokenPipeError:
        if _lists(args):
            return _output_closed()
        log.get("watcher.cli").exception("watcher.internal_error")
        return ExitCode.INTERNAL
    except ConfigError as exc:
        print(f"watcher: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except WatcherError as exc:
        print(f"watcher: error: {exc}", file=sys.stderr)
        return ExitCode.INTERNAL
    except Exception:  # noqa: BLE001 - a bug: log its traceback, exit with the documented code
        log.get("watcher.cli").exception("watcher.internal_error")
        return ExitCode.INTERNAL


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
    if args.command == "status":
        return cmd_status(args)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "transforms":
        return cmd_transforms()
    if args.command == "completion":
        from watcher.completion import script  # noqa: PLC0415

        sys.stdout.write(script(parser, args.shell))
        return ExitCode.OK
    if args.command == "make-samples":
        return cmd_make_samples(args)
    parser.error(f"unknown command {args.command!r}")
    return ExitCode.USAGE  # not reached: error() exits


if __name__ == "__main__":
    sys.exit(main())
