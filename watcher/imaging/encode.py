"""Encoding: the only module that encodes image bytes (``watcher.fs`` writes them to files).

Encoding never fails for a mode mismatch: the image is brought to a mode the format can store,
alpha is flattened onto a background where the format has none (``formats``), and the colour and
metadata policies decide which ICC profile, EXIF and XMP the output carries.

Whose fault is a failed write (decided by evidence, as for decoding: see ``codec``): an
``OSError`` the output file itself raised is ``write-failed``; every other error of an encoder
(``encoder error -2``, libwebp's ``RuntimeError``, an errno of its own) is ``encode-failed``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from typing import IO, Any

from watcher.imaging.codec import ORIENTATION, Source
from watcher.imaging.colour import output_icc, to_working
from watcher.imaging.formats import ALPHA_FORMATS, ONE_FRAME_SIZE_FORMATS, OUTPUTS
from watcher.imaging.pil import Image, ImageColor
from watcher.settings.schema import OutputOptions

COPYRIGHT_TAGS = (0x013B, 0x8298)  # Artist, Copyright


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


def exif_to_box(exif: bytes) -> bytes:
    """EXIF (as Pillow gives it) as a JPEG XL ``Exif`` box holds it: a zero offset to the TIFF
    header, then the TIFF structure."""
    return b"\x00\x00\x00\x00" + (exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)


_XMP_ORIENT = re.compile(rb'tiff:Orientation(="|>)([0-9])')


def save(images: list[tuple[Image.Image, int]], fp: IO[bytes], fmt: str, opts: OutputOptions,
         src: Source, *, oriented: bool, notes: list[str]) -> None:
    """Encode one image (or the frames of an animation) in ``fmt`` to ``fp``."""
    first = fit_mode(images[0][0], fmt, opts.background)
    spec = OUTPUTS[fmt]
    params: dict[str, Any] = {}
    if spec.quality:
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
    if fmt == "HEIF" and opts.lossless:
        params["quality"] = -1  # pillow-heif's lossless
    if fmt == "JXL":
        # libjxl's quality is calibrated to libjpeg's (cjxl -q 90 looks like a JPEG of 90);
        # 100 is lossless. Never a JPEG re-wrap: what is encoded is the processed image.
        params.update(lossless=opts.quality >= 100 or opts.lossless, lossless_jpeg=False,
                      effort=7)
    icc = output_icc(first, src.icc, opts.colour)
    if icc and spec.icc:
        params["icc_profile"] = icc
    exif = _exif_bytes(src.exif, opts.metadata, oriented, notes)
    if exif and spec.exif:
        # the JPEG XL writer stores its bytes as the box: it must start with the offset
        params["exif"] = exif_to_box(exif) if fmt == "JXL" else exif
    if opts.metadata == "keep" and src.xmp and spec.xmp:
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


def _frame_size(im: Image.Image, size: tuple[int, int], fmt: str,
                notes: list[str]) -> Image.Image:
    """A later frame at the first frame's ``size`` where ``fmt`` needs it: pages of a TIFF or
    the images of an MPO may differ in size (an animation's frames never do). The WebP and AVIF
    encoders refuse other sizes and APNG would grow its canvas; GIF and TIFF store each as it
    is."""
    if im.size == size or fmt not in ONE_FRAME_SIZE_FORMATS:
        return im
    notes.append(f"a frame of {im.width}x{im.height} was resized to the first frame's "
                 f"{size[0]}x{size[1]} ({fmt} animations have one size)")
    return im.resize(size, Image.Resampling.LANCZOS)


class _Output:
    """The output file as an encoder sees it: keeps every ``OSError`` the file itself raised
    (``failure``), the evidence that a failed encode is the file system's fault."""

    def __init__(self, fp: Any) -> None:
        self._fp = fp
        self.failure: OSError | None = None

    def _system(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            if self.failure is None and not isinstance(exc, io.UnsupportedOperation):
                self.failure = exc
            raise

    def write(self, data: Any) -> int:
        return self._system(self._fp.write, data)  # type: ignore[no-any-return]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._system(self._fp.seek, offset, whence)  # type: ignore[no-any-return]

    def tell(self) -> int:
        return self._system(self._fp.tell)  # type: ignore[no-any-return]

    def read(self, n: int = -1) -> bytes:
        return self._system(self._fp.read, n)  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._system(self._fp.flush)

    def fileno(self) -> int:
        return self._system(self._fp.fileno)  # type: ignore[no-any-return]

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


def encode(images: list[tuple[Image.Image, int]], f: Any, fmt: str, opts: OutputOptions,
           src: Source, oriented: bool, notes: list[str], path: str) -> None:
    """Encode to ``f``. An ``OSError`` that ``f`` raised (disk full, EIO) propagates: the
    output could not be written (``write-failed``). Anything else the encoder raises (Pillow's
    "encoder error -2", the animated WebP encoder's RuntimeError, a ValueError for a mode) is
    ``encode-failed``: this image cannot be written in ``fmt``."""
    out = _Output(f)
    try:
        save(images, out, fmt, opts, src, oriented=oriented, notes=notes)
    except MemoryError:
        raise
    except Exception as exc:
        if out.failure is exc:
            raise
        if out.failure is not None:  # the encoder wrapped the file's error in its own
            raise out.failure from exc
        if _encoder_out_of_memory(fmt, exc):
            raise MemoryError(f"the {fmt} encoder ran out of memory ({exc})") from exc
        raise EncodeError(path) from exc


def _encoder_out_of_memory(fmt: str, exc: Exception) -> bool:
    """Whether an encoder's own error says it could not allocate: libwebp's
    VP8_ENC_ERROR_OUT_OF_MEMORY and its bitstream twin (Pillow: "encoding error 1" / "2"), or
    a message that says so (libavif's "Out of memory")."""
    text = str(exc)
    if fmt == "WEBP" and text in ("encoding error 1", "encoding error 2"):
        return True
    return "out of memory" in text.lower()


class EncodeError(Exception):
    """The encoder of ``path`` failed (its cause), not the file it wrote to."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path
