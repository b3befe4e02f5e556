"""``watcher status``: the daemon's state in a terminal, as a compact table (state, workers and
their files, the queue, what waits to retry, the last fates, the quarantine by reason);
``--watch`` redraws it live, ``--json`` prints the document for scripts.

The state is read from the daemon's status endpoint when its page is on (the heartbeat names
its address), else from the heartbeat file in its work folder, which carries a short form of
the same document every second: so it works without the page.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from watcher.ops import health
from watcher.ops.web import read_token
from watcher.watch.quarantine import short_error

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


def read(work: str, token_file: str = "", env: dict[str, str] | None = None,
         max_age: float = 30.0) -> dict[str, Any]:
    """The daemon's status document: from its endpoint when it serves one, else from its
    heartbeat. ``state`` says "absent", "stopped" or "unresponsive" when there is no live
    daemon; ``source`` says where the rest came from, ``note`` why the endpoint was not used."""
    path = health.heartbeat_path(work)
    try:
        with open(path, encoding="utf-8") as f:
            beat = json.load(f)
    except FileNotFoundError:
        return {"state": "absent", "source": path,
                "note": f"no heartbeat at {path}: the daemon is not running (or not yet "
                        "started)"}
    except (OSError, ValueError) as exc:
        return {"state": "absent", "source": path, "note": f"heartbeat unreadable: {exc}"}
    ok, line = health.check(path, max_age, live_only=True)
    doc = dict(beat.get("status") or {})
    doc.setdefault("state", beat.get("state", "?"))
    doc.setdefault("pid", beat.get("pid"))
    if beat.get("state") == "stopped":
        return {**doc, "state": "stopped", "source": path, "note": line}
    if not ok:
        return {**doc, "state": "unresponsive", "source": path, "note": line}
    url = doc.get("url", "")
    if url:
        try:
            token = read_token(os.environ if env is None else env, token_file)
            return {**fetch(url + "status", token), "source": url + "status"}
        except (OSError, ValueError) as exc:
            return {**doc, "source": path, "note": f"{url}status: {exc}; shown from the "
                                                   "heartbeat"}
    return {**doc, "source": path}


def fetch(url: str, token: str = "", timeout: float = 5.0) -> dict[str, Any]:
    if not url.startswith("http://"):
        raise ValueError(f"not an http address: {url}")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}  # noqa: S310
                                     if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 - http only
        doc = json.load(r)
    if not isinstance(doc, dict):
        raise ValueError("not a status document")  # noqa: TRY004 - one error kind for read()
    return doc


# --- the table -----------------------------------------------------------------------------------

def _age(s: float) -> str:
    s = int(max(0, s))
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= div:
            return f"{s // div}{unit}"
    return f"{s}s"


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:max(1, width - 1)] + "…"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]], width: int) -> list[str]:
    widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(len(head) - 1)]
    widths = [min(w, 40) for w in widths]
    out = []
    for r in [head, *rows]:
        left = "  ".join(f"{_cut(c, w):<{w}}" for c, w in zip(r, widths, strict=False)) + "  "
        out.append((left + _cut(r[-1], max(10, width - len(left)))).rstrip())
    return out


def render(doc: dict[str, Any], width: int = 100) -> str:
    """The compact table of one status document."""
    state = doc.get("state", "?")
    lines = [f"watcher: {state}" + (f", pid {doc['pid']}" if doc.get("pid") else "")
             + (f", up {_age(time.time() - doc['started_at'])}" if doc.get("started_at")
                else "")
             + (f", {doc.get('workers_alive', 0)}/{doc.get('workers_configured', 0)} workers"
                if "workers_alive" in doc else "")
             + (f", pipelines {', '.join(doc['pipelines'])}" if doc.get("pipelines") else "")]
    lines.append(f"  from {doc.get('source', '?')}")
    if doc.get("note"):
        lines.append(f"  note: {doc['note']}")  # whole: it says why
    for p in doc.get("problems", []) or []:
        lines.append(f"  problem: {p}")
    if state in ("absent",):
        return "\n".join(lines)
    c, q = doc.get("counts", {}), doc.get("queue", {})
    lines.append("counts: " + ", ".join(f"{c.get(k, 0)} {k}" for k in (
        "processed", "quarantined", "retried", "requeued", "deleted") if k in c or k in (
        "processed", "quarantined")))
    lines.append(f"queue: {q.get('pending', 0)} in the inbox, {q.get('claimed', 0)} claimed, "
                 f"{q.get('in_flight', 0)} with the workers, {q.get('running', 0)} running, "
                 f"{q.get('retrying', 0)} waiting to retry")
    workers = doc.get("workers", [])
    if workers:
        lines.append("")
        lines += _table(("WORKER", "DOING", "FOR", "DONE", "FILE"), [
            (str(w.get("worker")) + ("" if w.get("alive", True) else " (gone)"),
             w.get("phase", ""), f"{w.get('elapsed_s', 0):.1f} s" if w.get("input") else "",
             str(w.get("tasks", 0)), w.get("input") or "-") for w in workers], width)
    retry = q.get("retry", [])
    if retry:
        lines.append("")
        lines += _table(("RETRYING", "FAILURES", "NEXT TRY", "LAST ERROR"), [
            (r["input"], str(r.get("failures", 0)), f"in {r.get('next_try_in_s', 0):.0f} s",
             r.get("last_error", "")) for r in retry], width)
    recent = doc.get("recent", [])[:10]
    if recent:
        lines.append("")
        lines += _table(("WHEN", "FATE", "FILE", "OUTPUTS / REASON"), [
            (time.strftime("%H:%M:%S", time.localtime(f.get("at", 0))), f.get("fate", ""),
             f.get("input", ""), _what(f)) for f in recent], width)
    qz = doc.get("quarantine", {})
    if qz:
        by = ", ".join(f"{n} {r}" for r, n in (qz.get("by_reason") or {}).items())
        lines.append("")
        lines.append(f"quarantine: {qz.get('total', 0)} file(s)" + (f": {by}" if by else ""))
    return "\n".join(lines)


def _what(f: dict[str, Any]) -> str:
    """A fate's outputs (processed) or reason and error."""
    if f.get("fate") == "processed":
        return ", ".join(os.path.basename(o) for o in f.get("outputs", []))
    return f"{f.get('reason', '')}: {short_error(f.get('error', ''))}".strip(": ")


def run(get: Callable[[], dict[str, Any]], *, as_json: bool, watch: bool, interval: float,
        out: TextIO = sys.stdout) -> int:
    """Print once (or, with ``watch``, redraw every ``interval`` seconds until interrupted);
    exit 0 while a daemon runs, 1 when there is none or it does not answer."""
    try:
        return _loop(get, as_json=as_json, watch=watch, interval=interval, out=out)
    except KeyboardInterrupt:  # Ctrl-C ends --watch
        return 0


def _loop(get: Callable[[], dict[str, Any]], *, as_json: bool, watch: bool, interval: float,
          out: TextIO) -> int:
    while True:
        doc = get()
        if as_json:
            out.write(json.dumps(doc, indent=None if watch else 2) + "\n")
        else:
            width = shutil.get_terminal_size((100, 24)).columns
            out.write((CLEAR if watch else "") + render(doc, width) + "\n")
        out.flush()
        if not watch:
            return 0 if doc.get("state") not in ("absent", "stopped", "unresponsive") else 1
        time.sleep(interval)
