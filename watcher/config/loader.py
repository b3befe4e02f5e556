"""The effective settings: built-ins, then ``watcher.toml``, then ``WATCHER_*``, then flags or
keywords, each layer checked against the one schema (``watcher.settings.schema``).

Every mistake is refused at load with the file, pipeline, step and key named, e.g.
``watcher.toml: pipelines.web.steps[1][resize].width: expected int, got str '800px'``,
``WATCHER_WORKERS: must be >= 1, got 0`` or ``--max-tasks-per-worker: must be >= 0, got -1``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from watcher.config.steps import (
    builtin_pipelines,
    check_suffix,
    make_step,
    parse_step,
    split_ops,
)
from watcher.errors import ConfigError
from watcher.imaging.pipeline import Pipeline, Step
from watcher.settings import schema
from watcher.settings.schema import (
    DecodeLimits,
    EngineSettings,
    NotifySettings,
    OpsSettings,
    OutputOptions,
    OutputSettings,
    WatchSettings,
)
from watcher.settings.setting import ENV_PREFIX, Setting, did_you_mean

# The attribute of ``Settings`` each section's values live in.
_FIELD = {"engine": "engine", "input": "limits", "output": "output", "watch": "watch",
          "notify": "notify", "ops": "ops"}
_TABLES = ("pipelines", "defaults", *_FIELD)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a run needs: pipelines by name and one value per section setting."""

    pipelines: Mapping[str, Pipeline]
    engine: Any = field(default_factory=EngineSettings)
    limits: Any = field(default_factory=DecodeLimits)
    output: Any = field(default_factory=OutputSettings)
    watch: Any = field(default_factory=WatchSettings)
    notify: Any = field(default_factory=NotifySettings)
    ops: Any = field(default_factory=OpsSettings)
    source: str = "<built-in>"
    # For each key set, how the layer that set it names a setting (for a broken rule).
    chosen_by: Mapping[str, Callable[[Setting], str]] = field(
        default_factory=dict, compare=False, repr=False)

    @property
    def use(self) -> tuple[str, ...]:
        """The pipelines applied when none is named ([output] pipelines)."""
        return self.output.use

    @property
    def on_conflict(self) -> str:
        return self.output.on_conflict

    def select(self, names: Sequence[str]) -> tuple[Pipeline, ...]:
        out = []
        for name in names or self.use:
            if name not in self.pipelines:
                raise ConfigError(f"pipeline {name!r}", "no such pipeline; defined: "
                                  + ", ".join(sorted(self.pipelines)))
            out.append(self.pipelines[name])
        return tuple(out)


def default_settings() -> Settings:
    return Settings(pipelines=MappingProxyType(builtin_pipelines()))


# One layer of values: (setting, raw value, where it came from, given as text?).
Value = tuple[Setting, Any, str, bool]


def apply(s: Settings, values: Iterable[Value], label: Callable[[Setting], str],
          base: str | None = None, *, final: bool = True) -> Settings:
    """``s`` with one layer of values checked and applied. ``label`` names a setting the way
    this layer does; with ``final`` (no layer follows) the rules between settings are checked."""
    values = list(values)
    given = {v[0].key for v in values}
    changes: dict[str, dict[str, Any]] = {}
    for setting, raw, where, text in values:
        if setting.section == "pipeline":
            raise ConfigError(where, "an output option goes in [defaults] or a pipeline")
        value = setting.parse(raw, where, text=text, base=base)
        changes.setdefault(setting.section, {})[setting.attr] = value
    engine = changes.get("engine", {})
    if engine.get("scheduler") and "engine.executor" not in given and \
            s.engine.executor == "local":
        engine["executor"] = "dask"  # a scheduler given alone implies executor dask
        given.add("engine.executor")
    ops = changes.get("ops", {})
    if "status_port" in ops and "ops.status_page" not in given:
        ops["status_page"] = True  # a port given alone turns the page on
        given.add("ops.status_page")
    out: dict[str, Any] = {_FIELD[section]: replace(getattr(s, _FIELD[section]), **attrs)
                           for section, attrs in changes.items()}
    s = replace(s, **out, chosen_by={**s.chosen_by, **dict.fromkeys(given, label)})
    if "use" in changes.get("output", {}):
        _check_use(s, next(v for v in values if v[0].attr == "use"))
    if final:
        check_rules(s, label)
    return s


def check_rules(s: Settings, label: Callable[[Setting], str]) -> None:
    """The rules between settings (``schema.RULES``) on the effective settings: a broken one is
    refused naming the key at fault as the layer that made the choice names it."""
    for section, key, by, rule in schema.RULES:
        message = rule(getattr(s, _FIELD[section]))
        if message:
            at = schema.by_name(section)[key]
            raise ConfigError(s.chosen_by.get(f"{section}.{by}", label)(at), message)


def _check_use(s: Settings, value: Value) -> None:
    _setting, _raw, where, text = value
    for i, name in enumerate(s.use):
        if name in s.use[:i]:
            raise ConfigError(where if text else f"{where}[{i}]",
                              f"pipeline {name!r} is named twice")
        if name not in s.pipelines:
            at = where if text else f"{where}[{i}]"
            raise ConfigError(at, f"no such pipeline {name!r}; defined: "
                              + ", ".join(sorted(s.pipelines)))


def _lookup(section: str, key: str, where: str) -> Setting:
    known = schema.by_name(section)
    if key not in known:
        raise ConfigError(where, "unknown key" + did_you_mean(key, known))
    return known[key]


# --- watcher.toml -------------------------------------------------------------------------------

def load(path: str | os.PathLike[str] | None, *, final: bool = True,
         **overrides: Any) -> Settings:
    """Settings from a TOML file (or the built-ins), with keyword overrides applied last;
    ``final=False`` when more layers (environment, flags) follow."""
    settings = default_settings() if path is None else parse(_read(str(path)), str(path),
                                                             final=False)
    return apply_overrides(settings, final=final, **overrides)


MAX_NESTING = 100  # arrays and inline tables in a config file (tomllib recurses on each)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
        line = _too_deep(text)
        if line:
            raise ConfigError(path, f"line {line}: arrays or inline tables nested more than "
                                    f"{MAX_NESTING} deep")
        return tomllib.loads(text)
    except FileNotFoundError as exc:
        raise ConfigError(path, "config file not found") from exc
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # an int of 4300+ digits, not UTF-8
        raise ConfigError(path, f"not valid TOML: {exc}") from exc
    except RecursionError as exc:  # what the scan below did not foresee
        raise ConfigError(path, "not valid TOML: nested too deeply") from exc
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from exc


def _too_deep(text: str) -> int:
    """The line on which arrays and inline tables nest deeper than ``MAX_NESTING`` (0: none),
    brackets in strings and comments not counted."""
    depth, line, i, n = 0, 1, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "#":
            i = text.find("\n", i)
            if i < 0:
                return 0
            continue
        elif ch in "\"'":
            quote = text[i:i + 3] if text.startswith(ch * 3, i) else ch
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                j += 2 if text[j] == "\\" and ch == '"' else 1
            line += text.count("\n", i, j)
            i = j + len(quote)
            continue
        elif ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return line
        elif ch in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return 0


def parse(doc: Mapping[str, Any], name: str = "watcher.toml", *, final: bool = True) -> Settings:
    def where(key: str) -> str:
        return f"{name}: {key}"

    for key in doc:
        if key not in _TABLES:
            raise ConfigError(where(key), "unknown table" + did_you_mean(key, _TABLES))
    defaults = output_options(_table(doc, "defaults", where), where("defaults"))
    pipelines = builtin_pipelines()
    for pname, ptable in _table(doc, "pipelines", where).items():
        if not re.fullmatch(r"[A-Za-z0-9_][\w.-]*", pname):
            raise ConfigError(where(f"pipelines.{pname}"), "pipeline names are letters, digits, "
                                                           "'_', '-' and '.'")
        pipelines[pname] = _pipeline(pname, ptable, where(f"pipelines.{pname}"), defaults)
    s = Settings(pipelines=MappingProxyType(pipelines), source=name)
    base = os.path.dirname(os.path.abspath(name)) if os.path.isfile(name) else None
    values: list[Value] = []
    for section in _FIELD:
        for key, raw in _table(doc, section, where).items():
            at = where(f"{section}.{key}")
            values.append((_lookup(section, key, at), raw, at, False))
    return apply(s, values, lambda x: where(x.key), base, final=final)


def _table(doc: Mapping[str, Any], key: str, where: Callable[[str], str]) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(where(key), "expected a table")
    return value


def output_options(table: Mapping[str, Any], where: str,
                   base: OutputOptions | None = None, also: Sequence[str] = ()) -> OutputOptions:
    """A pipeline's output options from a table ([defaults], a pipeline, ``output=``); an
    unknown key is refused (``where.key``)."""
    values: dict[str, Any] = {}
    known = schema.by_name("pipeline")
    for key, value in table.items():
        w = f"{where} {key}" if where.endswith(":") else f"{where}.{key}"
        if key not in known:
            raise ConfigError(w, "unknown output option" + did_you_mean(key, [*known, *also]))
        setting = known[key]
        if setting.attr in values:
            raise ConfigError(w, f"{setting.attr} is given twice (as {setting.attr} and as "
                                 "an alias)")
        values[setting.attr] = setting.parse(value, w)
    return replace(base or OutputOptions(), **values)


def _pipeline(name: str, table: Any, where: str, defaults: OutputOptions) -> Pipeline:
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a table")
    raw = table.get("steps")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.steps", "expected a non-empty list of steps")
    steps: list[Step] = []
    for i, item in enumerate(raw):
        w = f"{where}.steps[{i}]"
        if isinstance(item, str):
            parts = split_ops(item)
            if len(parts) != 1:
                raise ConfigError(w, f"one step per list item, got {item!r}")
            steps.append(parse_step(parts[0], w))
        elif isinstance(item, dict):
            op = item.get("op")
            if not isinstance(op, str):
                raise ConfigError(f"{w}.op", "each step table needs op = \"name\"")
            steps.append(make_step(op, (), {k: v for k, v in item.items() if k != "op"}, w))
        else:
            raise ConfigError(w, f"expected a string or a table, got {type(item).__name__}")
    suffix = check_suffix(table.get("suffix", name), f"{where}.suffix")
    options = {k: v for k, v in table.items() if k not in ("steps", "suffix")}
    return Pipeline(name=name, steps=tuple(steps), suffix=suffix,
                    output=output_options(options, where, defaults, ("steps", "suffix")))


# --- WATCHER_* and keywords ---------------------------------------------------------------------

def from_environment(s: Settings, env: Mapping[str, str], *, final: bool = True) -> Settings:
    """Apply the WATCHER_* variables (for containers); an unknown WATCHER_* name is refused."""
    by_env = {x.env: x for x in schema.SETTINGS if x.env}
    values: list[Value] = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in schema.OTHER_ENV or \
                var.startswith(schema.OTHER_ENV_PREFIXES):
            continue
        if var not in by_env:
            raise ConfigError(var, "no such setting" + did_you_mean(var, [*by_env,
                                                                           *schema.OTHER_ENV]))
        values.append((by_env[var], env[var], var, True))
    return apply(s, values, lambda x: x.env or x.key, final=final)


API_SECTIONS = ("engine", "input", "output")


def overridable(name: str) -> Setting:
    """The setting a keyword of ``load``/``process_images`` names (an [engine], [input] or
    [output] key)."""
    known = {x.name: x for x in schema.SETTINGS if x.section in API_SECTIONS}
    if name not in known:
        raise ConfigError(name, "unknown setting" + did_you_mean(name, known))
    return known[name]


def apply_overrides(s: Settings, *, final: bool = True, **overrides: Any) -> Settings:
    """Keyword values (the API's); ``None`` means not given."""
    values = [(overridable(k), v, k, False) for k, v in overrides.items() if v is not None]
    return apply(s, values, lambda x: x.name, final=final)
