"""Decoding: the only module that reads image bytes, and the options of decoding and encoding.

Decoding is strict: only regular files are opened (FIFOs, sockets and devices never), symlinks are
refused without reading their target when asked (``inputfile``), only an allow-list of formats is
tried, a truncated image is an error, and a decompression-bomb warning is an error. Every failure
becomes a ``RejectedInput`` with a stable reason.

Whose fault is a failure (decided by evidence, never by an exception's type or errno):

- The decoder reads the input only through ``InputFile``, which keeps every ``OSError`` that the
  operating system's read, seek or tell of the input raised. A failure is ``io-error`` (not the
  input's fault: retried) only when such a read failure was recorded while decoding it.
- Anything else Pillow raises while parsing the bytes (``[Errno 22]`` from a seek to an offset
  the data gave, ``SyntaxError``, ``TypeError``, ``DecompressionBombError``...) is the data's
  fault: ``truncated``, ``corrupt``, ``decompression-bomb`` or ``not-an-image`` (quarantined).
- Writing mirrors it (see ``encode``): ``write-failed`` or ``encode-failed``.
- ``internal-error`` is left for errors raised by watcher's own code outside these regions.

``DecodeLimits`` ([input]) and ``OutputOptions`` (how an output is encoded) are the settings of
this package's work, declared in ``watcher.settings.schema``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from watcher.errors import RejectedInput
from watcher.imaging import inputfile
from watcher.imaging.formats import EXTERNAL, SCALABLE_FORMATS, open_order, sniff
from watcher.imaging.inputfile import InputFile
from watcher.imaging.pil import Image, UnidentifiedImageError, load_plugins, register_external

if TYPE_CHECKING:  # the settings types; the schema checks formats with this module
    from watcher.settings.schema import DecodeLimits

ORIENTATION = 0x0112  # the EXIF tag
# Formats whose decoder tells some metadata (a JPEG XL's ICC profile) only with the pixels.
_LATE_METADATA = frozenset({"JXL", "RAW"})


def ensure_formats(formats: tuple[str, ...]) -> None:
    """Image.open(formats=...) only knows loaded plugins: load the default formats' plugins
    when one is missing, and all ~40 only when that is not enough. A format from another
    library (HEIF, JXL, RAW) is registered when it is allowed."""
    register_external(formats)
    if any(f not in Image.OPEN for f in formats):
        load_plugins()
    if any(f not in Image.OPEN for f in formats):
        Image.init()


@dataclass(frozen=True, kw_only=True)
class Source:
    """A decoded input: its first frame (possibly drafted) and what is known about the file."""

    image: Image.Image
    format: str
    size: tuple[int, int]  # the stored size, before any reduced-scale decode
    n_frames: int
    bytes_in: int
    icc: bytes | None
    exif: bytes | None
    xmp: bytes | None
    file: InputFile | None = None  # kept open while later frames may be read

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _classify(path: str, exc: BaseException, failure: OSError | None) -> RejectedInput:
    """The reason for ``exc``, raised while Pillow read ``path``; ``failure`` is the evidence
    (``InputFile.failure``): the system's read of the input failed."""
    if isinstance(exc, RejectedInput):
        return exc
    if failure is not None:
        return RejectedInput("io-error", f"{path}: reading failed: {failure}")
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return RejectedInput("decompression-bomb", f"{path}: {exc}")
    if isinstance(exc, MemoryError):
        return RejectedInput("too-large", f"{path}: decoding it needed more memory than the "
                             "worker's max_worker_memory allows")
    text = str(exc)
    # ("unexpected end of file": libheif's word for a cut file)
    if "truncated" in text.lower() or "end of file" in text.lower() or isinstance(exc, EOFError):
        return RejectedInput("truncated", f"{path}: {text or type(exc).__name__}")
    return RejectedInput("corrupt", f"{path}: {type(exc).__name__}: {text}")


@contextlib.contextmanager
def _parsing(f: InputFile, path: str) -> Iterator[None]:
    """Pillow is parsing ``path``'s bytes here: any error is classified (``_classify``). Only
    Pillow's code runs inside (and watcher's few lines that read what it parsed, written not to
    raise), so an error here is the data's, not a bug of watcher."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except RejectedInput:
            raise
        except Exception as exc:
            raise _classify(path, exc, f.failure) from exc
    _trusted(f, path)


def _trusted(f: InputFile, path: str) -> None:
    """Refuse what was decoded if a read of the input failed on the way (a decoder that
    swallowed the error may hold data that is not the file's)."""
    if f.failure is not None:
        raise _classify(path, f.failure, f.failure) from f.failure


def decode(path: str, *, limits: DecodeLimits, nofollow: bool = False,
           plan: Callable[[Image.Image], tuple[str, tuple[int, int]] | None] | None = None,
           max_links: int = 0,
           admit: Callable[[Image.Image, str, int], None] | None = None) -> Source:
    """Open and fully decode the first frame of ``path``.

    ``plan(image)`` is called once the header of a single-frame JPEG is read (size, mode, EXIF
    known, no pixels yet); it may return (mode, size) to ask for a reduced-scale decode no
    smaller than ``size`` (libjpeg DCT scaling): a thumbnail of a 48 MP photo then never holds
    the full image. Other images are always decoded at full size. ``admit(image, format,
    frames)`` is called after that, still before any pixel is decoded (``image.size`` is the
    size the decode will have); it raises ``RejectedInput`` to refuse the input (the memory
    governor's estimate).
    """
    raw, nbytes = inputfile.open_regular(path, nofollow=nofollow,
                                         max_size=limits.max_file_size, max_links=max_links)
    f = InputFile(raw)
    try:
        load_plugins()
        ensure_formats(limits.formats)
        Image.MAX_IMAGE_PIXELS = limits.pixel_limit
        if "RAW" in limits.formats:
            from watcher.imaging import raw as raw_plugin  # noqa: PLC0415 - loaded by now

            raw_plugin.MODE = limits.raw
        im, fmt, n_frames, meta = _header(f, path, limits)
        stored = im.size
        draft = plan(im) if plan is not None and fmt in SCALABLE_FORMATS and n_frames == 1 \
            else None
        with _parsing(f, path):
            if draft is not None:
                mode, size = draft
                if im.mode != "RGB":
                    mode = im.mode  # only YCbCr colour JPEGs have a luma-only shortcut
                im.draft(mode, size)
        if admit is not None:
            admit(im, fmt, n_frames)
        with _parsing(f, path):
            im.load()
        if n_frames == 1:
            f.close()  # keep the file only where more frames may be read
        if fmt in _LATE_METADATA:
            meta = _metadata(im)
        icc, exif, xmp = meta
        return Source(image=im, format=fmt, size=stored, n_frames=n_frames, bytes_in=nbytes,
                      icc=icc, exif=exif, xmp=xmp, file=f if n_frames > 1 else None)
    except BaseException:
        f.close()
        raise


def probe(path: str, *, limits: DecodeLimits, nofollow: bool = False) -> tuple[str, int, int]:
    """Read only the header of ``path`` as ``decode`` would (the same limits and allowed
    decoders): its format, pixel count and frames, or the ``RejectedInput`` a header-level
    fault gets (not an image, a format not allowed, too large, a damaged header). A fault in
    the pixels is found only by decoding them."""
    raw, _ = inputfile.open_regular(path, nofollow=nofollow, max_size=limits.max_file_size)
    f = InputFile(raw)
    try:
        load_plugins()
        ensure_formats(limits.formats)
        Image.MAX_IMAGE_PIXELS = limits.pixel_limit
        im, fmt, n_frames, _ = _header(f, path, limits)
        return fmt, im.width * im.height, n_frames
    finally:
        f.close()


def _header(f: InputFile, path: str, limits: DecodeLimits,
            ) -> tuple[Image.Image, str, int, tuple[bytes | None, bytes | None, bytes | None]]:
    """Open ``f`` with the allowed decoders and read what the header tells: the image (no
    pixels yet), its format, frame count and metadata."""
    with _parsing(f, path):
        try:
            im = Image.open(f, formats=open_order(limits.formats))
        except UnidentifiedImageError as exc:
            raise _unidentified(f, path, limits) from exc
        if im.width <= 0 or im.height <= 0:
            raise ValueError(f"the image has no pixels ({im.width}x{im.height})")
        n_frames = int(getattr(im, "n_frames", 1))
        if n_frames < 1:
            raise ValueError(f"the image has {n_frames} frames")
        if n_frames > 1:
            im.seek(0)  # counting the frames may have moved it
        return im, im.format or "?", n_frames, _metadata(im)


def _unidentified(f: InputFile, path: str, limits: DecodeLimits) -> RejectedInput:
    if f.failure is not None:
        return _classify(path, f.failure, f.failure)
    f.seek(0)
    head = f.read(16)
    f.seek(0)
    Image.init()  # every format, to tell "not allowed" from "not an image"
    register_external(tuple(EXTERNAL))
    try:
        with Image.open(f) as other:
            fmt = other.format
    except Exception:  # noqa: BLE001 - any failure here means: not an image we know
        fmt = None
    if f.failure is not None:
        return _classify(path, f.failure, f.failure)
    if fmt is None:
        sniffed = sniff(head)  # a file that starts like one but that no decoder accepts
        if sniffed and sniffed in limits.formats:  # has a damaged header, not "not-an-image"
            return RejectedInput("corrupt", f"{path}: looks like {sniffed} but its header "
                                 "cannot be read")
        return RejectedInput("not-an-image", f"{path}: not a recognised image "
                             f"(allowed: {', '.join(limits.formats)})")
    return RejectedInput("format-not-allowed", f"{path}: {fmt} is not in the allowed formats "
                                               f"({', '.join(limits.formats)})")


def _metadata(im: Image.Image) -> tuple[bytes | None, bytes | None, bytes | None]:
    """ICC profile, EXIF and XMP as bytes; a value of any other type (a damaged header can
    give one) is left out."""
    icc = im.info.get("icc_profile") or None
    exif = im.info.get("exif") or None
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp") or None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    return tuple(v if isinstance(v, bytes) else None for v in (icc, exif, xmp))  # type: ignore[return-value]


def frames(src: Source, path: str, limit: int) -> Iterator[tuple[Image.Image, int]]:
    """Yield (frame, duration ms) for the first ``limit`` frames of an animated source."""
    im = src.image
    evidence = src.file if src.file is not None else InputFile(io.BytesIO())
    for i in range(min(src.n_frames, limit)):
        with _parsing(evidence, path):
            im.seek(i)
            im.load()
            frame = im.copy()
            duration = frame_duration(im.info.get("duration"), 100)
        yield frame, duration


def frame_duration(value: Any, default: int) -> int:
    """A frame's duration in ms from what the file says (anything but 1 ms to 1 hour: default)."""
    try:
        ms = int(value or default)
    except (TypeError, ValueError, OverflowError):
        return default
    return ms if 0 < ms <= 3_600_000 else default
