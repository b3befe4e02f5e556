"""Sample images to try watcher on: photo-like pictures in every supported format and mode.

Made here, deterministically, so the first run needs nothing but the package.
"""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw

_KINDS = ("jpeg", "png-alpha", "bmp", "webp", "gif-animated", "tiff-16bit", "jpeg-rotated",
          "png-palette", "jpeg-cmyk", "avif", "png-gray", "jpeg-large")


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


def make_samples(folder: str, count: int = 12) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    out = []
    for i in range(count):
        kind = _KINDS[i % len(_KINDS)]
        base = picture(640 + 16 * i, 480 + 8 * i, i)
        path = os.path.join(folder, f"sample_{i:03d}")
        if kind == "jpeg":
            path += ".jpg"
            base.save(path, quality=90)
        elif kind == "png-alpha":
            path += ".png"
            im = base.convert("RGBA")
            im.putalpha(Image.linear_gradient("L").resize(base.size))
            im.save(path)
        elif kind == "bmp":
            path += ".bmp"
            base.save(path)
        elif kind == "webp":
            path += ".webp"
            base.save(path, quality=85)
        elif kind == "gif-animated":
            path += ".gif"
            frames = [picture(320, 240, i + k) for k in range(4)]
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)
        elif kind == "tiff-16bit":
            path += ".tif"
            gray = base.convert("L").point(lambda v: v * 257, "I").convert("I;16")
            gray.save(path)
        elif kind == "jpeg-rotated":
            path += ".jpg"
            exif = Image.Exif()
            exif[0x0112] = 6  # stored sideways; auto_orient turns it upright
            base.save(path, quality=90, exif=exif.tobytes())
        elif kind == "png-palette":
            path += ".png"
            base.quantize(64).save(path)
        elif kind == "jpeg-cmyk":
            path += ".jpg"
            base.convert("CMYK").save(path, quality=90)
        elif kind == "avif":
            path += ".avif"
            base.save(path, quality=70)
        elif kind == "png-gray":
            path += ".png"
            base.convert("L").save(path)
        else:
            path += ".jpg"
            picture(4000, 3000, i).save(path, quality=90)
        out.append(path)
    return out
