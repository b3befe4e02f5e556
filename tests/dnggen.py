"""A minimal, valid DNG written by the tests (no sample is shipped): a Bayer (RGGB) mosaic of a
known picture, 16-bit samples, the DNG tags LibRaw needs (DNGVersion, CFA pattern, colour
matrix, white balance, black and white levels), an optional embedded RGB preview in IFD0 (the
raw image in a SubIFD, as cameras write them) and an Orientation tag.
"""

from __future__ import annotations

import struct

from PIL import Image

SHORT, LONG, RATIONAL, SRATIONAL, ASCII, BYTE = 3, 4, 5, 10, 2, 1
_SIZES = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, SRATIONAL: 8}


def _pack(kind: int, values: list) -> bytes:  # type: ignore[type-arg]
    if kind == ASCII:
        return values[0].encode() + b"\x00"
    if kind == BYTE:
        return bytes(values)
    if kind == SHORT:
        return struct.pack(f"<{len(values)}H", *values)
    if kind == LONG:
        return struct.pack(f"<{len(values)}I", *values)
    fmt = "<ii" if kind == SRATIONAL else "<II"
    return b"".join(struct.pack(fmt, round(v * 10000), 10000) for v in values)


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray(b"II*\x00\x00\x00\x00\x00")

    def blob(self, data: bytes) -> int:
        if len(self.buf) % 2:
            self.buf += b"\x00"
        at = len(self.buf)
        self.buf += data
        return at

    def ifd(self, tags: dict[int, tuple[int, list]]) -> int:  # type: ignore[type-arg]
        """Write an IFD (values first, then the directory); its offset."""
        entries = []
        for tag in sorted(tags):
            kind, values = tags[tag]
            data = _pack(kind, values)
            count = len(data) // _SIZES[kind]
            if len(data) <= 4:
                entries.append((tag, kind, count, data.ljust(4, b"\x00")))
            else:
                entries.append((tag, kind, count, struct.pack("<I", self.blob(data))))
        return self.blob(struct.pack("<H", len(entries)) + b"".join(
            struct.pack("<HHI", t, k, c) + v for t, k, c, v in entries) + b"\x00\x00\x00\x00")


def mosaic(picture: Image.Image, white: int = 4000, black: int = 64) -> bytes:
    """The RGGB Bayer samples of ``picture`` (RGB) as 16-bit little-endian values."""
    rgb = picture.convert("RGB")
    w, h = rgb.size
    px = rgb.load()
    out = bytearray()
    scale = (white - black) / 255
    for y in range(h):
        row = []
        for x in range(w):
            channel = (0 if x % 2 == 0 else 1) if y % 2 == 0 else (1 if x % 2 == 0 else 2)
            row.append(black + round(px[x, y][channel] * scale))
        out += struct.pack(f"<{w}H", *row)
    return bytes(out)


def make_dng(picture: Image.Image, *, orientation: int = 1,
             preview: Image.Image | None = None, taken: str = "") -> bytes:
    """A DNG of ``picture`` (even width and height) with ``orientation`` (EXIF numbering:
    the stored mosaic is shown turned) and, if given, ``preview`` as its embedded RGB preview."""
    w, h = picture.size
    assert w % 2 == 0 and h % 2 == 0
    pixels = mosaic(picture, 4000, 64)
    pv = preview.convert("RGB").tobytes() if preview is not None else b""
    # as cameras do, the directories come first: laid out once to learn their length
    head = _layout(w, h, orientation, preview, 0, 0, taken)
    start = len(head) + len(head) % 2
    out = _layout(w, h, orientation, preview, start, start + len(pixels), taken)
    return out.ljust(start, b"\x00") + pixels + pv


def _layout(w: int, h: int, orientation: int, preview: Image.Image | None, raw_at: int,
            pv_at: int, taken: str) -> bytes:
    white, black = 4000, 64
    wr = _Writer()
    raw_tags = {
        254: (LONG, [0]), 256: (LONG, [w]), 257: (LONG, [h]), 258: (SHORT, [16]),
        259: (SHORT, [1]), 262: (SHORT, [32803]), 273: (LONG, [raw_at]), 277: (SHORT, [1]),
        278: (LONG, [h]), 279: (LONG, [w * h * 2]), 284: (SHORT, [1]),
        33421: (SHORT, [2, 2]), 33422: (BYTE, [0, 1, 1, 2]),
        50714: (LONG, [black]), 50717: (LONG, [white]),
    }
    raw_ifd = wr.ifd(raw_tags)
    common = {
        271: (ASCII, ["watcher tests"]), 272: (ASCII, ["synthetic DNG"]),
        274: (SHORT, [orientation]),
        50706: (BYTE, [1, 4, 0, 0]), 50707: (BYTE, [1, 1, 0, 0]),
        50708: (ASCII, ["watcher synthetic"]),
        # sRGB primaries (D65) XYZ->camera, so the camera's colours are sRGB's
        50721: (SRATIONAL, [3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415,
                            0.0557, -0.2040, 1.0570]),
        50728: (RATIONAL, [1.0, 1.0, 1.0]), 50778: (SHORT, [21]),
    }
    if taken:
        common[306] = (ASCII, [taken])  # DateTime, "YYYY:MM:DD HH:MM:SS"
    if preview is None:
        tags = {**raw_tags, **common}
        tags[273] = (LONG, [raw_at])
        ifd0 = wr.ifd(tags)
    else:
        pv = preview
        tags = {
            254: (LONG, [1]), 256: (LONG, [pv.width]), 257: (LONG, [pv.height]),
            258: (SHORT, [8, 8, 8]), 259: (SHORT, [1]), 262: (SHORT, [2]),
            273: (LONG, [pv_at]), 277: (SHORT, [3]), 278: (LONG, [pv.height]),
            279: (LONG, [pv.width * pv.height * 3]), 284: (SHORT, [1]),
            330: (LONG, [raw_ifd]), **common,
        }
        ifd0 = wr.ifd(tags)
    wr.buf[4:8] = struct.pack("<I", ifd0)
    return bytes(wr.buf)
