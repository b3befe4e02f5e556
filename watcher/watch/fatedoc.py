"""The JSON document a notification carries for one fate (schema 1, in docs/operations.md).

Built on the daemon's loop from what the fate line already holds (a dict, no I/O); the outputs'
sizes are read later by the notifications' thread (``watcher.ops.webhooks.with_sizes``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from watcher.fs.files import HOST
from watcher.tasks import Result
from watcher.watch.claiming import Claim

SCHEMA = 1  # raised when a field changes meaning or goes; new fields do not raise it


def iso(t: float | None) -> str | None:
    """A wall time as ISO 8601 UTC with milliseconds (None stays None)."""
    if not t:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def document(fate: str, c: Claim, r: Result | None, *, inbox: str, instance: str,
             outputs: list[str] | tuple[str, ...] = (), reason: str | None = None,
             error: str | None = None, error_type: str | None = None,
             moved_to: str | None = None, recovered: bool = False) -> dict[str, Any]:
    """One fate's document. ``outputs`` are the output paths (made for ``processed``; for
    another fate, what it had published, removed since)."""
    now = time.time()
    pipelines = {path: name for name, path in c.outputs}
    return {
        "schema": SCHEMA,
        "event": f"file.{fate}",
        "fate": fate,
        "input": c.rel,
        "input_path": os.path.join(inbox, c.rel),
        "reason": reason,
        "error": error or None,
        "error_type": error_type or None,
        "moved_to": moved_to,
        "outputs": [{"path": p, "pipeline": pipelines.get(p)} for p in outputs],
        "timings": {
            "detected_at": iso(c.detected_at),
            "claimed_at": iso(c.claimed_at),
            "decided_at": iso(now),
            "processing_s": round(r.duration, 4) if r else None,
            "total_s": round(now - c.detected_at, 4) if c.detected_at else None,
        },
        "attempt": r.attempt if r else None,
        "transient_failures": c.transient_failures,
        "input_bytes": r.bytes_in if r and r.ok else None,
        "output_bytes": r.bytes_out if r and r.ok else None,
        "claim": c.token,
        "host": HOST,
        "instance": instance or None,
        "daemon_pid": os.getpid(),
        "worker_pid": r.worker if r else None,
        "recovered": recovered,
    }
