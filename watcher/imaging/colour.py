"""Colour: bringing decoded pixels to a working mode and to sRGB, and the profile an output carries.

16-bit and float images are *scaled* to 8 bits, CMYK goes through its ICC profile, and with the
"srgb" colour policy an RGB image in another profile is converted to sRGB.
"""

from __future__ import annotations

import io
from functools import cache

from watcher.imaging.pil import Image, ImageCms


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


def output_icc(im: Image.Image, icc: bytes | None, colour: str) -> bytes | None:
    """The ICC profile an output of ``im`` carries, from the input's ``icc`` and the colour
    policy: sRGB's where the pixels were converted to it, the input's own where it fits."""
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
