"""Duplicates: the inputs already processed, by content and pipeline configuration, in a small
SQLite database in the work folder (``.watcher-seen.sqlite3``; with several instances on one
inbox, in the work folder that holds theirs, so that they share it).

An input is known by the SHA-256 of its bytes and the hash of the effective configuration of
its processing (every pipeline's steps, parameters, suffix and output options, and the decode
settings): the same photo dropped again under the same configuration is a duplicate; after a
configuration change it is processed again. A record is written only when a processed input's
fate was carried out (a kill before that leaves none: the input is processed again, never lost).
The database is in WAL mode with full sync (a record survives a kill -9 of the daemon), each
write is one transaction and a busy database is waited for (``BUSY_TIMEOUT``: several daemons
write it), and records older than ``[watch] duplicates_max_age`` are pruned (bounded size).
A database that cannot be used (a full disk, a damaged file) never stops processing: inputs are
then processed as if new, with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FILENAME = ".watcher-seen.sqlite3"  # a dot name: never taken for a claim
BUSY_TIMEOUT = 30.0  # seconds a write waits for another daemon's transaction
PRUNE_EVERY = 3600.0  # seconds between two prunings by one daemon
_CHUNK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    content TEXT NOT NULL,   -- sha256 of the input's bytes
    config TEXT NOT NULL,    -- hash of the effective pipeline configuration
    input TEXT NOT NULL,     -- the input's name below the inbox, when it was processed
    outputs TEXT NOT NULL,   -- JSON list of its output paths
    at REAL NOT NULL,        -- when its fate was carried out (seconds since the epoch)
    PRIMARY KEY (content, config)
);
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
"""


@dataclass(frozen=True)
class Earlier:
    """The record of an input processed before."""

    input: str
    outputs: list[str]
    at: float


def content_hash(path: str) -> str | None:
    """SHA-256 of the regular file at ``path`` (never following a link, never blocking on a
    FIFO), or None when it cannot be read as one: the worker will say what it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        h = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def config_hash(pipelines: Iterable[Any], limits: Any) -> str:
    """A hash of what decides an input's outputs: each pipeline's name, suffix, steps (names,
    parameters, a user function's qualified name) and output options, and the decode limits."""
    parts = []
    for p in pipelines:
        steps = [(s.name, repr(s.params),
                  f"{getattr(s.func, '__module__', '')}.{getattr(s.func, '__qualname__', '')}"
                  if s.func is not None else "") for s in p.steps]
        parts.append((p.name, p.suffix, steps, repr(p.output)))
    return hashlib.sha256(repr((parts, repr(limits))).encode()).hexdigest()


class Seen:
    """The database of processed inputs (see the module's docstring)."""

    def __init__(self, folder: str, max_age: float) -> None:
        self.path = os.path.join(folder, FILENAME)
        self.max_age = max_age
        self._db: sqlite3.Connection | None = None
        self._pruned = 0.0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def lookup(self, content: str, config: str) -> Earlier | None:
        """The earlier input with this content under this configuration, if one is recorded
        (and not older than ``max_age``)."""
        row = self._conn().execute(
            "SELECT input, outputs, at FROM seen WHERE content = ? AND config = ? AND at >= ?",
            (content, config, time.time() - self.max_age)).fetchone()
        if row is None:
            return None
        return Earlier(input=row[0], outputs=json.loads(row[1]), at=row[2])

    def record(self, content: str, config: str, rel: str, outputs: list[str]) -> None:
        """Record a processed input (one transaction); the first record of a content stays
        (several daemons may finish copies of it at once). Prunes old records now and then."""
        db = self._conn()
        now = time.time()
        with _transaction(db):
            db.execute("INSERT INTO seen (content, config, input, outputs, at) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT (content, config) DO UPDATE SET "
                       "input = excluded.input, outputs = excluded.outputs, at = excluded.at "
                       "WHERE seen.at < ?",
                       (content, config, rel, json.dumps(outputs), now, now - self.max_age))
        if now - self._pruned > PRUNE_EVERY:
            self.prune(now)

    def prune(self, now: float | None = None) -> int:
        """Delete the records older than ``max_age``; how many went."""
        now = time.time() if now is None else now
        self._pruned = now
        db = self._conn()
        with _transaction(db):
            cur = db.execute("DELETE FROM seen WHERE at < ?", (now - self.max_age,))
        return cur.rowcount

    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM seen").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Any:
    db.execute("BEGIN IMMEDIATE")  # the write lock now: waits (busy timeout), never deadlocks
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
