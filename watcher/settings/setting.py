"""One setting's declaration, and how a value for it is checked wherever it comes from.

A value comes from a TOML file or the Python API (typed: ``workers = 3``, ``recursive = true``)
or as text from a ``WATCHER_*`` variable or a flag (``"3"``, ``"yes"``). Both ways end in the
same checks, so a setting has one range and one set of messages, e.g.
``watcher.toml: engine.workers: must be >= 1, got 0`` or ``WATCHER_WORKERS: must be >= 1, got 0``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from watcher.errors import ConfigError

ENV_PREFIX = "WATCHER_"
# The kinds of value a setting takes (``kind``).
KINDS = ("int", "float", "bool", "str", "choice", "size", "list", "path")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}
_DERIVED = ""  # env/flag/attr left at this are derived from the name


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting: where it lives, what it takes, and its one line of help.

    ``section`` is its TOML table (``engine``, ``input``, ``output``, ``watch``) or ``pipeline``
    for an output option of a pipeline (``[defaults]``, ``[pipelines.NAME]``, ``output=`` of the
    API). The environment variable (``WATCHER_<NAME>``) and the flag (``--<name>``) are derived
    from the name unless given; ``None`` means there is none.
    """

    section: str
    name: str
    kind: str
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    attr: str = _DERIVED  # the field of the section's settings type (default: the name)
    env: str | None = _DERIVED
    flag: str | None = _DERIVED
    short: str = ""  # a one-letter flag too, e.g. "-j"
    commands: tuple[str, ...] = ()  # the subcommands taking the flag (default: by section)
    aliases: tuple[str, ...] = ()  # other names accepted in a file or the API ("color")
    allow_empty: bool = False  # a str or list may be empty
    metavar: str = ""
    default_doc: str = ""  # how the default reads in help and docs when not its value
    # A final check or normalisation of the typed value: (value, where) -> value.
    check: Callable[[Any, str], Any] | None = field(default=None, compare=False)
    # Replaces the kind's own parsing entirely: (raw value, where) -> value.
    parse_with: Callable[[Any, str], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError(f"{self.name}: choices go with kind 'choice'")
        derived = {"attr": self.attr or self.name,
                   "env": ENV_PREFIX + self.name.upper() if self.env == _DERIVED else self.env,
                   "flag": "--" + self.name.replace("_", "-") if self.flag == _DERIVED
                   else self.flag}
        for key, value in derived.items():
            object.__setattr__(self, key, value)

    @property
    def key(self) -> str:
        """``section.name``, as the reference and error messages name it."""
        return f"{self.section}.{self.name}"

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def parse(self, value: Any, where: str, *, text: bool = False,
              base: str | None = None) -> Any:
        """Check ``value`` (text from a variable or a flag if ``text``); ``where`` names it in
        the error. A relative ``path`` is taken from ``base`` (a config file's folder)."""
        if self.parse_with is not None:
            value = self.parse_with(value.strip() if text else value, where)
        else:
            value = _PARSERS[self.kind](self, value, where, text)
        if self.check is not None:
            value = self.check(value, where)
        if self.kind == "path" and base and value and not os.path.isabs(value):
            value = os.path.join(base, value)
        return value

    def describe(self) -> str:
        """The kind of value, for help and the reference: ``int 1-1024``, ``one of a, b``."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        bounds = ""
        if self.lo is not None and self.hi is not None:
            bounds = f" {_num(self.lo)}-{_num(self.hi)}"
        elif self.lo is not None:
            bounds = f" >= {_num(self.lo)}"
        return {"size": "size (bytes, or \"50 MB\", \"1.5 GiB\")",
                "list": "list of strings", "path": "folder"}.get(self.kind, self.kind) + bounds


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a 400-digit number is not worth quoting whole."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _number(s: Setting, value: Any, where: str, text: bool) -> Any:
    kind = int if s.kind == "int" else float
    if text:
        try:
            value = kind(value.strip())
        except ValueError:
            word = "a whole number" if kind is int else "a number"
            raise ConfigError(where, f"expected {word}, got {_short(value)}") from None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(where, "expected a finite number, got a number too large "
                                     "for a float") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(where, f"expected {kind.__name__}, got {type(value).__name__} "
                                 f"{_short(value)}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(where, f"expected a finite number, got {value!r}")
    if s.lo is not None and value < s.lo:
        raise ConfigError(where, f"must be >= {_num(s.lo)}, got {_short(value)}")
    if s.hi is not None and value > s.hi:
        raise ConfigError(where, f"must be <= {_num(s.hi)}, got {_short(value)}")
    return value


def _bool(s: Setting, value: Any, where: str, text: bool) -> bool:
    if text and isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ConfigError(where, f"expected true or false, got {value!r}")
    if not isinstance(value, bool):
        raise ConfigError(where, f"expected true or false, got {type(value).__name__} "
                                 f"{value!r}")
    return value


def _str(s: Setting, value: Any, where: str, text: bool) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"expected str, got {type(value).__name__} {value!r}")
    if s.kind == "choice":
        low = value.strip().lower()
        if low not in s.choices:
            raise ConfigError(where, f"expected one of {', '.join(s.choices)}, got {value!r}")
        return low
    if not s.allow_empty and not value.strip():
        raise ConfigError(where, "must not be empty")
    _text_ok(value, where)
    return value


def _text_ok(value: str, where: str) -> None:
    """No NUL (no path or name can hold one) and only UTF-8 (a variable's undecodable bytes)."""
    if "\x00" in value:
        raise ConfigError(where, f"must not contain a NUL character, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(where, f"not valid UTF-8: {value!r}") from None


def _list(s: Setting, value: Any, where: str, text: bool) -> tuple[str, ...]:
    if text and isinstance(value, str):  # "a, b"; "" is the empty list; ",a" an empty item
        value = [v.strip() for v in value.split(",")] if value.strip() else []
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):  # items are names: spaces around them are not part of them
        value = [v.strip() if isinstance(v, str) else v for v in value]
    if not isinstance(value, list):
        raise ConfigError(where, f"expected a list of strings, got {type(value).__name__} "
                                 f"{value!r}")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{where}[{i}]", f"expected a non-empty string, got {v!r}")
        _text_ok(v, f"{where}[{i}]")
    if not value and not s.allow_empty:
        raise ConfigError(where, "expected a non-empty list")
    return tuple(value)


def parse_size(value: Any, where: str) -> int:
    """Bytes from an int or a string like ``"200 MB"`` / ``"1GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(where, f"expected a size such as 50000000 or \"50 MB\", got {value!r}")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(size) or size >= 2 ** 63:
        raise ConfigError(where, f"too large a size: {_short(value)}")
    return int(size)


def _size(s: Setting, value: Any, where: str, text: bool) -> int:
    return parse_size(value.strip() if text and isinstance(value, str) else value, where)


_PARSERS: dict[str, Callable[[Setting, Any, str, bool], Any]] = {
    "int": _number, "float": _number, "bool": _bool, "str": _str, "choice": _str,
    "path": _str, "list": _list, "size": _size}


def did_you_mean(name: str, known: Iterable[str], listed: Iterable[str] | None = None) -> str:
    """`` (did you mean 'workers'?)`` for a near miss, else ``"; known: a, b, c"`` (``listed``,
    if given, is what that list shows: the close match may also be an alias)."""
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; known: " + ", ".join(sorted(set(known if listed is None else listed)))
