"""The command line's setting flags, made from the schema: one flag per setting, on the
subcommands its section belongs to, checked by the setting's own rules (a bad value is a usage
error naming the flag, e.g. ``argument --max-tasks-per-worker: must be >= 0, got -1``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from watcher.config.loader import Settings, Value, apply
from watcher.errors import ConfigError
from watcher.settings import schema
from watcher.settings.setting import Setting


def dest(s: Setting) -> str:
    return f"{s.section}.{s.name}"


def for_command(command: str, section: str | None = None) -> list[Setting]:
    return [s for s in schema.SETTINGS if s.flag and (section is None or s.section == section)
            and command in (s.commands or schema.COMMANDS[s.section])]


def _checker(s: Setting) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            s.parse(text, s.flag or s.name, text=True)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
        return text

    check.__name__ = s.name
    return check


def _choice(text: str) -> str:
    """A choice as every other surface reads one: case and surrounding spaces ignored."""
    return text.strip().lower()


def help_text(s: Setting, command: str) -> str:
    default = s.default_doc or s.default_value()
    if isinstance(default, tuple):
        default = ",".join(default)
    extra = f" (default: {default})" if default not in ("", None) else ""
    env = f" [{s.env}]" if s.env and command in schema.READS_ENVIRONMENT else ""
    return f"{s.help}{extra}{env}".replace("%", "%%")


def add(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of every setting ``command`` takes, grouped by section."""
    for section in schema.SECTIONS:
        settings = for_command(command, section)
        if not settings:
            continue
        title = "output options (override the pipelines')" if section == "pipeline" \
            else f"[{section}] settings"
        group = parser.add_argument_group(title)
        for s in settings:
            assert s.flag is not None
            names = [s.short, s.flag] if s.short else [s.flag]
            kw: dict[str, Any] = {"dest": dest(s), "default": None, "help": help_text(s, command)}
            if s.kind == "bool":
                kw["action"] = argparse.BooleanOptionalAction
            elif s.kind == "list":
                kw.update(action="append", metavar=s.metavar or "X")
            elif s.kind == "choice":
                kw.update(type=_choice, choices=s.choices)
            else:
                kw.update(type=_checker(s), metavar=s.metavar or s.kind.upper())
            group.add_argument(*names, **kw)


def given(args: argparse.Namespace, command: str, section: str | None = None) -> list[Value]:
    """The setting flags given on the command line, as a layer of values."""
    out: list[Value] = []
    for s in for_command(command, section):
        raw = getattr(args, dest(s), None)
        if raw is None:
            continue
        if isinstance(raw, list):  # a repeatable list flag; each may hold a,b
            raw = ",".join(raw)
        out.append((s, raw, s.flag or s.name, not isinstance(raw, bool)))
    return out


def apply_flags(s: Settings, args: argparse.Namespace, command: str) -> Settings:
    values = [v for v in given(args, command) if v[0].section != "pipeline"]
    return apply(s, values, lambda x: x.flag or x.key)


def output_options(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The output-option flags given (``--format``, ``--quality``, ...), checked."""
    return {s.attr: s.parse(raw, where, text=text)
            for s, raw, where, text in given(args, command, "pipeline")}
