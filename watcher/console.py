"""The console renderer (``--log-format console``): one short line per event, for a person.

JSON lines keep every field; a console line keeps what a person scans for::

    14:02:03 INFO  file.processed   IMG_0001.jpg -> IMG_0001_{thumbnail,web}.jpg  41 ms
    14:02:03 ERROR file.quarantined broken.jpg  truncated: Truncated File Read
    14:02:04 WARN  worker.died       worker_pid=4711 exitcode=-9 held=big.tif

- the local time of day, the level, the event;
- on a file's line: the input (as given in a batch, relative to the inbox in the daemon), its
  outputs relative to the output folder (``a_{thumbnail,web}.jpg`` stands for
  ``a_thumbnail.jpg`` and ``a_web.jpg``; ``…_{thumbnail,web}.jpg`` where the input's name
  would make the line wider than the terminal), its outcome (reason and error), the time it
  took;
- on a summary line (``batch.finished``, ``daemon.started``, ``daemon.stopped``) only the fields
  a person scans: counts, a batch's time and rate (its ``why`` below the line);
- then the event's other fields as ``key=value``, leaving out what a person does not scan for:
  the process role, and on a file's line its claim token, sequence number, worker pid and slot,
  byte counts, where it was moved. A path below the current folder is shown relative to it, a
  claim's work path in an error as the input's name. An error that starts with the input's
  name is shown without it; one that would make the line wider than the terminal is cut
  (``…``), widths measured in columns (East Asian wide characters two); a traceback in
  ``warnings`` is its last line.

Every value shown (a file's name, an error, any field, the lines of a traceback) goes through
``watcher.textsafe.visible``: a control character or escape sequence in a file's name is shown
as ``\\x1b[2J``, a newline as ``\\n``, never acted on, so a name can neither clear the screen, set
the window title nor forge a line.

Colour only where the descriptor is a terminal, never when ``NO_COLOR`` is set to anything but
the empty string (https://no-color.org), nor on ``TERM=dumb``.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from watcher.textsafe import visible

_RESET, _DIM, _BOLD = "\x1b[0m", "\x1b[2m", "\x1b[1m"
_RED, _GREEN, _YELLOW, _CYAN = "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m"
_LEVELS = {"debug": ("DEBUG", _DIM), "info": ("INFO", _GREEN), "warning": ("WARN", _YELLOW),
           "error": ("ERROR", _RED), "critical": ("CRIT", _RED + _BOLD)}
EVENT_WIDTH = 16  # "file.quarantined"

_ALWAYS_HIDDEN = frozenset({"event", "level", "timestamp", "role"})
# on a file's line (one with an input): bookkeeping that stays in the JSON lines
_FILE_HIDDEN = frozenset({"claim", "seq", "worker_pid", "slot", "input_bytes", "output_bytes",
                          "on_success", "moved_to", "quarantined_as", "error_type"})
# on a summary line, the fields a person scans (a count of 0 left out but for _ZERO_SHOWN);
# the rest (pids, the other folders, settings echoed back) stays in the JSON lines
_SCANNED = {
    "batch.finished": ("inputs", "succeeded", "failed", "skipped", "cancelled", "interrupted"),
    "daemon.started": ("inbox", "output", "workers", "pipelines", "backlog", "recovered_claims"),
    "daemon.stopped": ("processed", "quarantined", "retried", "gave_up", "skipped",
                       "reconcile_found", "overflows", "left_in_work", "left_in_inbox"),
}
_ZERO_SHOWN = frozenset({"inputs", "succeeded", "failed", "processed", "quarantined"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_JSON_LEFT = re.compile("[\x7f-\x9f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_BLOCKS = ("exception", "traceback")  # multi-line fields: printed below the line
_SEPARATORS = "_-./ "

_output_folder: list[str] = []  # the output folder outputs are shown relative to


def set_output_folder(folder: str | None) -> None:
    """Show outputs relative to ``folder`` from now on (None: relative to the current folder)."""
    _output_folder[:] = [os.path.abspath(folder)] if folder else []


def colour_wanted(fd: int, env: Mapping[str, str] | None = None) -> bool:
    """Whether lines written to ``fd`` get colour: a terminal, and no ``NO_COLOR`` (any value
    but empty) nor ``TERM=dumb`` in the environment."""
    env = os.environ if env is None else env
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    try:
        return os.isatty(fd)
    except OSError:
        return False


class Renderer:
    """structlog's last processor in console mode: the event dict -> one short line.

    ``fd``: the descriptor the lines go to; on a terminal, a file's line that would be wider than
    it (else than ``WIDTH``) names its outputs without repeating the input's name: ``IMG_0001.jpg
    -> holiday/…_{thumbnail,web}.jpg``. On a terminal each line starts at the row's first
    column (a carriage return first): the ``^C`` a terminal echoes is written over, not glued
    to the line that follows."""

    WIDTH = 120

    def __init__(self, colour: bool, fd: int = -1) -> None:
        self._colour = colour
        self._fd = fd
        try:
            self._start = "\r" if fd >= 0 and os.isatty(fd) else ""
        except OSError:
            self._start = ""

    def __call__(self, logger: Any, method: str, ev: dict[str, Any]) -> str:
        if isinstance(ev.get("warnings"), list | tuple):  # a traceback: its last line only,
            error = str(ev.get("error") or "")            # and none the error says already
            shown = [w for w in (_last_line(str(x)) for x in ev["warnings"])
                     if w and w not in error]
            ev = {**ev, "warnings": shown or None}
        line = self._line(ev, method, short=False)
        columns = self._columns()
        if "outputs" in ev and width(_ANSI.sub("", line)) > columns:
            line = self._line(ev, method, short=True)
        over = width(_ANSI.sub("", line)) - columns
        if over > 0 and "input" in ev and ev.get("error"):  # the error cut to fit (JSON: whole)
            line = self._line(ev, method, short=True, cut=over)
        blocks = ["\n".join(visible(x) for x in str(ev[k]).rstrip("\n").split("\n"))
                  for k in _BLOCKS if ev.get(k)]
        if ev.get("event") in _SCANNED and ev.get("why"):  # the explanation, below the line
            blocks.append(textwrap.fill(visible(str(ev["why"])), self._columns(),
                                        initial_indent="  ", subsequent_indent="  "))
        return self._start + "\n".join([line, *blocks])

    def _line(self, ev: dict[str, Any], method: str, *, short: bool, cut: int = 0) -> str:
        level = str(ev.get("level", method))
        tag, tint = _LEVELS.get(level, (level.upper()[:5], ""))
        event = visible(str(ev.get("event", "")))
        parts = [self._c(_DIM, _clock(ev.get("timestamp"))), self._c(tint, f"{tag:<5}"),
                 self._c(_BOLD, f"{event:<{EVENT_WIDTH}}")]
        hidden = set(_ALWAYS_HIDDEN) | set(_BLOCKS)
        if "input" in ev:
            parts.append(self._file_part(ev, hidden, short, cut))
        if event in _SCANNED:
            return " ".join(p for p in parts if p) + "  " + self._summary(ev, _SCANNED[event])
        fields = [f"{self._c(_DIM, visible(str(k)) + '=')}{_value(k, v)}" for k, v in ev.items()
                  if k not in hidden and v is not None]
        line = " ".join(p for p in parts if p)
        if fields:
            line += "  " + " ".join(fields)
        return line

    def _summary(self, ev: dict[str, Any], keys: tuple[str, ...]) -> str:
        """A summary line's scanned fields, then a batch's time and rate."""
        fields = [f"{self._c(_DIM, k + '=')}{_value(k, ev[k])}" for k in keys
                  if ev.get(k) is not None and (ev[k] != 0 or k in _ZERO_SHOWN)]
        text = " ".join(fields)
        if isinstance(ev.get("wall_time_s"), int | float):
            text += "  " + self._c(_DIM, f"{float(ev['wall_time_s']):.2f} s")
        if isinstance(ev.get("images_per_s"), int | float):
            text += "  " + self._c(_DIM, f"{float(ev['images_per_s']):.1f} images/s")
        return text

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self._fd).columns or self.WIDTH
        except OSError:  # not a terminal
            return self.WIDTH

    def _file_part(self, ev: dict[str, Any], hidden: set[str], short: bool, cut: int = 0
                   ) -> str:
        """input [-> outputs]  [reason: error]  [N ms]: the fields a file's line leads with;
        ``cut``: the columns to take off the error's end (``…`` where they were)."""
        hidden.update(_FILE_HIDDEN, ("input", "outputs", "reason", "error", "duration_ms"))
        if ev.get("attempt") == 1:
            hidden.add("attempt")
        text = visible(_shorten(str(ev["input"])))
        outputs = ev.get("outputs")
        if isinstance(outputs, list | tuple) and outputs:
            shown = [_output_path(str(o)) for o in outputs]
            if short:
                shown = _without_stem(shown, str(ev["input"]))
            text += " -> " + self._c(_CYAN, visible(brace(shown)))
        elif outputs not in (None, [], ()):
            hidden.discard("outputs")
        reason, error = ev.get("reason"), ev.get("error")
        if error:
            error = _shorten(_unclaim(str(error), ev.get("claim"), str(ev["input"])))
            error = _without_input(error, str(ev["input"]))
        outcome = visible(": ".join(str(x) for x in (reason, error) if x))
        if cut and error:
            outcome = _cut(outcome, max(len(str(reason or "")) + 4, width(outcome) - cut - 1))
        if outcome:
            tint = _RED if ev.get("level") == "error" else _YELLOW
            text += "  " + self._c(tint, outcome)
        if isinstance(ev.get("duration_ms"), int | float):
            text += "  " + self._c(_DIM, _ms(float(ev["duration_ms"])))
        return text

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self._colour and code else text


def brace(paths: list[str]) -> str:
    """Several paths in one: ``a_{thumbnail,web}.jpg`` for ``a_thumbnail.jpg, a_web.jpg``
    (the common start cut after a separator, the common end at a dot)."""
    if len(paths) < 2:
        return ", ".join(paths)
    head = _common_start(paths)
    cut = max(head.rfind(c) for c in _SEPARATORS) + 1
    head = head[:cut]
    rests = [p[len(head):] for p in paths]
    tail = _common_start([r[::-1] for r in rests])[::-1]
    tail = tail[tail.find("."):] if "." in tail else ""
    middles = [r[:len(r) - len(tail)] for r in rests]
    if not (head or tail) or not all(middles) or any(c in m for m in middles for c in "{},"):
        return ", ".join(paths)
    return f"{head}{{{','.join(middles)}}}{tail}"


def _without_stem(outputs: list[str], input_path: str) -> list[str]:
    """Outputs whose names start with the input's name, that name written ``…``."""
    stem = os.path.splitext(os.path.basename(input_path))[0]
    out = []
    for path in outputs:
        folder, name = os.path.split(path)
        if not stem or not name.startswith(stem):
            return outputs
        out.append(os.path.join(folder, "…" + name[len(stem):]))
    return out


def _common_start(texts: list[str]) -> str:
    """The longest start all ``texts`` share, character by character."""
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def width(text: str) -> int:
    """The columns ``text`` takes on a terminal: East Asian wide and full-width characters take
    two, combining marks none."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _without_input(error: str, name: str) -> str:
    """An error that starts by naming the input (``in/a.jpg: image file is truncated``) without
    that name: the line shows it already."""
    for shown in {name, _shorten(name), os.path.abspath(name)}:
        if shown and error.startswith(shown + ": "):
            return error[len(shown) + 2:]
    return error


def _cut(text: str, columns: int) -> str:
    """``text`` in at most ``columns`` columns and a ``…``."""
    out, used = [], 0
    for ch in text:
        used += width(ch)
        if used > columns:
            return "".join(out) + "…"
        out.append(ch)
    return text


def _last_line(text: str) -> str:
    """A traceback's (or any several-line text's) last line: the exception and its message."""
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else ""


def _clock(stamp: Any) -> str:
    try:
        when = datetime.fromisoformat(str(stamp)).astimezone()
    except ValueError:
        when = datetime.now().astimezone()
    return when.strftime("%H:%M:%S")


def _ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def _output_path(path: str) -> str:
    if _output_folder:
        full = os.path.abspath(path)
        root = _output_folder[0]
        if full.startswith(root + os.sep):
            return full[len(root) + 1:]
    return _shorten(path)


def _shorten(text: str) -> str:
    """Paths below the current folder, relative to it (in a path or in a message)."""
    try:
        cwd = os.getcwd()
    except OSError:
        return text
    if cwd == os.sep:
        return text
    return text.replace(cwd + os.sep, "")


def _unclaim(error: str, claim: Any, name: str) -> str:
    """A daemon's error names the claim's file in the work folder: name the input instead."""
    if not claim:
        return error
    return re.sub(r"[^\s'\"]*" + re.escape(os.sep + str(claim)), lambda _: name, error)


def _value(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return ",".join(_value(key, x) for x in v) if v else "[]"
    if isinstance(v, dict):  # JSON escapes C0 controls; DEL, C1 and the like remain
        return _JSON_LEFT.sub(lambda m: visible(m.group()),
                              json.dumps(v, ensure_ascii=False, default=str))
    if isinstance(v, float):
        return f"{v:g}"
    text = visible(_shorten(str(v)) if isinstance(v, str) else str(v))
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace('"', '\\"') + '"'
    return text
