"""Reading one pipeline step from text (``--ops``, a step string in ``watcher.toml``) with
messages a person can act on.

A step is ``NAME``, ``NAME(ARG, ...)`` or ``package.module.function(ARG, ...)``; an ARG is a
value or ``KEY=VALUE``, a value a number, quoted text, ``true``/``false``/``none`` or a list of
values in ``[...]`` or ``(...)``. A mistake is refused with the user's own text, a caret under
the fault, what was expected there, and a hint where the likely intent is plain::

    --ops: cannot read step 'thumbnail(128 128)': expected ',' or ')' after an argument
        thumbnail(128 128)
                      ^
      arguments are separated by commas: thumbnail(128, 128)
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from watcher.errors import ConfigError
from watcher.textsafe import visible

SYNTAX = ("a step is NAME or NAME(ARG, ...), an ARG a number, 'text', true/false or KEY=VALUE,\n"
          "e.g. thumbnail(128, 128) or resize(width=800); steps are separated by ',' ';' or '|'")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[+-]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"[^\s,()\[\]=]+")  # a token as the user sees it, for messages
_SIZE = re.compile(r"(\d+)\s*[xX\u00d7*]\s*(\d+)")  # 128x128, or with the sign
_WORDS = {"true": True, "false": False, "none": None, "null": None}


@dataclass
class Call:
    """A step as read: its (dotted) name and its arguments."""

    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Fault(Exception):  # noqa: N818 - internal: becomes a ConfigError with the caret
    def __init__(self, pos: int, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.pos, self.message, self.hint = pos, message, hint


MAX_NESTING = 32  # lists in lists in a step's argument
NAME_SHOWN, LINE_SHOWN = 60, 100  # characters of a long step shown in a message


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0  # lists open at pos
        self.step = "NAME"  # the step's name, once read (for hints)

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self) -> str:
        m = _WORD.match(self.text, self.pos)
        return m.group(0) if m else self.text[self.pos:self.pos + 1]

    def name(self, what: str) -> str:
        self.ws()
        parts = []
        while True:
            m = _NAME.match(self.text, self.pos)
            if not m:
                raise _Fault(self.pos, f"expected {what}" if not parts else
                             "expected a name after '.'")
            parts.append(m.group(0))
            self.pos = m.end()
            if not self.text.startswith(".", self.pos):
                return ".".join(parts)
            self.pos += 1

    def call(self) -> Call:
        if self.peek() in ("(", "["):
            raise _Fault(self.pos, "a step starts with a transform name",
                         "e.g. thumbnail(128, 128); 'watcher transforms' lists the names")
        start = self.pos
        call = Call(self.name("a transform name, e.g. grayscale or thumbnail(128, 128)"))
        self.step = call.name
        nxt = self.peek()
        if nxt == "":
            return call
        if nxt != "(":
            m = _SIZE.match(self.text, self.pos)
            hint = (f"a size is two arguments: {call.name}({m.group(1)}, {m.group(2)})" if m
                    else f"arguments go in brackets after the name: {call.name}(...), and "
                         "steps are separated by ',' ';' or '|'")
            raise _Fault(self.pos, "expected '(' or the end of the step after "
                         f"{self.text[start:self.pos].strip()!r}", hint)
        self.pos += 1
        keyword_seen = False
        while self.peek() != ")":
            if self.peek() == "":
                raise _Fault(len(self.text), "missing ')' at the end of the arguments")
            at = self.pos
            key = self._key()
            value = self.value()
            if key is None:
                if keyword_seen:
                    raise _Fault(at, "a plain argument after a KEY=VALUE one",
                                 "give the plain ones first, or name this one too")
                call.args.append(value)
            else:
                if key in call.kwargs:
                    raise _Fault(at, f"{key} is given twice")
                keyword_seen = True
                call.kwargs[key] = value
            nxt = self.peek()
            if nxt == ",":
                self.pos += 1
            elif nxt != ")":
                if nxt == "":
                    raise _Fault(len(self.text), "missing ')' at the end of the arguments")
                raise _Fault(self.pos, "expected ',' or ')' after an argument",
                             "arguments are separated by commas: "
                             f"{call.name}(128, 128) or {call.name}(width=128)")
        self.pos += 1
        if self.peek():
            raise _Fault(self.pos, "unexpected text after the step's ')'",
                         "steps are separated by ',' ';' or '|'")
        return call

    def _key(self) -> str | None:
        """``KEY`` of ``KEY=VALUE`` (consumed with its '='), else None (nothing consumed)."""
        self.ws()
        m = _NAME.match(self.text, self.pos)
        if not m:
            return None
        j = m.end()
        while j < len(self.text) and self.text[j].isspace():
            j += 1
        if self.text.startswith("=", j) and not self.text.startswith("==", j):
            self.pos = j + 1
            return m.group(0)
        if self.text.startswith(":", j):
            raise _Fault(j, "expected '=' after a parameter name",
                         f"a parameter is given as {m.group(0)}=VALUE")
        return None

    def value(self) -> Any:
        ch = self.peek()
        at = self.pos
        if ch in ("'", '"'):
            return self._text(ch)
        if ch in ("[", "("):
            close = "]" if ch == "[" else ")"
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise _Fault(at, f"lists nested more than {MAX_NESTING} deep")
            self.pos += 1
            items = []
            while self.peek() != close:
                if self.peek() == "":
                    raise _Fault(len(self.text), f"missing {close!r} at the end of the list")
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                elif self.peek() != close:
                    raise _Fault(self.pos, f"expected ',' or {close!r} in a list")
            self.pos += 1
            self.depth -= 1
            return items if ch == "[" else tuple(items)
        m = _NUMBER.match(self.text, self.pos)
        if m:
            end = m.end()
            if end < len(self.text) and (self.text[end].isalnum() or self.text[end] in "._"):
                word = self.word()
                sized = _SIZE.fullmatch(word)
                raise _Fault(at, f"{word!r} is not a number",
                             f"a size is two arguments: {self.step}({sized.group(1)}, "
                             f"{sized.group(2)})" if sized else "")
            self.pos = end
            token = m.group(0)
            return float(token) if any(c in token for c in ".eE") else int(token)
        m = _NAME.match(self.text, self.pos)
        if m and m.group(0).lower() in _WORDS:
            self.pos = m.end()
            return _WORDS[m.group(0).lower()]
        if ch == "":
            raise _Fault(len(self.text), "expected a value, found the end of the step")
        if ch in ",)]":
            raise _Fault(at, "expected a value (a number, 'text', true or false)")
        word = self.word()
        raise _Fault(at, f"expected a value (a number, 'text', true or false), got {word!r}",
                     f"text goes in quotes: '{word}'" if m else "")

    def _text(self, quote: str) -> str:
        start = self.pos
        i = start + 1
        while i < len(self.text):
            if self.text[i] == "\\":
                i += 2
                continue
            if self.text[i] == quote:
                self.pos = i + 1
                try:
                    value = ast.literal_eval(self.text[start:i + 1])
                except (ValueError, SyntaxError) as exc:
                    raise _Fault(start, f"not valid quoted text: {exc}") from None
                return str(value)
            i += 1
        raise _Fault(start, f"text that starts with {quote} must end with {quote}")


def read_step(text: str, where: str, source: str | None = None, offset: int = 0) -> Call:
    """Read one step. ``source``: the whole text it was cut from (an ``--ops`` string), with
    the step at ``offset``; the caret is placed in it, so the user sees their own line."""
    try:
        return _Reader(text).call()
    except _Fault as fault:
        raise ConfigError(where, explain(text, fault.pos, fault.message, fault.hint,
                                         source, offset)) from None


def explain(step: str, pos: int, message: str, hint: str = "", source: str | None = None,
            offset: int = 0) -> str:
    """``cannot read step ...: message``, the user's line with a caret under ``pos``, a hint,
    and the syntax in one line. A long step is cut: its first ``NAME_SHOWN`` characters in the
    message, ``LINE_SHOWN`` around the fault on the caret's line; control characters in it are
    shown as escapes (``watcher.textsafe.visible``)."""
    line, col = (source, offset + pos) if source is not None else (step, pos)
    line = line.replace("\t", " ").replace("\n", " ")
    start = max(0, min(col - LINE_SHOWN // 2, len(line) - LINE_SHOWN))
    end = start + LINE_SHOWN
    head = ("…" if start else "") + visible(line[start:col])
    shown = head + visible(line[col:end]) + ("…" if end < len(line) else "")
    name = step.strip()
    name = name if len(name) <= NAME_SHOWN else name[:NAME_SHOWN - 1] + "…"
    lines = [f"cannot read step {name!r}: {message}", f"    {shown}",
             "    " + " " * len(head) + "^"]
    if hint:
        lines.append(f"  {visible(hint[:2 * LINE_SHOWN])}")
    lines += [f"  {part}" for part in SYNTAX.splitlines()]
    return "\n".join(lines)
