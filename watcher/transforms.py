"""The built-in transforms and their registry.

A transform is a plain top-level function ``Image -> Image`` with keyword parameters, so it pickles
by reference and imports in any worker. Each has an entry in ``REGISTRY`` that declares its
parameters (for validation at config load) and, for shrinking steps, how to compute the output size
from the input size (so the pipeline can decode a JPEG at reduced scale before running it).

Every transform accepts any Pillow image and works on every size: a 1-pixel image halves to 1
pixel, never to 0. Colour operations leave an alpha channel untouched.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from watcher.errors import ConfigError
from watcher.imaging.pil import Image, ImageColor, ImageEnhance, ImageFilter, ImageOps
from watcher.settings.setting import did_you_mean

Size = tuple[int, int]
LANCZOS = 1  # Image.Resampling.LANCZOS, without loading Pillow to read it


class OrientationWarning(UserWarning):
    """EXIF orientation could not be read; the image was left as stored."""


# --- helpers ------------------------------------------------------------------------------------

def _working(im: Image.Image) -> Image.Image:
    """Bring a rare mode to L/LA/RGB/RGBA so filters and enhancers accept it."""
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return im
    from watcher.imaging.colour import to_working  # noqa: PLC0415 - the one mode normalisation

    return to_working(im, None, "keep", [])


def _colour_only(im: Image.Image, fn: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """Apply ``fn`` to the colour bands and keep the alpha band as it is."""
    im = _working(im)
    if im.mode in ("LA", "RGBA"):
        alpha = im.getchannel("A")
        colour = fn(im.convert(im.mode[:-1]))
        colour.putalpha(alpha)
        return colour
    return fn(im)


class TooManyPixelsError(ValueError):
    """A transform would make an image with more pixels than the pixel limit allows."""


def check_pixels(size: Size, what: str) -> None:
    """Refuse to make an image of ``size`` when it has more pixels than the pixel limit.

    The limit is the run's ``pixel_limit`` (``codec.decode`` sets Pillow's MAX_IMAGE_PIXELS to
    it): an upscale or a rotation must not turn an image that passed it into one that would
    not (a 30-degree turn of a 65500x48 strip is 56750x32790 pixels, 5.6 GB as RGB).
    """
    limit = Image.MAX_IMAGE_PIXELS
    pixels = size[0] * size[1]
    if limit and pixels > limit:
        raise TooManyPixelsError(f"{what} would make {size[0]}x{size[1]} = {pixels} pixels, more "
                            f"than the pixel limit ({limit})")


def fit_size(size: Size, box: Size, *, upscale: bool = False) -> Size:
    """The largest size with ``size``'s aspect ratio inside ``box`` (each side at least 1)."""
    w, h = size
    scale = min(box[0] / w, box[1] / h)
    if not upscale:
        scale = min(scale, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _resize_to(im: Image.Image, size: Size) -> Image.Image:
    if im.size == size:
        return im
    check_pixels(size, "resizing")
    if im.mode.startswith("I;16"):
        im = _working(im)  # Pillow cannot reduce() raw 16-bit modes
    # reducing_gap: box pre-shrink by whole factors, then LANCZOS over the last 2x (Pillow's own
    # thumbnail strategy; indistinguishable from a full LANCZOS at a fraction of the cost).
    return im.resize(size, LANCZOS, reducing_gap=2.0)


# --- the transforms -----------------------------------------------------------------------------

def auto_orient(im: Image.Image) -> Image.Image:
    """Rotate/flip the pixels as the EXIF orientation tag says, and reset the tag.

    A malformed EXIF block does not fail the image: it is left as stored, with a warning.
    """
    try:
        if im.getexif().get(0x0112, 1) in (None, 1):
            return im  # upright already: exif_transpose would return a full copy
        out = ImageOps.exif_transpose(im)
    except Exception as exc:  # noqa: BLE001 - any EXIF parse failure means "skip orientation"
        warnings.warn(f"exif orientation skipped: {type(exc).__name__}: {exc}",
                      OrientationWarning, stacklevel=2)
        return im
    return out if out is not None else im


def grayscale(im: Image.Image) -> Image.Image:
    """Convert to 8-bit grayscale (ITU-R 601 luma), keeping transparency as an alpha band."""
    im = _working(im)
    if im.mode in ("L", "LA"):
        return im
    return im.convert("LA" if im.mode == "RGBA" else "L")


def resize(im: Image.Image, width: int | None = None, height: int | None = None,
           scale: float | None = None, upscale: bool = True) -> Image.Image:
    """Resize keeping the aspect ratio: to a width, a height, to fit in both, or by ``scale``."""
    return _resize_to(im, resize_size(im.size, width=width, height=height, scale=scale,
                                      upscale=upscale))


def resize_size(size: Size, width: int | None = None, height: int | None = None,
                scale: float | None = None, upscale: bool = True) -> Size:
    w, h = size
    if scale is not None:
        if not upscale:
            scale = min(scale, 1.0)
        return max(1, round(w * scale)), max(1, round(h * scale))
    box = (width if width is not None else math.inf, height if height is not None else math.inf)
    s = min(box[0] / w, box[1] / h)
    if not upscale:
        s = min(s, 1.0)
    return max(1, round(w * s)), max(1, round(h * s))


def resize_half(im: Image.Image) -> Image.Image:
    """Halve width and height (at least 1 pixel each)."""
    return _resize_to(im, half_size(im.size))


def half_size(size: Size) -> Size:
    return max(1, size[0] // 2), max(1, size[1] // 2)


def thumbnail(im: Image.Image, width: int = 128, height: int = 128) -> Image.Image:
    """Shrink to fit inside ``width`` x ``height`` keeping the aspect ratio; never enlarge."""
    return _resize_to(im, fit_size(im.size, (width, height)))


def crop(im: Image.Image, width: int, height: int, x: int | None = None,
         y: int | None = None) -> Image.Image:
    """Cut a ``width`` x ``height`` box at (``x``, ``y``), or centred when they are omitted.

    The box is clipped to the image, so a crop larger than the image returns the whole image.
    """
    w, h = min(width, im.width), min(height, im.height)
    left = (im.width - w) // 2 if x is None else min(x, im.width - 1)
    top = (im.height - h) // 2 if y is None else min(y, im.height - 1)
    return im.crop((left, top, min(left + w, im.width), min(top + h, im.height)))


def rotate(im: Image.Image, degrees: float, expand: bool = True,
           fill: str = "#000000") -> Image.Image:
    """Rotate counter-clockwise; multiples of 90 degrees are lossless."""
    d = degrees % 360
    exact = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
             270: Image.Transpose.ROTATE_270}
    if d == 0:
        return im.copy()
    if d in exact:
        return im.transpose(exact[int(d)])
    if expand:
        check_pixels(rotated_size(im.size, d), f"rotating by {degrees} degrees")
    im = _working(im)
    colour = ImageColor.getcolor(fill, "RGBA")
    if im.mode in ("L", "LA"):
        colour = ImageColor.getcolor(fill, im.mode)
    elif im.mode == "RGB":
        colour = colour[:3]
    return im.rotate(d, resample=Image.Resampling.BICUBIC, expand=expand, fillcolor=colour)


def rotated_size(size: Size, degrees: float) -> Size:
    """The size of ``size`` turned by ``degrees`` with ``expand`` (its bounding box)."""
    a = math.radians(degrees)
    c, s = abs(math.cos(a)), abs(math.sin(a))
    w, h = size
    return math.ceil(w * c + h * s), math.ceil(w * s + h * c)


def flip(im: Image.Image) -> Image.Image:
    """Flip top to bottom."""
    return im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def mirror(im: Image.Image) -> Image.Image:
    """Mirror left to right."""
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def blur(im: Image.Image, radius: float = 2.0) -> Image.Image:
    """Gaussian blur with the given radius in pixels."""
    return _colour_only(im, lambda c: c.filter(ImageFilter.GaussianBlur(radius)))


def sharpen(im: Image.Image, radius: float = 2.0, percent: int = 150,
            threshold: int = 3) -> Image.Image:
    """Unsharp mask: ``radius`` in pixels, strength in ``percent``, ``threshold`` in levels."""
    return _colour_only(
        im, lambda c: c.filter(ImageFilter.UnsharpMask(radius, percent, threshold)))


def edge_enhance(im: Image.Image, more: bool = False) -> Image.Image:
    """Enhance edges (Pillow's EDGE_ENHANCE, or EDGE_ENHANCE_MORE)."""
    kernel = ImageFilter.EDGE_ENHANCE_MORE if more else ImageFilter.EDGE_ENHANCE
    return _colour_only(im, lambda c: c.filter(kernel))


def find_edges(im: Image.Image) -> Image.Image:
    """Replace the image by its edges (Pillow's FIND_EDGES kernel)."""
    return _colour_only(im, lambda c: c.filter(ImageFilter.FIND_EDGES))


def autocontrast(im: Image.Image, cutoff: float = 0.0) -> Image.Image:
    """Stretch levels so the darkest becomes black and the lightest white (``cutoff`` % ignored)."""
    return _colour_only(im, lambda c: ImageOps.autocontrast(c, cutoff=cutoff))


def equalize(im: Image.Image) -> Image.Image:
    """Equalise the histogram."""
    return _colour_only(im, ImageOps.equalize)


def brightness(im: Image.Image, factor: float = 1.0) -> Image.Image:
    """Scale brightness: 0 is black, 1 unchanged, 2 twice as bright."""
    return _colour_only(im, lambda c: ImageEnhance.Brightness(c).enhance(factor))


def contrast(im: Image.Image, factor: float = 1.0) -> Image.Image:
    """Scale contrast: 0 is flat grey, 1 unchanged, 2 twice the contrast."""
    return _colour_only(im, lambda c: ImageEnhance.Contrast(c).enhance(factor))


# The seed's names.
to_grayscale = grayscale
resize_thumbnail = thumbnail


# --- the registry -------------------------------------------------------------------------------

_REQUIRED = inspect.Parameter.empty


def join(where: str, key: str) -> str:
    """A key's location: ``file: table.key`` (``where`` ending in ':' is a file name)."""
    if not where or not key:
        return where or key
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


@dataclass(frozen=True, kw_only=True)
class Param:
    """One parameter of a transform: its type, default and allowed range."""

    name: str
    kind: type
    default: Any = _REQUIRED
    min: float | None = None
    max: float | None = None
    optional: bool = False  # None is allowed

    def check(self, value: Any, where: str) -> Any:
        where_key = join(where, self.name)
        if value is None and self.optional:
            return None
        kind = self.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(where_key,
                              f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(where_key, f"expected a finite number, got {value!r}")
        if self.min is not None and value < self.min:
            raise ConfigError(where_key, f"must be >= {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ConfigError(where_key, f"must be <= {self.max}, got {value!r}")
        if kind is str and self.name == "fill":
            try:
                ImageColor.getrgb(value)
            except ValueError as exc:
                raise ConfigError(where_key, f"not a colour: {value!r}") from exc
        return value


@dataclass(frozen=True, kw_only=True)
class TransformSpec:
    """A registered transform.

    ``size``: for a shrinking step, the output size from the input size and parameters; used to
    plan a reduced-scale decode. ``gap``: how much larger than the output the decode must stay for
    a good filter (1.9: libvips' rule of about 2x for the final resize, which still lets a 12 MP
    photo's 256 px thumbnail decode at 1/8 scale, 500/256 = 1.95). ``luma``: the step keeps
    only luminance, so a luma-only decode is enough.
    """

    name: str
    func: Callable[..., Image.Image]
    params: tuple[Param, ...] = ()
    size: Callable[..., Size] | None = None
    gap: float = 2.0
    luma: bool = False
    orients: bool = False

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any],
             where: str) -> tuple[tuple[str, Any], ...]:
        """Validate arguments; returns sorted (name, value) pairs with defaults filled in."""
        where = f"{where}[{self.name}]" if where else self.name
        if len(args) > len(self.params):
            raise ConfigError(where, (f"takes at most {len(self.params)} arguments (" + ", ".join(
                p.name for p in self.params) + ")" if self.params else "takes no arguments")
                + f", got {len(args)}")
        values: dict[str, Any] = {}
        for p, v in zip(self.params, args, strict=False):
            values[p.name] = v
        known = {p.name for p in self.params}
        for k, v in kwargs.items():
            if k not in known:
                raise ConfigError(join(where, k), "unknown parameter" + (
                    did_you_mean(k, known) if known else f"; {self.name} takes none"))
            if k in values:
                raise ConfigError(join(where, k), "given twice")
            values[k] = v
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in values:
                out[p.name] = p.check(values[p.name], where)
            elif p.default is _REQUIRED:
                raise ConfigError(join(where, p.name), "required parameter is missing")
            else:
                out[p.name] = p.default
        _cross_check(self.name, out, where)
        return tuple(out.items())


def _cross_check(name: str, params: dict[str, Any], where: str) -> None:
    if name == "resize":
        given = [k for k in ("width", "height", "scale") if params[k] is not None]
        if not given:
            raise ConfigError(where, "give width, height or scale")
        if params["scale"] is not None and len(given) > 1:
            raise ConfigError(join(where, "scale"), "give either scale or width/height, not both")


def _p(name: str, kind: type, default: Any = _REQUIRED, lo: float | None = None,
       hi: float | None = None, optional: bool = False) -> Param:
    return Param(name=name, kind=kind, default=default, min=lo, max=hi, optional=optional)


_MAX_SIDE = 1_000_000
REGISTRY: dict[str, TransformSpec] = {s.name: s for s in (
    TransformSpec(name="auto_orient", func=auto_orient, orients=True),
    TransformSpec(name="grayscale", func=grayscale, luma=True),
    TransformSpec(name="resize", func=resize, params=(
        _p("width", int, None, 1, _MAX_SIDE, optional=True),
        _p("height", int, None, 1, _MAX_SIDE, optional=True),
        _p("scale", float, None, 1e-4, 100.0, optional=True),
        _p("upscale", bool, True)), size=resize_size, gap=1.9),
    TransformSpec(name="resize_half", func=resize_half, size=half_size, gap=1.0),
    TransformSpec(name="thumbnail", func=thumbnail, params=(
        _p("width", int, 128, 1, _MAX_SIDE), _p("height", int, 128, 1, _MAX_SIDE)),
        size=lambda size, width=128, height=128: fit_size(size, (width, height)), gap=1.9),
    TransformSpec(name="crop", func=crop, params=(
        _p("width", int, lo=1), _p("height", int, lo=1),
        _p("x", int, None, 0, optional=True), _p("y", int, None, 0, optional=True))),
    TransformSpec(name="rotate", func=rotate, params=(
        _p("degrees", float, lo=-360.0, hi=360.0), _p("expand", bool, True),
        _p("fill", str, "#000000"))),
    TransformSpec(name="flip", func=flip),
    TransformSpec(name="mirror", func=mirror),
    TransformSpec(name="blur", func=blur, params=(_p("radius", float, 2.0, 0.0, 250.0),)),
    TransformSpec(name="sharpen", func=sharpen, params=(
        _p("radius", float, 2.0, 0.0, 250.0), _p("percent", int, 150, 0, 1000),
        _p("threshold", int, 3, 0, 255))),
    TransformSpec(name="edge_enhance", func=edge_enhance, params=(_p("more", bool, False),)),
    TransformSpec(name="find_edges", func=find_edges),
    TransformSpec(name="autocontrast", func=autocontrast,
                  params=(_p("cutoff", float, 0.0, 0.0, 49.0),)),
    TransformSpec(name="equalize", func=equalize),
    TransformSpec(name="brightness", func=brightness,
                  params=(_p("factor", float, 1.0, 0.0, 100.0),)),
    TransformSpec(name="contrast", func=contrast, params=(_p("factor", float, 1.0, 0.0, 100.0),)),
)}

# Other names users know the same steps by.
ALIASES = {"to_grayscale": "grayscale", "resize_thumbnail": "thumbnail", "exif_transpose":
           "auto_orient", "gray": "grayscale", "greyscale": "grayscale"}


def lookup(name: str, where: str = "") -> TransformSpec:
    spec = REGISTRY.get(ALIASES.get(name, name))
    if spec is None:
        raise ConfigError(where or name, f"unknown transform {name!r}"
                          + did_you_mean(name, [*REGISTRY, *ALIASES], REGISTRY))
    return spec


def spec_for_callable(func: Callable[..., Any]) -> TransformSpec | None:
    """The registry entry of a built-in given as a callable (``to_grayscale`` is ``grayscale``)."""
    for spec in REGISTRY.values():
        if spec.func is func:
            return spec
    return None
