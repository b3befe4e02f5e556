"""The image formats watcher knows: each declared once in ``FORMATS``, every other table derived.

A row says what watcher does with a format: the name a user gives it (``[output] format``), its
Pillow name, the extension its outputs get and the others that name it, whether it is opened by
default and written at all, what it stores (alpha, frames, metadata), and the signature its files
start with. Standard library only: the settings schema imports it for the output format names
without loading Pillow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Format:
    """One image format, as watcher reads and writes it."""

    name: str  # the user's name for it ([output] format = "jpeg")
    pillow: str  # Pillow's name for it (Image.format, Image.open(formats=...))
    plugin: str  # the module that decodes it: a Pillow module, or "package.module:register"
    library: str = "Pillow"  # the library (and its licence) that decodes and encodes it
    extension: str  # the extension an output in this format (or written from it) is given
    other_extensions: tuple[str, ...] = ()  # further extensions that name it
    default: bool = True  # opened unless the configuration lists the formats
    output: bool = True  # watcher encodes it (an output's extension names its encoder)
    alpha: bool = False  # stores an alpha band (elsewhere alpha is flattened)
    animation: bool = False  # stores more than one frame
    one_frame_size: bool = False  # every frame of an animation has the first frame's size
    quality: bool = False  # the encoder takes [output] quality
    icc: bool = True  # an output carries an ICC profile
    exif: bool = False  # an output carries EXIF
    xmp: bool = False  # an output carries XMP
    scalable: bool = False  # decodes at reduced scale (libjpeg's DCT scaling)
    signature: bytes = b""  # a regular expression the first 16 bytes of its files match


FORMATS: tuple[Format, ...] = (
    Format(name="jpeg", pillow="JPEG", plugin="JpegImagePlugin", extension=".jpg",
           other_extensions=(".jpeg", ".jpe", ".jfif"), quality=True, exif=True, xmp=True,
           scalable=True, signature=rb"\xff\xd8\xff"),
    Format(name="png", pillow="PNG", plugin="PngImagePlugin", extension=".png", alpha=True,
           animation=True, one_frame_size=True, exif=True, xmp=True,
           signature=rb"\x89PNG\r\n\x1a\n"),
    Format(name="webp", pillow="WEBP", plugin="WebPImagePlugin", extension=".webp", alpha=True,
           animation=True, one_frame_size=True, quality=True, exif=True, xmp=True,
           signature=rb"RIFF....WEBP"),
    Format(name="avif", pillow="AVIF", plugin="AvifImagePlugin", extension=".avif", alpha=True,
           animation=True, one_frame_size=True, quality=True, exif=True, xmp=True,
           signature=rb"....ftypavi[fs]"),
    Format(name="gif", pillow="GIF", plugin="GifImagePlugin", extension=".gif", alpha=True,
           animation=True, icc=False, signature=rb"GIF8"),
    Format(name="bmp", pillow="BMP", plugin="BmpImagePlugin", extension=".bmp",
           signature=rb"BM"),
    # HEIF/HEIC (an iPhone's photos): libheif through pillow-heif. libheif applies the file's
    # rotation and mirroring itself, and its EXIF orientation is then reset to 1.
    Format(name="heif", pillow="HEIF", plugin="pillow_heif:register_heif_opener",
           library="pillow-heif (libheif, libde265, x265)", extension=".heic",
           other_extensions=(".heif", ".hif"), alpha=True, quality=True, exif=True, xmp=True,
           signature=rb"....ftyp(heic|heix|heim|heis|hevc|hevx|hevm|hevs|mif1|msf1)"),
    # JPEG XL: libjxl through pillow-jxl-plugin, its header read first (watcher.imaging.jxl).
    Format(name="jxl", pillow="JXL", plugin="watcher.imaging.jxl:register",
           library="pillow-jxl-plugin (libjxl)", extension=".jxl", alpha=True, quality=True,
           exif=True, xmp=True, signature=rb"\xff\x0a|\x00\x00\x00\x0cJXL \r\n\x87\n"),
    # A camera's RAW (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2...): LibRaw through rawpy
    # (watcher.imaging.raw), tried before TIFF (a DNG is a TIFF). Read, never written: an output
    # of format "same" is a JPEG.
    Format(name="raw", pillow="RAW", plugin="watcher.imaging.raw:register",
           library="rawpy (LibRaw)", extension=".jpg",
           other_extensions=(".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2",
                             ".raf", ".orf", ".rw2", ".pef", ".srw", ".3fr", ".iiq", ".x3f"),
           output=False, scalable=True,
           signature=rb"....ftypcrx |FUJIFILMCCD-RAW|IIRO|IIRS|MMOR|IIU\x00"),
    Format(name="tiff", pillow="TIFF", plugin="TiffImagePlugin", extension=".tif",
           other_extensions=(".tiff",), alpha=True, animation=True, exif=True,
           signature=rb"II\*\x00|MM\x00\*|II\+\x00|MM\x00\+"),
    # A JPEG with extra frames, opened by the JPEG plugin (and so not listed by default), written
    # as a JPEG. (Listed in [input] formats, its own plugin also opens one of a single frame.)
    Format(name="mpo", pillow="MPO", plugin="MpoImagePlugin", extension=".jpg", default=False,
           output=False, scalable=True),
)

_BY_PILLOW = {f.pillow: f for f in FORMATS}
# Formats whose plugin is not Pillow's own: Pillow name -> "module:function" registering it.
EXTERNAL = {f.pillow: f.plugin for f in FORMATS if ":" in f.plugin}
# The formats watcher writes, by Pillow name.
OUTPUTS = {f.pillow: f for f in FORMATS if f.output}

# Formats opened by default (Pillow names), in the order they are tried.
DEFAULT_FORMATS = tuple(f.pillow for f in FORMATS if f.default)
# The Pillow plugins of the default formats (the ones a worker loads before its first image).
DEFAULT_PLUGINS = tuple(f.plugin for f in FORMATS if f.default and ":" not in f.plugin)
# The user's output format names -> Pillow's ("same" is not one: it keeps the input's).
OUTPUT_FORMATS = {f.name: f.pillow for f in OUTPUTS.values()}
# An output's extension (lower case) -> the Pillow format it is encoded in.
OUTPUT_EXTENSIONS = {ext: f.pillow for f in OUTPUTS.values() for ext in (f.extension,
                                                                  *f.other_extensions)}
# The extensions of formats watcher reads but does not write (a RAW's .dng, .nef...).
READ_ONLY_EXTENSIONS = {ext: f.pillow for f in FORMATS if not f.output
                        for ext in f.other_extensions}
ALPHA_FORMATS = frozenset(f.pillow for f in OUTPUTS.values() if f.alpha)
ANIMATED_FORMATS = frozenset(f.pillow for f in OUTPUTS.values() if f.animation)
ONE_FRAME_SIZE_FORMATS = frozenset(f.pillow for f in OUTPUTS.values() if f.one_frame_size)
SCALABLE_FORMATS = frozenset(f.pillow for f in FORMATS if f.scalable)
_SIGNATURES = [(re.compile(f.signature, re.DOTALL), f.pillow) for f in FORMATS if f.signature]


def extension(pillow: str) -> str | None:
    """The extension an output written from an input in ``pillow`` format (format "same") gets,
    or None for a format watcher does not write."""
    f = _BY_PILLOW.get(pillow)
    return f.extension if f is not None else None


def open_order(allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``allowed`` in the order decoders are tried: a camera's RAW before TIFF (a DNG, a CR2 or
    a NEF is a TIFF whose first page is only its small preview)."""
    if "RAW" in allowed and "TIFF" in allowed and allowed.index("TIFF") < allowed.index("RAW"):
        rest = [f for f in allowed if f != "RAW"]
        rest.insert(rest.index("TIFF"), "RAW")
        return tuple(rest)
    return allowed


def library(pillow: str) -> str:
    """The library that reads (and writes) ``pillow`` format."""
    f = _BY_PILLOW.get(pillow)
    return f.library if f is not None else "Pillow"


def sniff(head: bytes) -> str | None:
    """The Pillow format whose signature the first bytes of a file have, or None."""
    for pattern, pillow in _SIGNATURES:
        if pattern.match(head):
            return pillow
    return None
