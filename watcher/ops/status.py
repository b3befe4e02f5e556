"""The daemon's record of what happened, as the status page and ``watcher status`` show it: the
count of each fate since start and per hour, the throughput of the last hour in 10-second
buckets (files/s and MB/s), and the last fates with their outputs, each under an id of its own.

The daemon's loop is the only writer (``record``); the page's server threads read (``fates``,
``output``) under one lock. An output is served by looking up a fate's id here, never by a path
a request names.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

BUCKET = 10.0  # seconds per throughput bucket
HISTORY = 3600.0  # seconds of throughput kept
HOURS = 24  # hours of per-hour counts kept
RECENT = 50  # fates kept with their outputs
FATES = ("processed", "quarantined", "retried", "requeued", "deleted", "vanished")


@dataclass(frozen=True, kw_only=True)
class FateRecord:
    """One file's fate as the page lists it."""

    id: int
    fate: str
    input: str  # below the inbox
    at: float  # wall time
    reason: str = ""
    error: str = ""
    outputs: tuple[str, ...] = ()  # absolute paths, as the daemon wrote them
    where: str = ""  # where the input went: archive, quarantine (absolute), or ""
    duration_s: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d


@dataclass
class _Bucket:
    start: float
    files: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Board:
    """Counts, throughput and the last fates of one daemon run."""

    recent_max: int = RECENT
    started_at: float = field(default_factory=time.time)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FATES, 0))

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._recent: deque[FateRecord] = deque(maxlen=self.recent_max)
        self._buckets: deque[_Bucket] = deque(maxlen=int(HISTORY / BUCKET))
        self._hours: deque[tuple[float, dict[str, int]]] = deque(maxlen=HOURS)

    def record(self, fate: str, input: str, *, now: float | None = None,
               **details: Any) -> FateRecord:
        """Note one fate (``details``: the fields of ``FateRecord``)."""
        now = time.time() if now is None else now
        with self._lock:
            rec = FateRecord(id=next(self._ids), fate=fate, input=input, at=now, **details)
            self.counts[fate] = self.counts.get(fate, 0) + 1
            hour = now - now % 3600
            if not self._hours or self._hours[-1][0] != hour:
                self._hours.append((hour, {}))
            per = self._hours[-1][1]
            per[fate] = per.get(fate, 0) + 1
            if fate in ("processed", "quarantined"):  # a file finished: throughput
                b = self._bucket(now)
                b.files += 1
                b.bytes_in += rec.input_bytes
                b.bytes_out += rec.output_bytes
            self._recent.append(rec)
            return rec

    def _bucket(self, now: float) -> _Bucket:
        start = now - now % BUCKET
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(_Bucket(start))
        return self._buckets[-1]

    def totals(self) -> dict[str, int]:
        """The count of each fate since start."""
        with self._lock:
            return dict(self.counts)

    def fates(self, n: int = RECENT) -> list[FateRecord]:
        """The last ``n`` fates, newest first."""
        with self._lock:
            return list(itertools.islice(reversed(self._recent), n))

    def output(self, fate_id: int, index: int) -> str | None:
        """The path of output ``index`` of fate ``fate_id``, if this daemon still holds it."""
        with self._lock:
            for rec in self._recent:
                if rec.id == fate_id:
                    return rec.outputs[index] if 0 <= index < len(rec.outputs) else None
        return None

    def throughput(self, now: float | None = None) -> list[dict[str, float]]:
        """The last hour, one row per 10 s bucket, oldest first (buckets with no file: 0)."""
        now = time.time() if now is None else now
        first = now - now % BUCKET - HISTORY + BUCKET
        with self._lock:
            have = {b.start: b for b in self._buckets if b.start >= first}
        rows = []
        for i in range(int(HISTORY / BUCKET)):
            start = first + i * BUCKET
            b = have.get(start)
            rows.append({"t": start, "files_s": (b.files / BUCKET) if b else 0.0,
                         "mb_s": (b.bytes_in / BUCKET / 1e6) if b else 0.0,
                         "out_mb_s": (b.bytes_out / BUCKET / 1e6) if b else 0.0})
        return rows

    def per_hour(self) -> list[dict[str, Any]]:
        """The count of each fate per clock hour (UTC), oldest first, the last 24 at most."""
        with self._lock:
            return [{"hour": h, **dict(per)} for h, per in self._hours]

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"started_at": self.started_at, "uptime_s": round(now - self.started_at, 1),
                "counts": self.totals(), "per_hour": self.per_hour(),
                "throughput": self.throughput(now),
                "recent": [r.to_dict() for r in self.fates()]}
