"""Output names: the one component that decides where each output of each input goes, for batch
and watch mode alike.

A name is ``{stem}_{suffix}{ext}`` in the output folder that mirrors the input's folder; when
that path is already held, by another input of this run or daemon (``x.png`` and ``x.jpg`` both
make ``x_web.jpg``) or, where asked, by a file on disk, the next counter is tried
(``x_web_2.jpg``). Names never exceed NAME_MAX: a long stem keeps its readable start and gains a
hash. No two different inputs are ever handed the same path while both hold it; an owner (a
claim) releases its names when its fate is decided. Re-processing the same input after a crash
may reuse exactly the outputs its claim recorded (``reuse``), and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable

from watcher.fs.files import NAME_MAX, TEMP_SUFFIX, short_name

# Room kept in each output name for its temp file's decorations (``.{name}.{host}.{pid}`` and
# the temp suffix), so temp names shorten only in the rarest cases.
_TEMP_ROOM = len(TEMP_SUFFIX) + 32


def output_name(stem: str, suffix: str, ext: str, counter: int = 0) -> str:
    """``{stem}_{suffix}{ext}``, with ``_{counter}`` before the extension when counter > 1;
    within NAME_MAX bytes (the stem gives way)."""
    tail = (f"_{suffix}" if suffix else "") + (f"_{counter}" if counter > 1 else "") + ext
    limit = NAME_MAX - _TEMP_ROOM - len(os.fsencode(tail))
    if len(os.fsencode(stem)) > limit:
        stem = short_name(stem, max(limit, 16))
    return stem + tail


class OutputNames:
    """Hands out output paths so that no two owners hold one at once; with ``avoid_existing``
    a path taken on disk is skipped too (the ``rename`` policy, and every new input in watch
    mode)."""

    def __init__(self) -> None:
        self._owner: dict[str, Hashable] = {}  # normcased path -> who holds it
        self._held: dict[Hashable, list[str]] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def claim(self, folder: str, stem: str, suffix: str, ext: str, *, avoid_existing: bool,
              owner: Hashable = None) -> str:
        counter = 1
        while True:
            path = os.path.normpath(os.path.join(folder, output_name(stem, suffix, ext, counter)))
            key = os.path.normcase(path)
            if key not in self._owner and not (avoid_existing and os.path.lexists(path)):
                self._hold(key, path, owner)
                return path
            counter += 1

    def reuse(self, paths: Iterable[str], owner: Hashable) -> bool:
        """Hold exactly ``paths`` (a claim's recorded outputs) for ``owner``; False, holding
        none of them, when another owner holds one."""
        keys = [(os.path.normcase(os.path.normpath(p)), p) for p in paths]
        if any(k in self._owner and self._owner[k] != owner for k, _ in keys):
            return False
        for key, path in keys:
            self._hold(key, path, owner)
        return True

    def holds(self, owner: Hashable) -> list[str]:
        return list(self._held.get(owner, []))

    def release(self, owner: Hashable) -> None:
        for path in self._held.pop(owner, []):
            self._owner.pop(os.path.normcase(path), None)

    def _hold(self, key: str, path: str, owner: Hashable) -> None:
        if key not in self._owner or self._owner[key] != owner:
            self._owner[key] = owner
            self._held.setdefault(owner, []).append(path)
