"""The quarantine as the status page lists it: an index the daemon keeps, so that no request
lists the folder. Filled once at start (in a thread of its own: a quarantine of 10,000 files
does not delay the start), then kept up to date as the daemon quarantines files and as the page
requeues or deletes them; a rescan every ``RESCAN`` seconds (again in its own thread) catches
what an operator moved by hand.

Each file gets an id when it enters the index; the page names files by id only, and the index
gives back the name below the quarantine that the daemon itself recorded.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from watcher.fs import safefs
from watcher.watch import quarantine
from watcher.watch.moves import SIDECAR

PAGE = 50  # rows per page
RESCAN = 300.0  # seconds between background rescans of the folder


@dataclass(frozen=True, kw_only=True)
class Item:
    """One quarantined file in the index."""

    id: int
    name: str  # below the quarantine folder
    reason: str
    error: str
    size: int
    kind: str
    at: float  # wall time it was quarantined

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "reason": self.reason, "error": self.error,
                "size": self.size, "kind": self.kind, "quarantined_at": self.at,
                "age_s": round(max(0.0, now - self.at), 1)}


class QuarantineIndex:
    """The quarantined files of one daemon's quarantine folder, by id."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.loaded = False
        self.error = ""  # why the last scan failed ("" when it did not)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._items: dict[int, Item] = {}
        self._by_name: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- filled -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Scan the folder now and every RESCAN seconds, in a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="quarantine-index", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(RESCAN)

    def scan(self) -> None:
        """List the folder once: files it no longer holds leave the index, new ones enter."""
        found: dict[str, quarantine.Entry] = {}
        now = time.time()
        try:
            for e in quarantine.entries(self.folder, now=now):
                found[e.name] = e
        except Exception as exc:  # noqa: BLE001 - a ConfigError or an OSError: shown, retried
            self.error = str(exc)
            return
        self.error = ""
        with self._lock:
            # gone since the listing; not one the daemon added after the listing began
            for name in [n for n, i in self._by_name.items()
                         if n not in found and self._items[i].at < now]:
                self._items.pop(self._by_name.pop(name), None)
            for name, e in found.items():
                if name not in self._by_name:
                    self._put(name, e.reason, e.error, e.size, e.kind, now - e.age_s)
            self.loaded = True

    def _put(self, name: str, reason: str, error: str, size: int, kind: str, at: float) -> Item:
        old = self._by_name.get(name)
        if old is not None:
            self._items.pop(old, None)
        item = Item(id=next(self._ids), name=name, reason=reason, error=error, size=size,
                    kind=kind, at=at)
        self._items[item.id] = item
        self._by_name[name] = item.id
        return item

    def add(self, path: str, reason: str, error: str) -> Item | None:
        """The daemon quarantined a file (``path``: where it now lies)."""
        name = os.path.relpath(path, self.folder)
        try:
            if not safefs.parts(name):  # refuses a name out of the folder (OSError)
                return None
        except OSError:
            return None
        size, kind = -1, "missing"
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            size, kind = st.st_size, safefs.kind(st.st_mode)
        with self._lock:
            return self._put(name, reason, error, size, kind, time.time())

    def remove(self, item_id: int) -> None:
        with self._lock:
            item = self._items.pop(item_id, None)
            if item is not None:
                self._by_name.pop(item.name, None)

    # --- read -------------------------------------------------------------------------------------

    def get(self, item_id: int) -> Item | None:
        with self._lock:
            return self._items.get(item_id)

    def counts(self) -> dict[str, int]:
        """How many files per reason."""
        out: dict[str, int] = {}
        with self._lock:
            for item in self._items.values():
                out[item.reason] = out.get(item.reason, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def __len__(self) -> int:
        return len(self._items)

    def page(self, number: int, size: int = PAGE, reason: str = "") -> dict[str, Any]:
        """Page ``number`` (from 1) of the files, newest first; ``reason``: only those."""
        now = time.time()
        with self._lock:
            items = [i for i in self._items.values() if not reason or i.reason == reason]
        items.sort(key=lambda i: (-i.at, -i.id))
        pages = max(1, -(-len(items) // size))
        number = min(max(1, number), pages)
        rows = items[(number - 1) * size:number * size]
        return {"page": number, "pages": pages, "total": len(items), "per_page": size,
                "loaded": self.loaded, "error": self.error,
                "items": [i.to_dict(now) for i in rows]}

    # --- acted on ---------------------------------------------------------------------------------

    def delete(self, item: Item) -> None:
        """Remove the quarantined file and its sidecar, by descriptor below the quarantine (no
        link followed: a link is removed as a link)."""
        root = safefs.root(self.folder)
        for name in (item.name, item.name + SIDECAR):
            with contextlib.suppress(FileNotFoundError), safefs.parent(root, name) as (fd, n):
                os.unlink(n, dir_fd=fd)
        self.remove(item.id)
