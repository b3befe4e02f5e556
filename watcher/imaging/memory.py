"""The memory governor: how much a worker may use, what an input will need, and the ceiling.

Three parts, so that no input, however it is made, takes more than one worker's share and none
takes the service down (a kernel OOM kill of the cgroup would end every worker and the daemon):

- **The cap** (``max_worker_memory``): bytes one worker process may use. Its default is the
  memory this process may use (the machine's, or its cgroup's ``memory.max`` when lower: a
  systemd ``MemoryMax=``, a container's limit), less ``RESERVE`` for the daemon itself, shared
  between the workers.
- **The estimate**, from the header, before a pixel is decoded (``estimate``): the decoded frame
  (at the reduced scale a JPEG is drafted to), the decoder's own buffers, the working copy, each
  pipeline's intermediate images (sizes computed from the steps: a 45-degree rotation's bounding
  box, an upscale), every frame an animation keeps, and the encoder's buffers. An input whose
  estimate does not fit in the cap (less what a fresh worker uses) is ``too-large``, with the
  estimate in the message, and is never decoded. The estimate is the same for an input whatever
  else the worker did before: nobody else is charged for it.
- **The ceiling** (``set_ceiling``): the worker's data segment is limited to the cap less its
  mapped code (``RLIMIT_DATA``: every heap and anonymous mapping), so what
  the estimate misses (a decoder's own allocations, a user transform) fails that input with a
  ``MemoryError`` (``too-large``, "needed more than max_worker_memory") instead of growing; the
  worker then ends after that task and a fresh one takes its place. A worker whose resident size
  stays above half its cap after a task (fragmentation) is recycled too (``worn``).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from watcher.imaging.formats import ALPHA_FORMATS, ANIMATED_FORMATS

MiB = 1024 * 1024
RESERVE = 256 * MiB  # for the daemon (or batch coordinator), the forkserver and the tracker
MIN_CAP = 128 * MiB  # below this a worker cannot even hold its libraries and one small photo
BASELINE = 64 * MiB  # what a fresh worker uses before its first task (measured: 30-45 MiB)

# Bytes per pixel as Pillow stores each mode (RGB is stored in 4 bytes, as RGBX).
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4,
           "F": 4, "LA": 4, "La": 4, "PA": 4, "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4,
           "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4}
# The decoder's own buffers, in bytes per stored pixel, beyond the image it fills (measured with
# Pillow 11): WebP's decoder keeps a canvas and hands back copies, AVIF decodes to YUV first,
# GIF keeps the previous frame; a progressive JPEG keeps every DCT coefficient (2 bytes for each
# of ~1.5 samples per pixel).
_DECODER = {"WEBP": 12.0, "AVIF": 8.0, "GIF": 2.0,
            # Not measured, by the libraries' designs: libheif decodes to YCbCr planes and
            # pillow-heif copies them out; libjxl works in 32-bit floats per channel and
            # pillow-jxl-plugin hands back a copy of the pixels; LibRaw holds the sensor's
            # 16-bit samples, its 4x16-bit image while demosaicing and rawpy's 8-bit output.
            "HEIF": 8.0, "JXL": 24.0, "RAW": 16.0}
_PROGRESSIVE_JPEG = 3.0
# A 16-bit or float image scaled to 8 bits goes through 32-bit and float copies.
_DEEP = 8.0
# The encoder's buffers, in bytes per output pixel (measured): the WebP encoder's RGBA copy,
# its bytes, libwebp's ARGB and YUV pictures and analysis; libavif's YUV and libaom's frames;
# libjpeg's coefficients when optimising or progressive.
_ENCODER = {"JPEG": 0.5, "WEBP": 38.0, "AVIF": 36.0, "PNG": 0.5, "TIFF": 1.0, "BMP": 1.0,
            "GIF": 3.0, "HEIF": 36.0, "JXL": 40.0}  # (HEIF's x265 and libjxl: not measured)
# (libwebp's buffers grow with the image's entropy and alpha, and nothing in a header tells:
# measured on 4 MP, 8-16 for flat images, 11-32 for smooth ones, 20-37 for noise, the RGBA copy
# of an image without alpha included; the estimate takes the worst)
_WEBP_LOSSLESS = 14.0  # lossless WebP's hash chains and backward references: 37-51 for noise

_FLATTEN = 16.0  # alpha flattened onto a background for a format without it: four copies
_JPEG_CODED = 3.0  # optimize / progressive JPEG: the whole image's coefficients
_ANIMATED_FRAME = 3.0  # per output frame of an animation, beyond the frame (the encoder's)
# Steps that make temporaries beyond their output, in outputs: the filters and enhancers make
# their result and one more image; on an image with alpha they also split off the alpha band
# and a copy without it (_colour_only), as a resize premultiplies alpha in a copy.
_HEAVY = {"blur": 2.0, "sharpen": 2.0, "edge_enhance": 2.0, "find_edges": 2.0,
          "autocontrast": 2.0, "equalize": 2.0, "brightness": 2.0, "contrast": 2.0,
          "rotate": 1.1}
_ALPHA_COPY = 1.25


def stored_bpp(mode: str) -> int:
    return _STORED.get(mode, 4)


def _working_bpp(mode: str) -> int:
    """Bytes per pixel of the working mode ``colour.to_working`` makes from ``mode``."""
    return 1 if mode in ("1", "L") else 4


def machine_limit() -> int:
    """Bytes this process may use: the machine's memory, or its cgroup's limit when lower."""
    limits = [_meminfo_total()]
    limits += _cgroup_limits()
    known = [v for v in limits if v > 0]
    return min(known) if known else 0


def _kib_fields(path: str, *names: bytes) -> int | None:
    """The sum of the ``name: N kB`` lines of a /proc file, in bytes; None if it has none or
    cannot be read."""
    total, seen = 0, False
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(names):
                    total, seen = total + int(line.split()[1]) * 1024, True
    except (OSError, ValueError, IndexError):
        return None
    return total if seen else None


def _meminfo_total() -> int:
    total = _kib_fields("/proc/meminfo", b"MemTotal:")
    if total:
        return total
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0


def _cgroup_limits() -> list[int]:
    """The memory limits of this process's cgroup and its ancestors (v2 ``memory.max`` and
    ``memory.high``, v1 ``memory.limit_in_bytes``); "max" and absurd values are no limit."""
    out: list[int] = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            root, names = "/sys/fs/cgroup", ("memory.max", "memory.high")
        elif "memory" in controllers.split(","):
            root, names = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes",)
        else:
            continue
        rel = path.strip("/")
        while True:
            for name in names:
                value = _read_limit(os.path.join(root, rel, name))
                if value:
                    out.append(value)
            if not rel:
                break
            rel = os.path.dirname(rel)
    return out


def _read_limit(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    if not text.isdigit():
        return 0  # "max"
    value = int(text)
    return value if value < 1 << 60 else 0  # v1's "no limit" is a huge number


def default_cap(workers: int, limit: int | None = None) -> int:
    """``max_worker_memory`` when it is not set: (limit - RESERVE) / workers, at least
    MIN_CAP, rounded down to a MiB."""
    limit = machine_limit() if limit is None else limit
    if limit <= 0:
        return 4096 * MiB
    share = (limit - RESERVE) // max(workers, 1)
    return max(MIN_CAP, share // MiB * MiB)


def resolve(setting: int, workers: int) -> int:
    """The cap in bytes: the setting, or (0) its default for ``workers`` workers."""
    return setting if setting > 0 else default_cap(workers)


def rss() -> int:
    """This process's resident size now, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak() -> int:
    """This process's peak resident size so far, in bytes (VmHWM: unlike ``ru_maxrss``, not
    carried over from the program that exec'd it)."""
    hwm = _kib_fields("/proc/self/status", b"VmHWM:")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


FILE_SLACK = 32 * MiB  # code of libraries loaded later (libavif, libtiff's codecs)


def _file_resident() -> int:
    """Resident bytes that are not data: mapped files (the interpreter's and libraries' code)
    and shared memory; they count in the resident size but not in RLIMIT_DATA."""
    return _kib_fields("/proc/self/status", b"RssFile:", b"RssShmem:") or 0


def set_ceiling(cap: int) -> bool:
    """Limit this process so that its resident size stays within ``cap`` bytes: its data
    segment (heap and anonymous mappings, ``RLIMIT_DATA``) gets the cap less what is resident
    but not data (mapped code, with FILE_SLACK for libraries loaded later). An allocation
    beyond it fails (``MemoryError``) instead of growing the process. False where the system
    has no such limit (or refuses it)."""
    limit = max(cap - _file_resident() - FILE_SLACK, cap // 2)
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (OSError, ValueError, AttributeError):
        return False
    return True


def trim() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``), where there is one."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


@dataclass(frozen=True, kw_only=True)
class Need:
    """An estimate: the peak bytes a task needs beyond the worker's baseline, and what for."""

    peak: int
    size: tuple[int, int]  # the decoded size (after a reduced-scale decode)
    mode: str
    frames: int  # frames held at once at the peak

    def describe(self) -> str:
        f = f", {self.frames} frames" if self.frames > 1 else ""
        return f"{self.size[0]}x{self.size[1]} {self.mode}{f}"


def estimate(size: tuple[int, int], mode: str, fmt: str, n_frames: int,
             pipelines: Iterable[tuple[Any, str]], *, progressive: bool = False,
             colour_copy: bool = False, alpha: bool = False, orientation: int = 1) -> Need:
    """Peak bytes to decode an image of ``size`` (already reduced, for a drafted JPEG) in
    ``mode`` and ``fmt`` and run ``pipelines`` ((Pipeline, output format) pairs) on it.

    The phases follow ``processor.Processor``: decode (the image and the decoder's buffers);
    the working copy (a new image unless the mode is L/LA/RGB/RGBA, and one more for a colour
    conversion); then, with the working image held, each pipeline's steps (each step's input
    and output alive together, and their temporaries), its frames when it keeps an animation,
    and its encoder's buffers. ``alpha``: the image has (or gets) an alpha band;
    ``orientation``: its EXIF orientation (a turn is a copy).
    """
    w, h = size
    px = w * h
    decoded = px * stored_bpp(mode)
    decoder = px * (_DECODER.get(fmt, 0.0) + (_PROGRESSIVE_JPEG if progressive else 0.0))
    working_bpp = _working_bpp(mode)
    working = 0.0 if mode in ("L", "LA", "RGB", "RGBA") else px * working_bpp
    if mode.startswith("I") or mode == "F":
        working += px * _DEEP
    if colour_copy:
        working += px * working_bpp
    peak = max(decoded + decoder, decoded + working)  # both alive while converting
    base = px * working_bpp if working else decoded
    frames_held = 1
    for p, out_fmt in pipelines:
        animated = (n_frames > 1 and p.output.frames == "all"
                    and out_fmt in ANIMATED_FORMATS)
        frames = min(n_frames, p.output.max_frames) if animated else 1
        turn = p.output.auto_orient and orientation not in (0, 1)
        step_peak, out_bytes, out_px = _pipeline_peak((w, h), working_bpp, p, alpha, turn)
        enc = out_px * _ENCODER.get(out_fmt, 2.0)
        if out_fmt == "JPEG" and (p.output.optimize or p.output.progressive):
            enc += out_px * _JPEG_CODED
        if out_fmt == "WEBP" and p.output.lossless:
            enc += out_px * _WEBP_LOSSLESS
        if alpha and out_fmt not in ALPHA_FORMATS:
            enc += out_px * _FLATTEN
        if frames > 1:
            # every output frame is kept for the encoder; each source frame is decoded into
            # the decoder's canvas and copied
            per_frame = max(out_bytes, out_px * working_bpp) + out_px * _ANIMATED_FRAME
            run = frames * per_frame + step_peak + 2 * decoded + decoder + enc
            frames_held = max(frames_held, frames)
        else:
            run = max(step_peak, out_bytes + enc)
        peak = max(peak, base + run)
    return Need(peak=math.ceil(peak), size=(w, h), mode=mode, frames=frames_held)


def _pipeline_peak(size: tuple[int, int], bpp: int, p: Any, alpha: bool,
                   turn: bool) -> tuple[float, float, int]:
    """(peak bytes while the steps run, bytes of the final image, its pixels), with the
    pipeline's input not counted (the caller holds it)."""
    from watcher import transforms  # noqa: PLC0415

    w, h = size
    cur = 0.0  # bytes of the current image when it is not the pipeline's input
    peak = 0.0
    if turn:
        peak = cur = w * h * bpp  # a transposed copy
    for step in p.steps:
        spec = step.spec
        params = dict(step.params)
        name = spec.name if spec is not None else ""
        out_bpp = 1 if name == "grayscale" else bpp
        if spec is not None and spec.size is not None:
            nw, nh = spec.size((w, h), **params)
        elif name == "rotate":
            d = params.get("degrees", 0) % 360
            nw, nh = (h, w) if d in (90, 270) else (w, h)
            if d % 90 and params.get("expand", True):
                nw, nh = transforms.rotated_size((w, h), d)
        elif name == "crop":
            nw, nh = min(params["width"], w), min(params["height"], h)
        else:
            nw, nh = w, h  # orientation, flips, filters, user callables: the same size
        out = nw * nh * out_bpp
        temp = out * (_HEAVY.get(name, 1.0 if spec is not None else 2.0) - 1.0)
        if alpha and name in _HEAVY and name != "rotate":
            temp += w * h * bpp * _ALPHA_COPY
        if spec is not None and spec.size is not None and (nw, nh) != (w, h):
            temp += nw * h * bpp  # the separable resize's first pass
            if alpha:
                temp += w * h * bpp  # alpha premultiplied in a copy
        if name == "grayscale" and alpha:
            temp += w * h  # the alpha band
        peak = max(peak, cur + out + temp)
        cur, w, h, bpp = out, nw, nh, out_bpp
    return peak, cur, w * h


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"
