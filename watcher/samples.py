"""Sample images to try watcher on: photo-like pictures in every supported format and mode, and
one broken file (a JPEG cut short), so that a first run shows the quarantine too.

Made here, deterministically, so the first run needs nothing but the package. Each sample is
written under a temp name and renamed when whole: a full disk or a folder that cannot be written
leaves no partial sample. Sizes cycle with the kinds, so a large count stays small on disk
(about 1.5 MB a file on average).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import IO

from PIL import Image, ImageDraw

from watcher.fs.staging import atomic_write

_KINDS = ("jpeg", "png-alpha", "bmp", "webp", "gif-animated", "tiff-16bit", "jpeg-rotated",
          "png-palette", "jpeg-cmyk", "avif", "png-gray", "jpeg-large", "jpeg-truncated")
BROKEN = "jpeg-truncated"  # the one the daemon quarantines (reason: truncated)
DEFAULT_COUNT = len(_KINDS)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB picture: gradients, a sun and some hills."""
    x = Image.linear_gradient("L").resize((width, height))
    y = x.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    r = x.point(lambda v: (v + seed * 37) % 256)
    g = y
    b = Image.new("L", (width, height), 120 + seed * 11 % 100)
    im = Image.merge("RGB", (r, g, b))
    d = ImageDraw.Draw(im)
    s = min(width, height)
    cx, cy = width * (0.3 + 0.05 * (seed % 5)), height * 0.3
    d.ellipse((cx - s / 8, cy - s / 8, cx + s / 8, cy + s / 8), fill=(250, 220, 90))
    pts = [(i * width / 12, height * (0.65 + 0.1 * math.sin(i + seed))) for i in range(13)]
    d.polygon([(0, height), *pts, (width, height)], fill=(40, 110 + seed % 60, 50))
    return im


def make_samples(folder: str, count: int = DEFAULT_COUNT) -> list[str]:
    """Write ``count`` samples into ``folder``; return their paths."""
    return list(iter_samples(folder, count))


def write_all(folder: str, count: int, on_file: Callable[[str], object]) -> str:
    """Write ``count`` samples, calling ``on_file(path)`` after each; return a summary line."""
    t0, size, broken = time.monotonic(), 0, []
    for i, path in enumerate(iter_samples(folder, count)):
        size += os.path.getsize(path)
        if kind_of(i) == BROKEN:
            broken.append(os.path.basename(path))
        on_file(path)
    more = ", ..." if len(broken) > 3 else ""
    note = f"; {len(broken)} broken on purpose ({', '.join(broken[:3])}{more}): the daemon " \
        "quarantines them" if broken else ""
    return (f"wrote {count} sample image(s), {size / 1e6:.1f} MB, to {folder} in "
            f"{time.monotonic() - t0:.1f} s{note}")


def kind_of(i: int) -> str:
    return _KINDS[i % len(_KINDS)]


def iter_samples(folder: str, count: int = DEFAULT_COUNT) -> Iterator[str]:
    """Write the samples one by one, yielding each path once it is written."""
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        yield _write(folder, i)


def _write(folder: str, i: int) -> str:
    """Write sample ``i`` under a temp name, then rename it: a sample that could not be written
    whole (a full disk) leaves nothing behind."""
    ext, save = _render(i)
    path = os.path.join(folder, f"sample_{i:03d}{ext}")
    atomic_write(path, save, overwrite=True)
    return path


def _render(i: int) -> tuple[str, Callable[[IO[bytes]], object]]:
    """Sample ``i``'s extension, and how to write it to a file object."""
    kind = kind_of(i)
    step = i % len(_KINDS)  # sizes cycle with the kinds: many samples stay small
    base = picture(640 + 16 * step, 480 + 8 * step, i)
    if kind == "jpeg":
        return ".jpg", lambda f: base.save(f, "JPEG", quality=90)
    if kind == "png-alpha":
        im = base.convert("RGBA")
        im.putalpha(Image.linear_gradient("L").resize(base.size))
        return ".png", lambda f: im.save(f, "PNG")
    if kind == "bmp":
        return ".bmp", lambda f: base.save(f, "BMP")
    if kind == "webp":
        return ".webp", lambda f: base.save(f, "WEBP", quality=85)
    if kind == "gif-animated":
        frames = [picture(320, 240, i + k) for k in range(4)]
        return ".gif", lambda f: frames[0].save(f, "GIF", save_all=True,
                                                append_images=frames[1:], duration=200, loop=0)
    if kind == "tiff-16bit":
        gray = base.convert("L").point(lambda v: v * 257, "I").convert("I;16")
        return ".tif", lambda f: gray.save(f, "TIFF")
    if kind == "jpeg-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # stored sideways; auto_orient turns it upright
        return ".jpg", lambda f: base.save(f, "JPEG", quality=90, exif=exif.tobytes())
    if kind == "png-palette":
        return ".png", lambda f: base.quantize(64).save(f, "PNG")
    if kind == "jpeg-cmyk":
        return ".jpg", lambda f: base.convert("CMYK").save(f, "JPEG", quality=90)
    if kind == "avif":
        return ".avif", lambda f: base.save(f, "AVIF", quality=70)
    if kind == "png-gray":
        return ".png", lambda f: base.convert("L").save(f, "PNG")
    if kind == "jpeg-large":  # a 12 MP photo (shrink-on-load); 3 MP after the first
        w, h = (4000, 3000) if i < len(_KINDS) else (2000, 1500)
        return ".jpg", lambda f: picture(w, h, i).save(f, "JPEG", quality=90)
    # BROKEN: a JPEG cut off after its first third
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=90)
    return ".jpg", lambda f: f.write(buf.getvalue()[: buf.tell() // 3])
