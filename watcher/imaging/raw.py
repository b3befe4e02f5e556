"""A camera's RAW (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2...) as a Pillow image, through rawpy
(LibRaw).

Opening reads only what LibRaw's identification tells (sizes, orientation); the pixels come in
``load``, from one of two sources:

- the **embedded preview** the camera wrote (a JPEG, or a bitmap), much faster: chosen with
  ``[input] raw = "preview"``, or with "auto" (the default) when ``draft`` is asked for a size
  the preview covers (the pipelines shrink the image to no more than the preview's size: a
  thumbnail, a web size);
- a **full demosaic** (``postprocess``: the camera's white balance, 8 bits, sRGB primaries):
  with "demosaic", with "auto" when the preview is too small, or when there is no preview.

Either way the image comes out upright, turned as the RAW's own metadata says (LibRaw's
``flip``): a preview is stored as the sensor saw it, so it is turned here (a RAW's preview that
came out rotated was a bug of other tools). No EXIF orientation is passed on.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from PIL import Image, ImageFile

MODES = ("auto", "preview", "demosaic")
MODE = "auto"  # [input] raw, set by the decoder before each file

# LibRaw's flip -> the transpose that makes the image upright (its EXIF orientation 3, 8, 6)
_TURN = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90,
         6: Image.Transpose.ROTATE_270}
_TIFF = (b"II*\x00", b"MM\x00*")
_OTHER = (b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")
_DNG_VERSION, _MAKE, _SUB_IFDS = 50706, 271, 330
_CAMERA_MAKERS = (b"NIKON", b"SONY", b"PENTAX", b"RICOH", b"SAMSUNG", b"CANON", b"MINOLTA",
                  b"KONICA", b"HASSELBLAD", b"PHASE ONE", b"LEAF", b"KODAK", b"LEICA",
                  b"OLYMPUS", b"PANASONIC", b"FUJIFILM", b"SIGMA", b"MAMIYA", b"EPSON")


def _tiff_tags(data: bytes) -> dict[int, tuple[int, int, int]]:
    """IFD0's tags of a TIFF: tag -> (type, count, value or offset)."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    if offset + 2 > len(data):
        raise SyntaxError("TIFF IFD0 is beyond the file")
    (n,) = struct.unpack(order + "H", data[offset:offset + 2])
    tags = {}
    for i in range(min(n, 1000)):
        at = offset + 2 + 12 * i
        if at + 12 > len(data):
            raise SyntaxError("TIFF IFD0 is cut")
        tag, kind, count, value = struct.unpack(order + "HHII", data[at:at + 12])
        tags[tag] = (kind, count, value)
    return tags


def is_raw(data: bytes) -> bool:
    """Whether ``data`` (a whole file) is a camera's RAW rather than an ordinary TIFF: a DNG, a
    CR2, a camera maker's TIFF-based RAW (with SubIFDs), or a RAW of another container."""
    if data.startswith(_OTHER) or data[4:12] == b"ftypcrx ":
        return True
    if not data.startswith(_TIFF):
        return False
    if data[8:10] == b"CR":
        return True
    tags = _tiff_tags(data)
    if _DNG_VERSION in tags:
        return True
    if _MAKE in tags and _SUB_IFDS in tags:
        _, count, value = tags[_MAKE]
        inline = struct.pack("<I" if data[:2] == b"II" else ">I", value)[:count]
        make = data[value:value + count] if count > 4 else inline
        return make.upper().startswith(_CAMERA_MAKERS)
    return False


def _rawpy() -> Any:
    import rawpy  # noqa: PLC0415 - numpy and LibRaw, only once a RAW is opened

    return rawpy


class RawImageFile(ImageFile.ImageFile):
    """A camera RAW: identified at open, its preview or its demosaiced pixels in ``load``."""

    format = "RAW"
    format_description = "camera RAW (LibRaw through rawpy)"

    def _open(self) -> None:
        self.fp.seek(0)
        data = self.fp.read(1 << 16)  # an ordinary TIFF is told apart without reading it all
        try:
            known = is_raw(data)
        except (SyntaxError, struct.error):
            data += self.fp.read()  # its first directory is further on
            try:
                known = is_raw(data)
            except (SyntaxError, struct.error) as exc:
                raise SyntaxError(f"not a camera RAW: {exc}") from exc
        if not known:
            raise SyntaxError("not a camera RAW")
        data += self.fp.read()
        rawpy = _rawpy()
        try:
            raw = rawpy.imread(io.BytesIO(data))
        except (rawpy.LibRawFileUnsupportedError, rawpy.NotSupportedError) as exc:
            raise SyntaxError(f"LibRaw does not read it: {exc}") from exc
        except rawpy.LibRawError as exc:
            raise _failure(exc, len(data)) from exc
        self._raw = raw
        self._bytes = len(data)
        sizes = raw.sizes
        self._flip = int(sizes.flip)
        self._full = self._turned((int(sizes.width), int(sizes.height)))
        self._size = self._full
        self._mode = "RGB"
        self._preview: Image.Image | None = None
        self.info["raw_flip"] = self._flip
        if data.startswith(_TIFF):
            self._camera_exif(data)
        self.tile = []

    def _camera_exif(self, data: bytes) -> None:
        """A small EXIF block for the outputs and the capture time: the RAW's (a TIFF's) make,
        model and time taken (DateTimeOriginal, else its DateTime), no orientation."""
        try:
            found = Image.Exif()
            found.load(data)
            when = found.get_ifd(0x8769).get(0x9003) or found.get(0x0132)
            kept = Image.Exif()
            for tag in (0x010F, 0x0110):  # Make, Model
                if isinstance(found.get(tag), str):
                    kept[tag] = found[tag]
            if isinstance(when, str):  # (a RAW's DateTime is written when it is taken)
                kept.get_ifd(0x8769)[0x9003] = when
            if len(kept):
                self.info["exif"] = kept.tobytes()
        except Exception:  # noqa: BLE001, S110 - a RAW's odd directory: no EXIF passed on
            pass

    def _turned(self, size: tuple[int, int]) -> tuple[int, int]:
        return (size[1], size[0]) if self._flip in (5, 6) else size

    def _extract_preview(self) -> Image.Image | None:
        """The embedded preview, opened (a JPEG's header only), or None where there is none."""
        rawpy = _rawpy()
        try:
            thumb = self._raw.extract_thumb()
        except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
            return None
        except rawpy.LibRawError as exc:
            raise _failure(exc, self._bytes) from exc
        if thumb.format == rawpy.ThumbFormat.JPEG:
            return Image.open(io.BytesIO(thumb.data), formats=["JPEG"])
        return Image.fromarray(thumb.data)

    def draft(self, mode: str | None, size: tuple[int, int] | None) -> Any:
        """Choose the preview when it is at least ``size`` (upright), as ``MODE`` allows; a JPEG
        preview is itself decoded at reduced scale (libjpeg's DCT scaling)."""
        if MODE == "demosaic" or size is None or self._preview is not None:
            return None
        preview = self._extract_preview()
        if preview is None:
            return None
        if MODE == "auto":
            w, h = self._turned(preview.size)
            if w < size[0] or h < size[1]:
                return None
        if preview.format == "JPEG":
            preview.draft("RGB", self._turned(size))
        self._preview = preview
        self._size = self._turned(preview.size)
        return None

    def load(self) -> Any:
        if self._im is None:
            if self._preview is None and MODE == "preview":
                self._preview = self._extract_preview()
            im = self._from_preview() if self._preview is not None else self._demosaic()
            self._mode, self._size = im.mode, im.size
            self.im = im.im
            self._raw.close()
        return super().load()

    def _from_preview(self) -> Image.Image:
        preview = self._preview
        assert preview is not None
        preview.load()
        icc = preview.info.get("icc_profile")
        if icc:
            self.info["icc_profile"] = icc  # (an Adobe RGB preview is converted like any input)
        im = preview.convert("RGB")
        turn = _TURN.get(self._flip)
        return im.transpose(turn) if turn is not None else im

    def _demosaic(self) -> Image.Image:
        rawpy = _rawpy()
        try:
            rgb = self._raw.postprocess(use_camera_wb=True, output_bps=8,
                                        output_color=rawpy.ColorSpace.sRGB)
        except rawpy.LibRawError as exc:
            raise _failure(exc, self._bytes) from exc
        return Image.fromarray(rgb, "RGB")  # LibRaw has turned it already


def _failure(exc: Exception, nbytes: int) -> Exception:
    """LibRaw's error as the decoder's classification reads it: a file that ends early is
    truncated (EOFError), any other fault of the data corrupt (SyntaxError)."""
    text = f"LibRaw: {type(exc).__name__}: {exc}"
    if "eof" in text.lower() or "truncated" in text.lower() or "IOError" in text:
        return EOFError(f"truncated RAW ({nbytes} bytes): {text}")
    if "memory" in text.lower() or "TooBig" in text:
        return MemoryError(text)
    return SyntaxError(text)


def _accept(prefix: bytes) -> bool:
    return prefix.startswith(_TIFF + _OTHER) or prefix[4:12] == b"ftypcrx "


def register() -> None:
    """Register the RAW reader with Pillow (rawpy itself is imported with the first RAW)."""
    Image.register_open(RawImageFile.format, RawImageFile, _accept)
    Image.register_extensions(RawImageFile.format, [".dng", ".cr2", ".cr3", ".nef", ".arw",
                                                    ".raf", ".orf", ".rw2", ".pef"])
