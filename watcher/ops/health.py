"""Liveness: the heartbeat file the daemon's supervisor loop rewrites every second, and the check
``watcher health`` runs (a container HEALTHCHECK, a monitoring probe).

Healthy: the heartbeat exists, the daemon says it is running, and its loop ticked within
``max_age`` seconds (a wedged supervisor stops ticking). One line says why when it is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

HEARTBEAT = ".watcher-heartbeat.json"
# seconds the heartbeat's content may lag its time of last touch (a daemon rewrites it each
# second; one that only touches it could not write it)
STALE = 5.0


def heartbeat_path(work: str) -> str:
    return os.path.join(work, HEARTBEAT)


def write(path: str, doc: dict[str, Any]) -> None:
    """Replace the heartbeat atomically (no fsync: it only has to be fresh, not durable)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    now = time.time()
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**doc, "time": now, "pid": os.getpid()}, f)
        os.utime(tmp, (now, now))  # its mtime on this clock, as ``touch`` sets it (``check``)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def touch(path: str) -> bool:
    """Refresh the heartbeat's time without writing it (needs no free space); False when even
    that failed."""
    try:
        now = time.time()
        os.utime(path, (now, now))
    except OSError:
        return False
    return True


def check(path: str, max_age: float = 30.0, now: float | None = None, *,
          live_only: bool = False) -> tuple[bool, str]:
    """(ok, one line). Not ok: no heartbeat, stopped, a loop that stopped ticking, or (unless
    ``live_only``, the question a liveness probe asks) a daemon that says it is degraded:
    files waiting to retry or that cannot be claimed, fates it cannot carry out, stuck claims
    or workers; or one that has only touched its heartbeat for over STALE seconds, unable to
    rewrite it (its last word is out of date)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        touched = os.stat(path).st_mtime  # refreshed when a full disk stops the rewrite
    except FileNotFoundError:
        return False, f"no heartbeat at {path}: the daemon is not running (or not yet started)"
    except (OSError, ValueError) as exc:
        return False, f"heartbeat {path} unreadable: {exc}"
    now = time.time() if now is None else now
    age = now - max(float(doc.get("time", 0)), touched)
    state = doc.get("state", "?")
    if state == "stopped":
        return False, f"the daemon (pid {doc.get('pid')}) has stopped"
    if age > max_age:
        return False, (f"the supervisor loop last ticked {age:.1f} s ago (max {max_age:g} s): "
                       f"pid {doc.get('pid')} is wedged or gone")
    line = (f"pid {doc.get('pid')} {state}, ticked {age:.1f} s ago, "
            f"{doc.get('in_flight', 0)} in flight, {doc.get('retrying', 0)} waiting to retry, "
            f"{doc.get('pending', 0)} waiting, {doc.get('workers_alive', 0)} workers")
    problems = [str(p) for p in doc.get("problems", []) or []]
    unwritten = touched - float(doc.get("time", 0))
    if unwritten > STALE:  # alive (it touches the file) but its state is not what it says
        problems.insert(0, f"the daemon has not been able to write its heartbeat for "
                           f"{unwritten:.0f} s (a full or unwritable disk?): the state above "
                           "is that old")
    if problems and not live_only:
        return False, f"degraded: {line}; " + "; ".join(problems)
    return True, f"ok: {line}"
