"""Decoding and encoding: the only module that reads image bytes or writes encoded ones.

Decoding is strict: only regular files are opened (FIFOs, sockets and devices never), symlinks are
refused without reading their target when asked, only an allow-list of formats is tried, a
truncated image is an error, and a decompression-bomb warning is an error. Every failure becomes a
``RejectedInput`` with a stable reason.

Encoding never fails for a mode mismatch: the image is brought to a mode the format can store,
alpha is flattened onto a background where the format has none, 16-bit and float images are
*scaled* to 8 bits, CMYK goes through its ICC profile, and the colour and metadata policies decide
which ICC profile, EXIF and XMP the output carries.

Whose fault is a failure (decided by evidence, never by an exception's type or errno):

- The decoder reads the input only through ``InputFile``, which keeps every ``OSError`` that the
  operating system's read, seek or tell of the input raised. A failure is ``io-error`` (not the
  input's fault: retried) only when such a read failure was recorded while decoding it.
- Anything else Pillow raises while parsing the bytes (``[Errno 22]`` from a seek to an offset
  the data gave, ``SyntaxError``, ``TypeError``, ``DecompressionBombError``...) is the data's
  fault: ``truncated``, ``corrupt``, ``decompression-bomb`` or ``not-an-image`` (quarantined).
- Writing mirrors it: an ``OSError`` the output file itself raised is ``write-failed``; every
  other error of an encoder (``encoder error -2``, libwebp's ``RuntimeError``, an errno of its
  own) is ``encode-failed`` (see ``pipeline._encode``).
- ``internal-error`` is left for errors raised by watcher's own code outside these regions.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import IO, Any

from watcher.errors import RejectedInput
from watcher.imaging.pil import Image, ImageCms, ImageColor, UnidentifiedImageError, load_plugins
from watcher.settings.schema import DecodeLimits, OutputOptions


def ensure_formats(formats: tuple[str, ...]) -> None:
    """Image.open(formats=...) only knows loaded plugins: load the default formats' plugins
    when one is missing, and all ~40 only when that is not enough."""
    if any(f not in Image.OPEN for f in formats):
        load_plugins()
    if any(f not in Image.OPEN for f in formats):
        Image.init()

# Formats opened by default (Pillow format names). Configurable per run.
# (MPO, a JPEG with extra frames, is opened by the JPEG plugin.)
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "AVIF": ".avif", "BMP": ".bmp",
              "TIFF": ".tif", "GIF": ".gif", "MPO": ".jpg"}
# Output formats that store more than one frame.
ANIMATED_FORMATS = {"GIF", "WEBP", "PNG", "TIFF", "AVIF"}
ALPHA_FORMATS = {"PNG", "WEBP", "AVIF", "TIFF", "GIF"}
ORIENTATION = 0x0112
COPYRIGHT_TAGS = (0x013B, 0x8298)  # Artist, Copyright


@dataclass(frozen=True)
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


# A read larger than this is clamped to what the file holds (a size from the data must not
# make the reader allocate it).
_BIG_READ = 1 << 24


class InputFile:
    """The input file as the decoder sees it: the evidence of whose fault a failure is.

    Every ``OSError`` raised by the operating system's read, seek or tell of the file is kept in
    ``failure`` (and re-raised). A position the data asks for never reaches the system unless
    the file has it: a negative one is refused (``ValueError``, as ``io.BytesIO`` does), one
    past the end is kept here and reads nothing, as a file would (``lseek`` refuses offsets
    past the file system's largest file with ``EINVAL``, which is then the data's doing, not
    the disk's). ``fileno`` is withheld: a decoder (libtiff) that would read the descriptor
    itself reads through here instead.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.failure: OSError | None = None
        self._beyond: int | None = None  # a position past the end of the file
        self._known = 0  # a size the file had: positions up to it exist (fstat when past it)

    def _system(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            if self.failure is None:
                self.failure = exc
            raise

    def read(self, n: int | None = -1) -> bytes:
        if self._beyond is not None:
            return b""
        n = -1 if n is None else n
        if n > _BIG_READ:
            n = min(n, max(self._size() - self.tell(), 0))
        return self._system(self._raw.read, n)  # type: ignore[no-any-return]

    def readinto(self, buffer: Any) -> int:
        if self._beyond is not None:
            return 0
        return self._system(self._raw.readinto, buffer)  # type: ignore[attr-defined,no-any-return]

    def readline(self, limit: int | None = -1) -> bytes:
        if self._beyond is not None:
            return b""
        return self._system(self._raw.readline, -1 if limit is None else limit)  # type: ignore[no-any-return]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            target = offset
        elif whence == os.SEEK_CUR:
            target = self.tell() + offset
        elif whence == os.SEEK_END:
            target = self._size() + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target > self._known:
            self._known = self._size()
        if target > self._known:
            self._system(self._raw.seek, self._known)
            self._beyond = target
            return target
        self._beyond = None
        return self._system(self._raw.seek, target)  # type: ignore[no-any-return]

    def tell(self) -> int:
        if self._beyond is not None:
            return self._beyond
        return self._system(self._raw.tell)  # type: ignore[no-any-return]

    def _size(self) -> int:
        return self._system(os.fstat, self._raw.fileno()).st_size  # type: ignore[no-any-return]

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno: the input is read through watcher.imaging.codec")

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        self._raw.close()


# --- opening ------------------------------------------------------------------------------------

def open_regular(path: str, *, nofollow: bool, max_size: int = 0,
                 max_links: int = 0) -> tuple[IO[bytes], int]:
    """Open ``path`` for reading only if it is a regular file: opened first (``O_NONBLOCK``:
    never block on a FIFO; ``O_NOFOLLOW`` with ``nofollow``), then judged by ``fstat`` of the
    descriptor, so what is checked is what is read. ``max_links`` (0: no check) refuses a file
    with more hard links than that (its data may belong to a file elsewhere)."""
    try:
        pre = os.lstat(path)
    except FileNotFoundError as exc:
        raise RejectedInput("missing", f"{path}: no such file") from exc
    except OSError:
        pre = None  # (ENAMETOOLONG, EACCES...) the open below says what it is
    if pre is not None and stat.S_ISLNK(pre.st_mode) and not nofollow:
        try:
            pre = os.stat(path)
        except OSError:
            pre = None  # dangling, or worse: the open below says what it is
    if pre is not None and not stat.S_ISREG(pre.st_mode) and not stat.S_ISLNK(pre.st_mode):
        # a device or FIFO is never opened: opening some devices acts (a tape rewinds)
        raise RejectedInput("not-a-file", f"{path} is not a regular file ({_kind(pre.st_mode)})")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | \
        (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        if os.path.lexists(path):
            raise RejectedInput("missing", f"{path}: dangling symbolic link") from exc
        raise RejectedInput("missing", f"{path}: no such file") from exc
    except PermissionError as exc:
        raise RejectedInput("permission-denied", f"{path}: {exc.strerror}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise RejectedInput("symlink",
                                f"{path} is a symbolic link; links are not followed") from exc
        if exc.errno == errno.ENAMETOOLONG:
            raise RejectedInput("path-too-long", f"{path}: {exc.strerror}") from exc
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # a socket, a device without a driver
            raise RejectedInput("not-a-file", f"{path} is not a regular file") from exc
        raise RejectedInput("permission-denied", f"{path}: {exc.strerror}") from exc
    st = os.fstat(fd)  # the file we opened, not the name we looked at
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = RejectedInput("not-a-file",
                                f"{path} is not a regular file ({_kind(st.st_mode)})")
    elif max_links and st.st_nlink > max_links:
        problem = RejectedInput("hard-link", f"{path} has {st.st_nlink} hard links; its data "
                                             "may belong to a file elsewhere")
    elif max_size and st.st_size > max_size:
        problem = RejectedInput("too-large", f"{path} is {st.st_size} bytes; max_file_size is "
                                             f"{max_size}")
    if problem is not None:
        os.close(fd)
        raise problem
    return os.fdopen(fd, "rb"), st.st_size


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


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
    if "truncated" in text.lower() or isinstance(exc, EOFError):
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
    raw, nbytes = open_regular(path, nofollow=nofollow, max_size=limits.max_file_size,
                               max_links=max_links)
    f = InputFile(raw)
    try:
        load_plugins()
        ensure_formats(limits.formats)
        Image.MAX_IMAGE_PIXELS = limits.pixel_limit
        im, fmt, n_frames, meta = _header(f, path, limits)
        stored = im.size
        draft = plan(im) if plan is not None and fmt in ("JPEG", "MPO") and n_frames == 1 \
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
        return Source(im, fmt, stored, n_frames, nbytes, *meta, f if n_frames > 1 else None)
    except BaseException:
        f.close()
        raise


def _header(f: InputFile, path: str, limits: DecodeLimits,
            ) -> tuple[Image.Image, str, int, tuple[bytes | None, bytes | None, bytes | None]]:
    """Open ``f`` with the allowed decoders and read what the header tells: the image (no
    pixels yet), its format, frame count and metadata."""
    with _parsing(f, path):
        try:
            im = Image.open(f, formats=limits.formats)
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


# Signatures of the formats watcher opens by default: a file that starts like one of them but
# that no decoder accepts has a damaged header ("corrupt"), not "not-an-image".
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"),
          (b"MM\x00+", "TIFF"))


def _sniff(head: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def _unidentified(f: InputFile, path: str, limits: DecodeLimits) -> RejectedInput:
    if f.failure is not None:
        return _classify(path, f.failure, f.failure)
    f.seek(0)
    head = f.read(16)
    f.seek(0)
    Image.init()  # every format, to tell "not allowed" from "not an image"
    try:
        with Image.open(f) as other:
            fmt = other.format
    except Exception:  # noqa: BLE001 - any failure here means: not an image we know
        fmt = None
    if f.failure is not None:
        return _classify(path, f.failure, f.failure)
    if fmt is None:
        sniffed = _sniff(head)
        if sniffed and sniffed in limits.formats:
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


# --- bringing pixels to a working form ----------------------------------------------------------

def to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float image to 8-bit L: the full range maps to 0-255."""
    if im.mode.startswith("I;16"):
        # via "I": point() on I;16 ignores a requested output mode
        return im.convert("I").point(lambda v: v * (255 / 65535) + 0.5).convert("L")
    if im.mode == "I":
        lo, hi = im.getextrema()
        if lo >= 0 and hi <= 255:
            return im.convert("L")
        if lo >= 0 and hi <= 65535:
            return im.point(lambda v: v * (255 / 65535) + 0.5).convert("L")
        lo = min(lo, 0)
        return im.point(lambda v: (v - lo) * (255 / (hi - lo)) + 0.5).convert("L")
    if im.mode == "F":
        lo, hi = im.getextrema()
        if lo >= 0 and hi <= 1.0:
            return im.point(lambda v: v * 255 + 0.5).convert("L")
        lo = min(lo, 0.0)
        span = (hi - lo) or 1.0
        return im.point(lambda v: (v - lo) * (255 / span) + 0.5).convert("L")
    return im


@cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@cache
def srgb_icc() -> bytes:
    return _srgb().tobytes()


def _profile(icc: bytes) -> ImageCms.ImageCmsProfile | None:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError, TypeError, ValueError):
        return None


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    desc = (profile.profile.profile_description or "").lower()
    return "srgb" in desc


def _space(profile: ImageCms.ImageCmsProfile) -> str:
    return (profile.profile.xcolor_space or "").strip().upper()


def to_working(im: Image.Image, icc: bytes | None, colour: str, notes: list[str]) -> Image.Image:
    """``im`` in L, LA, RGB or RGBA, converted to sRGB through ``icc`` when ``colour`` asks."""
    profile = _profile(icc) if icc else None
    if icc and profile is None:
        notes.append("icc profile unreadable; colours taken as sRGB")
    if im.mode == "CMYK":
        if profile is not None and _space(profile) == "CMYK":
            try:
                return ImageCms.profileToProfile(im, profile, _srgb(), outputMode="RGB")
            except ImageCms.PyCMSError as exc:
                notes.append(f"cmyk profile conversion failed ({exc}); naive conversion used")
        return im.convert("RGB")  # Adobe-inverted CMYK is already un-inverted by the decoder
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = to_8bit(im)
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    elif im.mode in ("La", "RGBa"):
        im = im.convert({"La": "LA", "RGBa": "RGBA"}[im.mode])
    elif im.mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    elif im.mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")  # YCbCr, LAB, HSV, RGBX
    if (colour == "srgb" and profile is not None and im.mode in ("RGB", "RGBA")
            and _space(profile) == "RGB" and not _is_srgb(profile)):
        im = _convert_rgb(im, profile, notes)
    return im


def _convert_rgb(im: Image.Image, profile: ImageCms.ImageCmsProfile,
                 notes: list[str]) -> Image.Image:
    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    rgb = im.convert("RGB") if alpha is not None else im
    try:
        out = ImageCms.profileToProfile(rgb, profile, _srgb(), outputMode="RGB")
    except ImageCms.PyCMSError as exc:
        notes.append(f"icc conversion to sRGB failed ({exc}); pixels left as they are")
        return im
    if alpha is not None:
        out.putalpha(alpha)
    return out


# --- encoding -----------------------------------------------------------------------------------

def fit_mode(im: Image.Image, fmt: str, background: str) -> Image.Image:
    """Bring ``im`` to a mode ``fmt`` stores, flattening alpha where ``fmt`` has none."""
    im = to_working(im, None, "keep", []) if im.mode not in ("L", "LA", "RGB", "RGBA") else im
    has_alpha = im.mode in ("LA", "RGBA")
    if has_alpha and fmt not in ALPHA_FORMATS:
        im = flatten(im, background)
    if fmt == "GIF" and im.mode == "LA":
        im = im.convert("RGBA")
    if fmt in ("BMP",) and im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return im


def flatten(im: Image.Image, background: str) -> Image.Image:
    """Composite an image with alpha onto an opaque background colour."""
    gray = im.mode == "LA"
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, ImageColor.getrgb(background))
    out = Image.alpha_composite(bg, rgba).convert("RGB")
    return out.convert("L") if gray else out


def _exif_bytes(src_exif: bytes | None, policy: str, oriented: bool,
                notes: list[str]) -> bytes | None:
    if not src_exif or policy == "strip":
        return None
    try:
        exif = Image.Exif()
        exif.load(src_exif)
        if policy == "copyright":
            kept = Image.Exif()
            for tag in COPYRIGHT_TAGS:
                if tag in exif:
                    kept[tag] = exif[tag]
            return kept.tobytes() if len(kept) else None
        if oriented and ORIENTATION in exif:
            exif[ORIENTATION] = 1
        return exif.tobytes()
    except Exception as exc:  # noqa: BLE001 - malformed EXIF must never fail the image
        notes.append(f"exif dropped: unreadable ({type(exc).__name__})")
        return None


_XMP_ORIENT = re.compile(rb'tiff:Orientation(="|>)([0-9])')


def save(images: list[tuple[Image.Image, int]], fp: IO[bytes], fmt: str, opts: OutputOptions,
         src: Source, *, oriented: bool, notes: list[str]) -> None:
    """Encode one image (or the frames of an animation) in ``fmt`` to ``fp``."""
    first = fit_mode(images[0][0], fmt, opts.background)
    params: dict[str, Any] = {}
    if fmt in ("JPEG", "WEBP", "AVIF"):
        params["quality"] = opts.quality
    if fmt == "JPEG":
        params["optimize"] = opts.optimize
        params["progressive"] = opts.progressive
    if fmt == "PNG":
        params["optimize"] = opts.optimize
    if fmt == "WEBP":
        params["lossless"] = opts.lossless
    if fmt == "TIFF":
        params["compression"] = "tiff_deflate"
    icc = _output_icc(first, src.icc, opts.colour)
    if icc and fmt != "GIF":
        params["icc_profile"] = icc
    exif = _exif_bytes(src.exif, opts.metadata, oriented, notes)
    if exif and fmt in ("JPEG", "PNG", "WEBP", "AVIF", "TIFF"):
        params["exif"] = exif
    if opts.metadata == "keep" and src.xmp and fmt in ("JPEG", "PNG", "WEBP", "AVIF"):
        params["xmp"] = _XMP_ORIENT.sub(rb'tiff:Orientation\g<1>1', src.xmp) if oriented \
            else src.xmp
    first.info = {}  # nothing rides along that the policy did not choose
    if len(images) > 1:
        rest = [_frame_size(fit_mode(im, fmt, opts.background), first.size, fmt, notes)
                for im, _ in images[1:]]
        for im in rest:
            im.info = {}
        params.update(save_all=True, append_images=rest,
                      duration=[d for _, d in images], loop=0)
    first.save(fp, format=fmt, **params)


# Animated formats whose frames must all have the first frame's size (the WebP and AVIF
# encoders refuse others; APNG would grow its canvas). GIF and TIFF store each as it is.
_ONE_FRAME_SIZE = {"WEBP", "AVIF", "PNG"}


def _frame_size(im: Image.Image, size: tuple[int, int], fmt: str,
                notes: list[str]) -> Image.Image:
    """A later frame at the first frame's ``size`` where ``fmt`` needs it: pages of a TIFF or
    the images of an MPO may differ in size (an animation's frames never do)."""
    if im.size == size or fmt not in _ONE_FRAME_SIZE:
        return im
    notes.append(f"a frame of {im.width}x{im.height} was resized to the first frame's "
                 f"{size[0]}x{size[1]} ({fmt} animations have one size)")
    return im.resize(size, Image.Resampling.LANCZOS)


def _output_icc(im: Image.Image, icc: bytes | None, colour: str) -> bytes | None:
    if not icc:
        return None
    rgb = im.mode in ("RGB", "RGBA")
    if colour == "srgb":
        return srgb_icc() if rgb else None
    profile = _profile(icc)
    if profile is None:
        return None
    space = _space(profile)
    if (space == "RGB" and rgb) or (space == "GRAY" and im.mode in ("L", "LA")):
        return icc
    return srgb_icc() if rgb else None
