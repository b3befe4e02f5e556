"""JPEG XL through pillow-jxl-plugin (libjxl), with its header read before any pixel is decoded.

pillow-jxl-plugin decodes the whole image when the file is opened, before watcher's memory
governor could refuse it. This plugin opens a JPEG XL by reading only its header (the codestream's
SizeHeader and orientation, and the container's EXIF and XMP boxes), and decodes in ``load``,
with pillow-jxl-plugin's decoder, once the input was admitted.

Orientation: libjxl applies the codestream's own orientation when it decodes; the EXIF
orientation of such a file is then reset to 1, as pillow-heif does for HEIF's rotation, so
that nothing turns the image twice. A file whose codestream orientation is 1 keeps its EXIF
orientation, applied as for a JPEG.
"""

from __future__ import annotations

import io
import struct
from typing import IO

from PIL import Image, ImageFile

MAGIC_CODESTREAM = b"\xff\x0a"
MAGIC_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_RATIOS = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))
_MAX_BOXES = 4096
_MAX_META = 1 << 24  # an EXIF or XMP box larger than this is not read


class _Bits:
    """Reads a JPEG XL codestream's bits, least significant first."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        value = 0
        for i in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise EOFError("truncated JPEG XL header")
            value |= ((self.data[byte] >> (self.pos & 7)) & 1) << i
            self.pos += 1
        return value

    def u32(self, *dist: tuple[int, int]) -> int:
        offset, bits = dist[self.u(2)]
        return offset + self.u(bits)


def parse_codestream_header(head: bytes) -> tuple[tuple[int, int], int]:
    """(width, height) as stored and the codestream's orientation (1-8), from the first bytes
    of a bare codestream (starting with 0xFF0A)."""
    if not head.startswith(MAGIC_CODESTREAM):
        raise SyntaxError("not a JPEG XL codestream")
    bits = _Bits(head[2:])
    dist = ((1, 9), (1, 13), (1, 18), (1, 30))
    small = bits.u(1)
    height = (bits.u(5) + 1) * 8 if small else bits.u32(*dist)
    ratio = bits.u(3)
    if ratio == 0:
        width = (bits.u(5) + 1) * 8 if small else bits.u32(*dist)
    else:
        num, den = _RATIOS[ratio - 1]
        width = height * num // den
    orientation = 1
    if not bits.u(1) and bits.u(1):  # not all_default, extra_fields
        orientation = 1 + bits.u(3)
    return (width, height), orientation


def read_header(fp: IO[bytes]) -> tuple[tuple[int, int], int, dict[str, bytes]]:
    """(size as stored, codestream orientation, {"exif": ..., "xmp": ...}) of the JPEG XL in
    ``fp`` (a bare codestream or an ISO BMFF container), reading only headers and boxes."""
    fp.seek(0)
    head = fp.read(64)
    if head.startswith(MAGIC_CODESTREAM):
        size, orientation = parse_codestream_header(head)
        return size, orientation, {}
    if not head.startswith(MAGIC_CONTAINER):
        raise SyntaxError("not a JPEG XL file")
    meta: dict[str, bytes] = {}
    total = fp.seek(0, 2)
    found: tuple[tuple[int, int], int] | None = None
    pos = 0
    for _ in range(_MAX_BOXES):
        fp.seek(pos)
        header = fp.read(8)
        if len(header) == 0:
            break
        if len(header) < 8:
            raise EOFError("truncated JPEG XL box header")
        size, kind = struct.unpack(">I4s", header)
        start = pos + 8
        if size == 1:
            large = fp.read(8)
            if len(large) < 8:
                raise EOFError("truncated JPEG XL box header")
            size = struct.unpack(">Q", large)[0]
            start += 8
        end = None if size == 0 else pos + size
        if end is not None and end < start:
            raise SyntaxError(f"JPEG XL box {kind!r} has a bad size {size}")
        if kind in (b"jxlc", b"jxlp") and found is None:
            fp.seek(start + (4 if kind == b"jxlp" else 0))
            found = parse_codestream_header(fp.read(64))
        elif kind in (b"Exif", b"xml ") and end is not None and end - start <= _MAX_META:
            fp.seek(start)
            data = fp.read(end - start)
            if len(data) < end - start:
                raise EOFError(f"truncated JPEG XL {kind.decode().strip()} box")
            if kind == b"Exif":
                meta["exif"] = exif_from_box(data)
            else:
                meta["xmp"] = data
        if end is None:
            break
        if end > total:  # libjxl says only "Generic Error" for a cut file: tell it here
            meta["cut"] = (f"truncated JPEG XL: its {kind.decode('latin-1').strip()!r} box "
                           f"ends at byte {end}, the file has {total}").encode()
            break
        pos = end
    if found is None:
        raise EOFError("truncated JPEG XL: no codestream box")
    return found[0], found[1], meta


def exif_from_box(data: bytes) -> bytes:
    """The TIFF structure in an ``Exif`` box: after its 4-byte offset to the TIFF header (some
    writers, pillow-jxl-plugin among them, leave the offset out)."""
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return data
    (offset,) = struct.unpack(">I", data[:4].rjust(4, b"\x00"))
    return data[4 + offset:]


def _reset_orientation(exif: bytes) -> bytes:
    ex = Image.Exif()
    ex.load(exif)
    if ex.get(0x0112, 1) != 1:
        ex[0x0112] = 1
    return ex.tobytes()


class JxlImageFile(ImageFile.ImageFile):
    """A JPEG XL whose header is read at open and pixels in ``load``."""

    format = "JXL"
    format_description = "JPEG XL (libjxl through pillow-jxl-plugin)"

    def _open(self) -> None:
        stored, orientation, meta = read_header(self.fp)
        self._orientation = orientation
        # libjxl turns the image as its codestream says
        self._size = (stored[1], stored[0]) if orientation > 4 else stored
        self._mode = "RGBA"  # for the estimate; the decoder tells the real mode
        # a cut file is known now; it fails when its pixels are asked for (Pillow would take
        # an error here for "not this format")
        self._cut = meta.pop("cut", b"").decode()
        self.info.update(meta)
        if orientation != 1 and "exif" in self.info:
            try:
                self.info["exif"] = _reset_orientation(self.info["exif"])
            except Exception:  # noqa: BLE001 - a malformed EXIF block is dropped
                del self.info["exif"]
        self.n_frames = 1
        self.is_animated = False
        self.tile = []

    def load(self) -> Image.core.PixelAccess | None:  # type: ignore[name-defined]
        if self._im is None and not self.tile:
            self._decode()
        return super().load()

    def _decode(self) -> None:
        from pillow_jxl import Decoder  # noqa: PLC0415 - the library, once a JXL is decoded

        if self._cut:
            raise EOFError(self._cut)
        self.fp.seek(0)
        data = self.fp.read()
        try:
            jpeg, info, pixels, icc, _boxes = Decoder(num_threads=1)(data)
        except Exception as exc:
            text = str(exc)
            if "need more input" in text.lower() or "truncated" in text.lower() or \
                    "needmoreinput" in text.lower().replace(" ", ""):
                raise EOFError(f"truncated JPEG XL: {text}") from exc
            raise SyntaxError(f"JPEG XL decoder: {text}") from exc
        if icc:
            self.info["icc_profile"] = icc
        if jpeg:  # a JPEG stored losslessly: its own bytes come back
            with Image.open(io.BytesIO(pixels), formats=["JPEG"]) as im:
                im.load()
                self._mode, self._size = im.mode, im.size
                self.fp = io.BytesIO(im.tobytes())
                for key in ("exif", "icc_profile", "xmp"):
                    if key in im.info:
                        self.info[key] = im.info[key]
                rawmode = im.mode
        else:
            rawmode = info.mode
            if rawmode == "F;16":
                raise SyntaxError("16-bit float JPEG XL is not supported")
            self._mode, self._size = rawmode, (info.width, info.height)
            self.fp = io.BytesIO(pixels)
        self.tile = [ImageFile._Tile("raw", (0, 0, *self.size), 0, rawmode)]  # type: ignore[attr-defined]


def _accept(prefix: bytes) -> bool:
    return prefix.startswith((MAGIC_CODESTREAM, MAGIC_CONTAINER))


def register() -> None:
    """Register this reader, and pillow-jxl-plugin's writer, as Pillow's "JXL"."""
    import pillow_jxl  # noqa: F401, PLC0415 - registers its own plugin, replaced below

    Image.register_open(JxlImageFile.format, JxlImageFile, _accept)
    Image.register_extension(JxlImageFile.format, ".jxl")
