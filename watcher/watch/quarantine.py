"""The quarantine as an operator reads it: each quarantined file with the reason, error and times
its sidecar (``<name>.error.json``) gives, for ``watcher quarantine list`` and ``show``.

Read only, and by descriptor below the quarantine folder (``safefs``): a sub-folder swapped for a
link is not entered, a sidecar that is a link or not JSON is reported as unreadable, never
followed. Moving files back is ``lifecycle.requeue``'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from watcher.errors import ConfigError
from watcher.fs import safefs
from watcher.fs.files import TEMP_SUFFIX
from watcher.textsafe import visible
from watcher.watch.moves import SIDECAR

SIDECAR_MAX = 1 << 20  # a sidecar larger than this is not one of ours


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One quarantined file."""

    name: str  # below the quarantine folder
    size: int  # bytes; -1 when only the sidecar is left
    kind: str  # "file", "symbolic link", ... (as it lies in the quarantine)
    age_s: float  # since it was quarantined (the sidecar's time, else the file's mtime)
    reason: str  # the failure reason ("unknown" without a readable sidecar)
    error: str
    quarantined_at: str = ""
    sidecar: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def entries(quarantine: str, *, reasons: Sequence[str] = (),
            now: float | None = None) -> Iterator[Entry]:
    """Every quarantined file (and every sidecar whose file is gone), by name; ``reasons``:
    only those. A quarantine folder that does not exist holds nothing."""
    now = time.time() if now is None else now
    try:
        root = safefs.root(quarantine)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError("watch.quarantine", f"cannot read {quarantine}: {exc.strerror}") \
            from exc
    files, orphans = _names(root)  # the root's descriptor is safefs's, kept for the process
    for rel in sorted(files | orphans):
        entry = _entry(root, rel, rel in files, now)
        if not reasons or entry.reason in reasons:
            yield entry


def _names(root: int) -> tuple[set[str], set[str]]:
    """(the quarantined files, the sidecars whose file is gone: their files' names) below the
    quarantine's descriptor, walked without following links."""
    names = {e.rel for e in safefs.walk(root, skip=lambda rel: rel.endswith(TEMP_SUFFIX))
             if not e.is_dir}
    # a name is a sidecar when it ends so and is not itself a file with a sidecar (an input
    # may be called x.error.json: its own sidecar is then x.error.json.error.json)
    files = {n for n in names if not n.endswith(SIDECAR) or n + SIDECAR in names}
    orphans = {n[:-len(SIDECAR)] for n in names - files} - files - {""}
    return files, orphans


def quarantined_names(root: int) -> list[str]:
    """The quarantined files below the quarantine's descriptor (not their sidecars), sorted."""
    return sorted(_names(root)[0])


def is_sidecar(path: str) -> bool:
    """Whether ``path`` is a sidecar: named so, and not itself a quarantined file with one."""
    return path.endswith(SIDECAR) and not os.path.lexists(path + SIDECAR)


def find(quarantine: str, name: str, now: float | None = None) -> Entry:
    """The quarantined file ``name`` (below the quarantine, or a path into it)."""
    rel = os.path.relpath(os.path.abspath(name), os.path.abspath(quarantine)) \
        if os.path.isabs(name) or os.path.lexists(name) else name
    if rel.startswith("..") or os.path.isabs(rel) or not safefs.parts(rel):
        raise ConfigError(name, f"not in the quarantine ({quarantine})")
    found = {e.name: e for e in entries(quarantine, now=now)}
    if rel in found:
        return found[rel]
    if rel.endswith(SIDECAR) and rel[:-len(SIDECAR)] in found:  # its sidecar named
        return found[rel[:-len(SIDECAR)]]
    raise ConfigError(name, f"no such quarantined file in {quarantine}")


def _entry(root: int, rel: str, present: bool, now: float) -> Entry:
    size, kind, mtime = -1, "missing", 0.0
    if present:
        with contextlib.suppress(OSError):
            st = safefs.lstat(root, rel)
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            kind, mtime = safefs.kind(st.st_mode), st.st_mtime
    doc, problem = _sidecar(root, rel + SIDECAR)
    when = _parse_time(str(doc.get("quarantined_at", ""))) or mtime or now
    return Entry(name=rel, size=size, kind=kind, age_s=max(0.0, now - when),
                 reason=str(doc.get("reason", "unknown")),
                 error=str(doc.get("error", problem)),
                 quarantined_at=str(doc.get("quarantined_at", "")), sidecar=doc)


def _sidecar(root: int, rel: str) -> tuple[dict[str, Any], str]:
    """The sidecar's document, or {} and why it could not be read."""
    try:
        fd = safefs.open_file(root, rel)
    except FileNotFoundError:
        return {}, "no sidecar (its reason is unknown)"
    except OSError as exc:
        return {}, f"sidecar unreadable: {exc.strerror}"
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(SIDECAR_MAX + 1)
    except OSError as exc:
        return {}, f"sidecar unreadable: {exc.strerror}"
    if len(data) > SIDECAR_MAX:
        return {}, "sidecar too large to be one of watcher's"
    try:
        doc = json.loads(data)
    except ValueError:
        return {}, "sidecar is not JSON"
    return (doc, "") if isinstance(doc, dict) else ({}, "sidecar is not a JSON object")


def _parse_time(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC time as ``moves.iso`` writes it; 0 if not."""
    try:
        base, _, frac = text.rstrip("Z").partition(".")
        t = time.strptime(base, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return 0.0
    import calendar  # noqa: PLC0415 - only here

    return calendar.timegm(t) + (int(frac[:3].ljust(3, "0")) / 1000 if frac.isdigit() else 0)


# --- for a person --------------------------------------------------------------------------------

def human_size(n: int) -> str:
    if n < 0:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # not reached


def human_age(seconds: float) -> str:
    s = int(seconds)
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= div:
            return f"{s // div}{unit}"
    return f"{s}s"


def table(rows: Sequence[Entry], width: int = 100) -> str:
    """A fixed-width table, one row per file, the error cut to fit ``width`` columns."""
    head = ("NAME", "REASON", "AGE", "SIZE", "ERROR")
    cells = [(visible(e.name), visible(e.reason), human_age(e.age_s), human_size(e.size),
              visible(short_error(e.error))) for e in rows]
    widths = [max([len(head[i])] + [columns(c[i]) for c in cells]) for i in range(4)]
    widths[0] = min(widths[0], 40)
    lines = []
    for c in [head, *cells]:
        name = c[0] if columns(c[0]) <= widths[0] else "…" + _last(c[0], widths[0] - 1)
        left = "  ".join([_pad(name, widths[0]), _pad(c[1], widths[1]),
                          _pad(c[2], widths[2], right=True), _pad(c[3], widths[3], right=True),
                          ""])
        room = max(10, width - columns(left))
        err = c[4] if columns(c[4]) <= room else _first(c[4], room - 1) + "…"
        lines.append((left + err).rstrip())
    return "\n".join(lines)


def columns(text: str) -> int:
    """The terminal columns ``text`` takes: wide (East Asian) characters take two, combining
    marks none."""
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int, *, right: bool = False) -> str:
    fill = " " * max(0, width - columns(text))
    return fill + text if right else text + fill


def _first(text: str, width: int) -> str:
    out = ""
    for ch in text:
        if columns(out + ch) > width:
            break
        out += ch
    return out


def _last(text: str, width: int) -> str:
    return _first(text[::-1], width)[::-1]


def short_error(error: str) -> str:
    """The error on one line, without the leading path of the claimed file it names (the NAME
    column says which file)."""
    error = " ".join(error.split())
    head, sep, rest = error.partition(": ")
    return rest if sep and os.sep in head else error


def summary(rows: Sequence[Entry]) -> str:
    """``3 file(s) in the quarantine: 2 not-an-image, 1 truncated``."""
    counts: dict[str, int] = {}
    for e in rows:
        counts[e.reason] = counts.get(e.reason, 0) + 1
    parts = ", ".join(f"{n} {visible(r)}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1],
                                                                                     kv[0])))
    return f"{len(rows)} file(s) in the quarantine" + (f": {parts}" if parts else "")


def describe(e: Entry) -> str:
    """Everything known of one quarantined file, a line per fact."""
    lines = [f"name: {visible(e.name)}", f"reason: {visible(e.reason)}",
             f"error: {visible(e.error)}",
             f"size: {human_size(e.size)}" + ("" if e.kind in ("file", "missing")
                                              else f" ({e.kind})"),
             f"age: {human_age(e.age_s)}"]
    if e.kind == "missing":
        lines.append("file: gone (only its sidecar is left)")
    shown = {"reason", "error", "input", "quarantined_as"}
    for key, value in e.sidecar.items():
        if key in shown:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"{visible(str(key))}: {visible(text)}")
    return "\n".join(lines)
