"""The images the status page shows: an output of a recent fate, or a preview of a quarantined
file, read by descriptor below its folder (``safefs``: no link is followed anywhere below it,
so a file swapped for a link, or a folder for one, is not served) and only when it is a
regular file under ``MAX_BYTES``.

A format every browser draws (JPEG, PNG, GIF, WebP, BMP) is served as it is: the browser, not
the daemon, decodes it. Any other is made into a PNG by a separate, short-lived process
(``python -m watcher.ops.thumbs``) with a memory limit, a pixel limit and a deadline, so that a
hostile quarantined file can crash or exhaust only that process, never the daemon.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys
import threading
from collections import OrderedDict

from watcher.fs import safefs

MAX_BYTES = 32 << 20  # larger files are not shown
SIZE = 320  # a converted preview's longest side
DEADLINE = 15.0  # seconds a conversion may take
MEMORY = 1 << 30  # address space of the converting process
PIXELS = 50_000_000  # pixels it decodes at most
_NATIVE = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
           (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


def read(folder: str, rel: str, limit: int = MAX_BYTES) -> bytes | None:
    """The bytes of the regular file ``rel`` below ``folder``, or None (gone, a link on the way,
    not a regular file, too large)."""
    try:
        if not safefs.parts(rel):  # refuses ".." (OSError)
            return None
        fd = safefs.open_file(safefs.root(folder), rel)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)[:limit]
    except OSError:
        return None
    finally:
        os.close(fd)


def native(data: bytes) -> str | None:
    """The media type of an image every browser draws, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _NATIVE:
        if data.startswith(magic):
            return mime
    return None


def convert(data: bytes) -> bytes | None:
    """A PNG preview of ``data`` made by a separate process, or None when it does not decode
    (or takes too long, or too much memory)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "watcher.ops.thumbs"], input=data,
                              capture_output=True, timeout=DEADLINE, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 and proc.stdout else None


class Previews:
    """Images for the page, each made once: ``get(key, folder, rel)`` -> (media type, bytes),
    or None when there is nothing to show. The last ``size`` are kept."""

    def __init__(self, size: int = 128) -> None:
        self._cache: OrderedDict[tuple[str, int, int], tuple[str, bytes] | None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int], folder: str, rel: str) -> tuple[str, bytes] | None:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = read(folder, rel)
        shown: tuple[str, bytes] | None = None
        if data:
            mime = native(data)
            if mime is not None:
                shown = (mime, data)
            else:
                png = convert(data)
                shown = ("image/png", png) if png else None
        with self._lock:
            self._cache[key] = shown
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return shown


def _main() -> int:
    """The converting process: an image on stdin, a PNG preview on stdout (exit 1: none)."""
    import resource  # noqa: PLC0415 - only in the converting process

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    from PIL import Image  # noqa: PLC0415

    Image.MAX_IMAGE_PIXELS = PIXELS
    try:
        with Image.open(io.BytesIO(sys.stdin.buffer.read())) as im:
            im.draft("RGB", (SIZE, SIZE))
            im.thumbnail((SIZE, SIZE))
            out = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(out, "PNG")
    except Exception:  # noqa: BLE001 - whatever the file does: no preview
        return 1
    sys.stdout.buffer.write(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
