"""The adversarial tier: a seeded mutation fuzzer over valid files of every input format.

Every case is a real file: a valid seed made here with Pillow (every format, mode and layout
watcher opens), mutated deterministically by a ``random.Random`` (bit flips, byte overwrites,
truncation, chunk/segment duplication and deletion, junk, splices of two seeds, and targeted
header edits: sizes bumped to bombs, frame counts, TIFF IFD offsets and counts), plus a fixed
set of hostile files. Each goes through the real ``Processor`` (watcher.imaging.processor) with
the default limits and pipelines of every output format.

Pass: every case either succeeds (each output exists and decodes) or fails with a documented
reason that is neither ``internal-error`` nor transient (a mutated file on a healthy disk is
never ``io-error`` nor ``write-failed``), within a per-case deadline.

Tier 1 (the default run): 500 fixed cases in-process, and some of them through ``watcher batch``
with real worker processes. Tier 2: ``WATCHER_FUZZ_CASES=10000`` (and ``WATCHER_FUZZ_SEED``), or
``scripts/fuzz --cases 10000 --seed N``: a table of reasons, failing cases saved to a folder.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from PIL import Image

from watcher import config, extensions
from watcher.errors import REASONS, TRANSIENT_REASONS
from watcher.imaging import memory
from watcher.imaging.pipeline import Pipeline
from watcher.imaging.processor import Processor
from watcher.samples import picture
from watcher.settings.schema import DecodeLimits, OutputOptions
from watcher.tasks import OutputPlan, Task

ROOT = Path(__file__).resolve().parent.parent
CASES = int(os.environ.get("WATCHER_FUZZ_CASES", "500"))
SEED = int(os.environ.get("WATCHER_FUZZ_SEED", "12"))
DEADLINE = 30  # seconds one case may take before it counts as a hang
# Each case runs as a worker with this max_worker_memory would (2G shared by 2 workers is about
# this much): its estimate applies; in tier 2 and through `watcher batch` the ceiling too.
MEMORY_CAP = int(os.environ.get("WATCHER_FUZZ_MEMORY", str(1024 * 2**20)))
BAD_REASONS = {"internal-error", *TRANSIENT_REASONS, "worker-crashed", "timeout"}


# --- seeds: valid files of every format ---------------------------------------------------------

def _save(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _frames(n: int, size: tuple[int, int] = (40, 30)) -> list[Image.Image]:
    return [picture(*size, seed=k) for k in range(n)]


def _interlaced_png(im: Image.Image) -> bytes:
    """An Adam7-interlaced RGB PNG (Pillow writes none): seven passes, filter 0 per row."""
    im = im.convert("RGB")
    w, h = im.size
    px = im.tobytes()
    raw = bytearray()
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                           (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        cols = range(x0, w, dx)
        if not cols:
            continue
        for y in range(y0, h, dy):
            raw.append(0)
            for x in cols:
                i = (y * w + x) * 3
                raw += px[i:i + 3]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x8298] = "(c) fuzz"
    return exif.tobytes()


def _big_endian_tiff() -> bytes:
    grey = picture(40, 30).convert("L")
    data = b"".join(bytes((v, v)) for v in grey.tobytes())  # 16-bit big-endian samples
    return _save(Image.frombytes("I;16B", grey.size, data), "TIFF")


def make_seeds() -> dict[str, bytes]:
    """Valid files of every input format, by name (the extension is the format's)."""
    base = picture(64, 48, seed=3)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    pal = base.quantize(16)
    pal.info["transparency"] = 0
    anim = _frames(3)
    return {
        "baseline.jpg": _save(base, "JPEG", quality=80),
        "progressive.jpg": _save(base, "JPEG", quality=80, progressive=True),
        "oriented.jpg": _save(base, "JPEG", exif=_exif(6)),
        "grey.jpg": _save(base.convert("L"), "JPEG"),
        "cmyk.jpg": _save(base.convert("CMYK"), "JPEG"),
        "large.jpg": _save(picture(640, 480, seed=1), "JPEG", quality=70),  # reduced-scale path
        "multi.mpo": _save(base, "MPO", save_all=True, append_images=[picture(64, 48, 4)]),
        "rgb.png": _save(base, "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "palette.png": _save(pal, "PNG"),
        "grey16.png": _save(base.convert("L").point(lambda v: v * 257, "I").convert("I;16"),
                            "PNG"),
        "interlaced.png": _interlaced_png(base),
        "oriented.png": _save(base, "PNG", exif=_exif(8)),
        "animated.png": _save(anim[0], "PNG", save_all=True, append_images=anim[1:],
                              duration=80),
        "lossy.webp": _save(base, "WEBP", quality=70),
        "lossless.webp": _save(rgba, "WEBP", lossless=True),
        "animated.webp": _save(anim[0], "WEBP", save_all=True, append_images=anim[1:],
                               duration=80),
        "still.avif": _save(base, "AVIF", quality=50),
        "static.gif": _save(pal, "GIF"),
        "animated.gif": _save(anim[0], "GIF", save_all=True, append_images=anim[1:],
                              duration=80, loop=0),
        "rgb.bmp": _save(base, "BMP"),
        "palette.bmp": _save(base.quantize(16), "BMP"),
        "le.tif": _save(base, "TIFF"),
        "be16.tif": _big_endian_tiff(),
        "pages.tif": _save(anim[0], "TIFF", save_all=True, append_images=anim[1:]),
        "lzw.tif": _save(base, "TIFF", compression="tiff_lzw"),
        "deflate.tif": _save(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "big.tif": _save(base, "TIFF", big_tiff=True),
    }


# --- fixed hostile files ------------------------------------------------------------------------

def png_header(width: int, height: int, depth: int = 8, colour: int = 0,
               idat: bytes | None = None) -> bytes:
    """A PNG with a valid IHDR (and CRC) declaring ``width`` x ``height``, and a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", idat if idat is not None else zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def grey_png_bomb(side: int = 13380) -> bytes:
    """A real, complete ``side`` x ``side`` 8-bit grey PNG (black; ~200 kB for 13380)."""
    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_header(side, side, idat=idat)


def hostile() -> dict[str, bytes]:
    """Fixed hostile cases: empty and tiny files, headers declaring huge sizes, non-images."""
    bmp = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, 50_000, 50_000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    gif = (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
           + b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;")
    tif = _tiff_header(100_000, 100_000)
    jpeg = bytearray(_save(picture(16, 16), "JPEG"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65500, 65500)
    webp = bytearray(_save(picture(16, 16), "WEBP", quality=50))
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (16383 - 1).to_bytes(3, "little") * 2
    webp = webp[:12] + vp8x + webp[12:]
    webp[4:8] = struct.pack("<I", len(webp) - 8)
    return {
        "empty.png": b"",
        "one-byte.jpg": b"\xff",
        "png-100000.png": png_header(100_000, 100_000),
        "png-zero.png": png_header(0, 10),
        "bmp-huge.bmp": bmp,
        "gif-huge.gif": gif,
        "tiff-huge.tif": tif,
        "jpeg-huge.jpg": bytes(jpeg),
        "webp-canvas.webp": bytes(webp),
        "notes.txt": b"shopping list\n- milk\n",
        "doc.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
        "meta.json": json.dumps({"camera": "x", "iso": 100}).encode(),
        "IMG_1.xmp": b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>',
        "noext": b"\x00\x01\x02 not an image at all",
    }


def _tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF declaring ``width`` x ``height`` grey pixels with a 1-byte strip."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
               (279, 4, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 9) + b"\x80" + ifd


# --- mutations ----------------------------------------------------------------------------------

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 65500, 100_000, 13380)


def _bitflip(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)


def _overwrite(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data)):]


def _junk(data: bytearray, rng: random.Random) -> None:
    at = rng.randrange(len(data) + 1)
    data[at:at] = rng.randbytes(rng.choice((1, 4, 16, 256, 4096)))


def _ranges(data: bytes) -> list[tuple[int, int]]:
    """Chunk / segment / box boundaries where the format has them, else a random range."""
    if data.startswith(b"\x89PNG"):
        out, i = [], 8
        while i + 12 <= len(data):
            n = struct.unpack(">I", data[i:i + 4])[0]
            end = min(i + 12 + n, len(data))
            out.append((i, end))
            i = end
        return out
    if data.startswith(b"\xff\xd8"):
        out, i = [], 2
        while i + 4 <= len(data) and data[i] == 0xFF:
            n = struct.unpack(">H", data[i + 2:i + 4])[0]
            out.append((i, min(i + 2 + n, len(data))))
            if data[i + 1] == 0xDA:
                break
            i += 2 + n
        return out
    if data[:4] == b"RIFF":
        out, i = [], 12
        while i + 8 <= len(data):
            n = struct.unpack("<I", data[i + 4:i + 8])[0]
            end = min(i + 8 + n + (n & 1), len(data))
            out.append((i, end))
            i = end
        return out
    return []


def _segment(data: bytearray, rng: random.Random) -> tuple[int, int]:
    ranges = _ranges(bytes(data))
    if ranges:
        return rng.choice(ranges)
    a = rng.randrange(len(data))
    return a, min(len(data), a + rng.choice((1, 8, 64, 512, 4096)))


def _duplicate(data: bytearray, rng: random.Random) -> None:
    a, b = _segment(data, rng)
    data[b:b] = data[a:b] * rng.choice((1, 1, 2, 50))


def _delete(data: bytearray, rng: random.Random) -> None:
    a, b = _segment(data, rng)
    del data[a:b]


def _bump(old: int, rng: random.Random, bits: int) -> int:
    mask = (1 << bits) - 1
    return rng.choice((*INTERESTING, old * rng.choice((2, 16, 256, 4096)), old + 1,
                       old - 1, rng.getrandbits(bits))) & mask


def _header(data: bytearray, rng: random.Random) -> None:
    """A targeted edit of a size, count or offset field the format's header has."""
    for edit in (_png_header, _jpeg_header, _gif_header, _bmp_header, _tiff_ifd, _webp_header,
                 _avif_header):
        if edit(data, rng):
            return
    _overwrite(data, rng)


def _set(data: bytearray, at: int, fmt: str, rng: random.Random) -> bool:
    size = struct.calcsize(fmt)
    if at < 0 or at + size > len(data):
        return False
    (old,) = struct.unpack_from(fmt, data, at)
    value = _bump(old, rng, size * 8)
    if fmt[-1] in "bhilq" and value >= 1 << (size * 8 - 1):  # a signed field
        value -= 1 << (size * 8)
    struct.pack_into(fmt, data, at, value)
    return True


def _png_header(data: bytearray, rng: random.Random) -> bool:
    if not data.startswith(b"\x89PNG"):
        return False
    targets = [(i, data[i + 4:i + 8]) for i, _ in _ranges(bytes(data))
               if data[i + 4:i + 8] in (b"IHDR", b"acTL", b"fcTL")]
    if not targets:
        return False
    i, kind = rng.choice(targets)
    field = {b"IHDR": rng.choice((0, 4)), b"acTL": rng.choice((0, 4)),
             b"fcTL": rng.choice((4, 8, 12, 16))}[bytes(kind)]
    _set(data, i + 8 + field, ">I", rng)
    n = struct.unpack(">I", data[i:i + 4])[0]
    if rng.random() < 0.8 and i + 12 + n <= len(data):  # a valid CRC: the edit is believed
        struct.pack_into(">I", data, i + 8 + n, zlib.crc32(data[i + 4:i + 8 + n]) & 0xFFFFFFFF)
    return True


def _jpeg_header(data: bytearray, rng: random.Random) -> bool:
    if not data.startswith(b"\xff\xd8"):
        return False
    sofs = [a for a, _ in _ranges(bytes(data)) if data[a + 1] in (0xC0, 0xC1, 0xC2)]
    if not sofs:
        return False
    a = rng.choice(sofs)
    return _set(data, a + rng.choice((5, 7)), ">H", rng) if rng.random() < 0.8 else _set(
        data, a + 9, "B", rng)


def _gif_header(data: bytearray, rng: random.Random) -> bool:
    if not data.startswith(b"GIF8"):
        return False
    descriptors = [i for i in range(13, len(data) - 9) if data[i] == 0x2C]
    if descriptors and rng.random() < 0.5:
        return _set(data, rng.choice(descriptors) + rng.choice((1, 3, 5, 7)), "<H", rng)
    return _set(data, rng.choice((6, 8)), "<H", rng)


def _bmp_header(data: bytearray, rng: random.Random) -> bool:
    if not data.startswith(b"BM"):
        return False
    at, fmt = rng.choice(((18, "<i"), (22, "<i"), (28, "<H"), (30, "<I"), (10, "<I"),
                          (14, "<I"), (46, "<I"), (34, "<I")))
    return _set(data, at, fmt, rng)


def _tiff_ifd(data: bytearray, rng: random.Random) -> bool:
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return False
    e = "<" if data[:2] == b"II" else ">"
    if rng.random() < 0.2:
        return _set(data, 4, e + "I", rng)  # where the first IFD is
    ifd = struct.unpack_from(e + "I", data, 4)[0]
    if ifd + 2 > len(data):
        return _set(data, 4, e + "I", rng)
    count = struct.unpack_from(e + "H", data, ifd)[0]
    if rng.random() < 0.2 or count == 0:
        return _set(data, ifd, e + "H", rng)  # how many entries
    entry = ifd + 2 + 12 * rng.randrange(count)
    field, fmt = rng.choice(((2, "H"), (4, "I"), (8, "I"), (8, "H")))
    return _set(data, entry + field, e + fmt, rng)  # type, count or value/offset


def _webp_header(data: bytearray, rng: random.Random) -> bool:
    if data[:4] != b"RIFF":
        return False
    chunks = {bytes(data[a:a + 4]): a for a, _ in _ranges(bytes(data))}
    if b"VP8X" in chunks and rng.random() < 0.4:
        at = chunks[b"VP8X"] + 8 + rng.choice((4, 7))
        if at + 3 <= len(data):
            data[at:at + 3] = _bump(int.from_bytes(data[at:at + 3], "little"), rng,
                                    24).to_bytes(3, "little")
            return True
    if b"ANMF" in chunks and rng.random() < 0.5:
        return _set(data, chunks[b"ANMF"] + 8 + rng.choice((6, 9, 12)), "<H", rng)
    if b"VP8 " in chunks:
        return _set(data, chunks[b"VP8 "] + 8 + rng.choice((6, 8)), "<H", rng)
    if b"VP8L" in chunks:
        return _set(data, chunks[b"VP8L"] + 9, "<I", rng)
    return _set(data, 4, "<I", rng)  # the RIFF size


def _avif_header(data: bytearray, rng: random.Random) -> bool:
    boxes = [i for i in range(len(data) - 16) if data[i:i + 4] in (b"ispe", b"iloc", b"pixi")]
    if data[4:8] != b"ftyp" or not boxes:
        return False
    at = rng.choice(boxes)
    return _set(data, at + 4 + rng.choice((4, 8, 12)), ">I", rng)


MUTATIONS: dict[str, Callable[[bytearray, random.Random], None]] = {
    "bitflip": _bitflip, "overwrite": _overwrite, "truncate": _truncate, "junk": _junk,
    "duplicate": _duplicate, "delete": _delete, "header": _header,
}


def mutate(seeds: dict[str, bytes], rng: random.Random) -> tuple[str, bytes, str]:
    """One case: (file name, bytes, what was done) from a random seed and 1-3 mutations."""
    name = rng.choice(sorted(seeds))
    data = bytearray(seeds[name])
    done = [name]
    if rng.random() < 0.08:  # a splice of two seeds
        other = rng.choice(sorted(seeds))
        data = data[:rng.randrange(1, len(data))] + seeds[other][rng.randrange(
            len(seeds[other])):]
        done.append(f"splice:{other}")
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        kind = rng.choice(("header", "header", *MUTATIONS))
        MUTATIONS[kind](data, rng)
        done.append(kind)
    ext = os.path.splitext(name)[1]
    if rng.random() < 0.05:
        ext = rng.choice((".dat", "", ".txt", ".JPG"))
    return os.path.splitext(name)[0] + ext, bytes(data), "+".join(done)


@dataclass(frozen=True)
class Case:
    index: int
    name: str  # the file name of the case (unique)
    data: bytes
    how: str


def cases(n: int, seed: int) -> Iterator[Case]:
    """The fixed hostile cases first, then ``n`` minus their number mutated ones."""
    fixed = hostile()
    for i, (name, data) in enumerate(sorted(fixed.items())):
        if i >= n:
            return
        yield Case(i, f"{i:05d}-{name}", data, "hostile")
    rng = random.Random(seed)
    seeds = make_seeds()
    for i in range(len(fixed), n):
        name, data, how = mutate(seeds, rng)
        yield Case(i, f"{i:05d}-{name}", data, how)


# --- running cases ------------------------------------------------------------------------------

def pipeline_sets() -> list[dict[str, Pipeline]]:
    """Two sets of pipelines, each case goes through one: those that start by shrinking (a
    JPEG is then decoded at reduced scale) and those that do not (full decode)."""
    every = pipelines()
    shrinking = ("thumbnail", "web", "processed", "awebp", "same", "avif", "bmp")
    return [{k: every[k] for k in shrinking}, {k: every[k] for k in every if k not in shrinking}]


def pipelines() -> dict[str, Pipeline]:
    """The built-in pipelines and one of each other output format, animations kept."""
    out = config.builtin_pipelines()

    def add(name: str, steps: list[str], **opts: Any) -> None:
        out[name] = config.pipeline_from(steps, name, name, OutputOptions(**opts))

    add("awebp", ["thumbnail(48, 48)"], format="webp", frames="all", max_frames=6)
    add("agif", ["resize_half"], format="gif", frames="all", max_frames=6)
    add("png", ["auto_orient", "rotate(30)", "sharpen"], format="png", metadata="keep",
        colour="keep")
    add("same", ["thumbnail(32, 32)", "autocontrast"], format="same", frames="all",
        max_frames=4, metadata="copyright")
    add("tiff", ["crop(24, 24)"], format="tiff", frames="all", max_frames=3)
    add("avif", ["thumbnail(24, 24)"], format="avif", quality=40)
    add("bmp", ["grayscale", "thumbnail(24, 24)"], format="bmp")
    return out


@dataclass(frozen=True)
class Outcome:
    case: Case
    reason: str  # "ok", a REASONS slug, or "hang" / "bad-output: ..." (the fuzzer's own)
    detail: str

    @property
    def bad(self) -> bool:
        known = self.reason == "ok" or self.reason in REASONS
        return not known or self.reason in BAD_REASONS


class _Hang(BaseException):
    """BaseException: the Processor must not catch it."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``_Hang`` in this block after ``seconds``; a timer already set (pytest-timeout's)
    is put back with what it had left."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    left, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if left:
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - t0), 1e-3),
                             interval)


def plan_task(seq: int, path: str, pipes: dict[str, Pipeline], out_dir: str,
              limits: DecodeLimits) -> Task:
    """The task the batch planner would make (output names from ``extensions.output_ext``)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    outputs = tuple(OutputPlan(pipeline=p.name, path=os.path.join(
        out_dir, f"{stem}_{p.suffix}{extensions.output_ext(p.output, path, limits.formats)}"))
        for p in pipes.values())
    return Task(seq=seq, path=path, outputs=outputs, overwrite=True, sync_dir=False)


def check_outputs(paths: tuple[str, ...]) -> str:
    """'' if every output exists and decodes, else what is wrong."""
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    im.load()
        except Exception as exc:
            return f"{path}: {type(exc).__name__}: {exc}"
    return ""


def run_case(proc: Processor, case: Case, in_dir: Path, out_dir: Path) -> Outcome:
    """Write ``case`` as a file, process it, check its fate; outputs are removed after."""
    path = in_dir / case.name
    path.write_bytes(case.data)
    try:
        with _deadline(DEADLINE):
            task = plan_task(case.index, str(path), proc.pipelines, str(out_dir), proc.limits)
            r = proc.run(task)
    except _Hang:
        path.unlink()
        return Outcome(case, "hang", f"took more than {DEADLINE} s")
    try:
        if r.ok:
            wrong = check_outputs(r.outputs)
            if len(r.outputs) != len(task.outputs):
                wrong = wrong or f"{len(r.outputs)} outputs of {len(task.outputs)}"
            return Outcome(case, f"bad-output: {wrong}" if wrong else "ok", wrong)
        return Outcome(case, r.reason, f"{r.error_type}: {r.error}"
                       + ("\n" + r.warnings[-1] if r.reason == "internal-error" else ""))
    finally:
        path.unlink()
        for name in os.listdir(out_dir):
            os.unlink(out_dir / name)


def fuzz(n: int, seed: int, work: Path, *, progress: bool = False) -> list[Outcome]:
    """Run ``n`` cases in this process; every outcome, in order."""
    in_dir, out_dir = work / "in", work / "out"
    in_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = [Processor(pipes, DecodeLimits(), MEMORY_CAP) for pipes in pipeline_sets()]
    outcomes = []
    t0 = time.monotonic()
    for case in cases(n, seed):
        outcomes.append(run_case(procs[case.index % len(procs)], case, in_dir, out_dir))
        if progress and (case.index + 1) % 500 == 0:
            print(f"  {case.index + 1} cases, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    """Reasons by count, as a small text table."""
    counts = collections.Counter(o.reason.split(":")[0] for o in outcomes)
    width = max(len(r) for r in counts)
    lines = [f"{'reason':<{width}}  cases      %"]
    for reason, n in counts.most_common():
        lines.append(f"{reason:<{width}}  {n:5d}  {100 * n / len(outcomes):5.1f}")
    lines.append(f"{'total':<{width}}  {len(outcomes):5d}")
    return "\n".join(lines)


def save_failures(outcomes: list[Outcome], folder: Path) -> list[Path]:
    """Each bad case's bytes, and a .txt beside it with how it was made and what happened."""
    saved = []
    for o in outcomes:
        if not o.bad:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / o.case.name
        path.write_bytes(o.case.data)
        (folder / f"{o.case.name}.txt").write_text(f"{o.case.how}\n{o.reason}\n{o.detail}\n")
        saved.append(path)
    return saved


def _report(outcomes: list[Outcome], folder: Path) -> str:
    bad = [o for o in outcomes if o.bad]
    saved = save_failures(outcomes, folder)
    lines = [table(outcomes)]
    lines += [f"{o.case.name} ({o.case.how}): {o.reason}: {o.detail}" for o in bad[:20]]
    if saved:
        lines.append(f"{len(saved)} failing cases saved in {folder}")
    return "\n".join(lines)


# --- the tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="watcher-fuzz-"))
    yield work
    shutil.rmtree(work, ignore_errors=True)


def test_the_seeds_are_valid_and_cover_every_format() -> None:
    formats = set()
    for name, data in make_seeds().items():
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            formats.add(im.format)
            if name.startswith(("animated", "pages", "multi")):
                assert getattr(im, "n_frames", 1) > 1, name
    assert formats >= {"JPEG", "MPO", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF"}


def test_the_cases_are_deterministic() -> None:
    first = [(c.name, c.data) for c in cases(60, SEED)]
    assert first == [(c.name, c.data) for c in cases(60, SEED)]
    assert first != [(c.name, c.data) for c in cases(60, SEED + 1)]


@pytest.mark.timeout(max(120, CASES // 5))
def test_every_mutated_input_gets_a_documented_fate(fuzz_dir: Path) -> None:
    outcomes = fuzz(CASES, SEED, fuzz_dir / "inproc")
    bad = [o for o in outcomes if o.bad]
    assert not bad, _report(outcomes, Path(tempfile.gettempdir()) / "watcher-fuzz-failures")
    reasons = {o.reason for o in outcomes}
    # the run meets the failures it is made for, and still succeeds on some inputs
    assert {"ok", "corrupt", "decompression-bomb", "not-an-image", "truncated"} <= reasons


@pytest.mark.timeout(180)
def test_mutated_inputs_through_real_worker_processes(fuzz_dir: Path) -> None:
    """A ``watcher batch`` run over a folder of cases: every item's fate is documented, no
    worker dies, nothing times out."""
    n = min(CASES, 300)
    folder = fuzz_dir / "batch-in"
    folder.mkdir()
    names = []
    for case in cases(n, SEED + 1):
        (folder / case.name).write_bytes(case.data)
        names.append(str(folder / case.name))
    listing = fuzz_dir / "inputs.txt"
    listing.write_text("".join(f"{name}\n" for name in names))
    report = fuzz_dir / "report.json"
    cmd = [sys.executable, "-m", "watcher", "batch", "--list", str(listing),
           "-o", str(fuzz_dir / "out"),
           "-p", "thumbnail", "-p", "web", "-p", "processed", "-j", "2", "--timeout", "60",
           "--max-worker-memory", str(MEMORY_CAP),
           "--report", str(report), "--no-progress", "--log-level", "error"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=fuzz_dir, env=env, capture_output=True, text=True,
                         timeout=170, check=False)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    items = json.loads(report.read_text())["items"]
    assert len(items) == n
    fates = collections.Counter(i.get("reason") or i["status"] for i in items)
    wrong = [i for i in items if i["status"] not in ("ok", "failed")
             or (i["status"] == "failed" and (i["reason"] in BAD_REASONS
                                              or i["reason"] not in REASONS))]
    assert not wrong, f"{fates}\n" + "\n".join(json.dumps(i)[:400] for i in wrong[:10])
    for item in items:
        if item["status"] == "ok":
            assert not check_outputs(tuple(item["outputs"])), item
    # no case pushed its worker above the cap (workers' peaks, from /proc, in the report)
    worst = max(i["worker_peak_rss_kb"] for i in items) * 1024
    assert 0 < worst <= MEMORY_CAP, f"a worker peaked at {worst / 2**20:.0f} MiB"


# --- tier 2 from the command line ---------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``scripts/fuzz --cases N --seed S``: run, print the reasons table, save failing cases."""
    ap = argparse.ArgumentParser(prog="scripts/fuzz", description=main.__doc__)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--failures", default="fuzz-failures",
                    help="folder for the failing cases (default: ./fuzz-failures)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="watcher-fuzz-"))
    t0 = time.monotonic()
    ceiling = memory.set_ceiling(MEMORY_CAP)  # this process is the worker here
    try:
        outcomes = fuzz(args.cases, args.seed, work, progress=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = memory.peak()
    print(f"{args.cases} cases, seed {args.seed}, {time.monotonic() - t0:.0f} s")
    print(f"memory: cap {memory.mib(MEMORY_CAP)} (ceiling {'on' if ceiling else 'off'}), "
          f"peak {memory.mib(peak)}")
    print(_report(outcomes, Path(args.failures)))
    return 1 if any(o.bad for o in outcomes) or peak > MEMORY_CAP else 0


if __name__ == "__main__":
    sys.exit(main())
