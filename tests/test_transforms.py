"""Each built-in transform: works on every working mode and on a 1-pixel image, keeps alpha,
validates its parameters."""

from __future__ import annotations

import pytest
from PIL import Image

from watcher import config, transforms
from watcher.errors import ConfigError
from watcher.samples import picture
from watcher.transforms import REGISTRY

# Arguments that make each transform do something (required ones filled in).
ARGS = {"crop": {"width": 20, "height": 10}, "rotate": {"degrees": 30},
        "resize": {"width": 40}, "thumbnail": {"width": 16, "height": 16}}
MODES = ["L", "LA", "RGB", "RGBA", "P", "1", "CMYK", "I;16", "I", "F"]


def sample(mode: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    im = picture(*size)
    if mode in ("LA", "RGBA"):
        im = im.convert(mode)
    elif mode == "I;16":
        im = im.convert("L").point(lambda v: v * 257, "I").convert("I;16")
    elif mode != "RGB":
        im = im.convert(mode)
    return im


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("mode", MODES)
def test_transform_accepts_every_mode(name: str, mode: str) -> None:
    spec = REGISTRY[name]
    params = dict(spec.bind((), ARGS.get(name, {}), "t"))
    out = spec.func(sample(mode), **params)
    assert isinstance(out, Image.Image)
    assert out.width >= 1 and out.height >= 1


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_transform_on_one_pixel_image(name: str) -> None:
    spec = REGISTRY[name]
    params = dict(spec.bind((), ARGS.get(name, {}), "t"))
    out = spec.func(Image.new("RGB", (1, 1), (10, 20, 30)), **params)
    assert out.size[0] >= 1 and out.size[1] >= 1


def test_resize_half_of_one_pixel_is_one_pixel() -> None:
    assert transforms.resize_half(Image.new("RGB", (1, 1))).size == (1, 1)
    assert transforms.resize_half(Image.new("RGB", (3, 1))).size == (1, 1)
    assert transforms.resize_half(Image.new("RGB", (640, 480))).size == (320, 240)


def test_thumbnail_fits_box_keeps_aspect_and_never_enlarges() -> None:
    assert transforms.thumbnail(Image.new("RGB", (400, 100)), 128, 128).size == (128, 32)
    assert transforms.thumbnail(Image.new("RGB", (100, 400)), 128, 128).size == (32, 128)
    assert transforms.thumbnail(Image.new("RGB", (50, 20)), 128, 128).size == (50, 20)
    assert transforms.thumbnail(Image.new("RGB", (5000, 1)), 128, 128).size == (128, 1)


def test_resize_by_width_height_and_scale() -> None:
    im = Image.new("RGB", (400, 200))
    assert transforms.resize(im, width=100).size == (100, 50)
    assert transforms.resize(im, height=50).size == (100, 50)
    assert transforms.resize(im, width=100, height=100).size == (100, 50)
    assert transforms.resize(im, scale=0.25).size == (100, 50)
    assert transforms.resize(im, width=800).size == (800, 400)
    assert transforms.resize(im, width=800, upscale=False).size == (400, 200)


def test_grayscale_keeps_alpha_band() -> None:
    im = Image.new("RGBA", (4, 4), (200, 10, 10, 77))
    out = transforms.grayscale(im)
    assert out.mode == "LA"
    assert out.getpixel((0, 0))[1] == 77


def test_colour_operations_leave_alpha_alone() -> None:
    im = Image.new("RGBA", (8, 8), (100, 150, 200, 33))
    for fn in (transforms.blur, transforms.sharpen, transforms.equalize, transforms.autocontrast,
               transforms.find_edges, transforms.edge_enhance):
        assert fn(im).getchannel("A").getextrema() == (33, 33), fn.__name__
    assert transforms.brightness(im, 0.0).getpixel((0, 0)) == (0, 0, 0, 33)
    assert transforms.contrast(im, 1.0).getpixel((0, 0)) == (100, 150, 200, 33)


def test_crop_centre_and_clip() -> None:
    im = picture(100, 50)
    assert transforms.crop(im, 20, 10).size == (20, 10)
    assert transforms.crop(im, 20, 10).getpixel((0, 0)) == im.getpixel((40, 20))
    assert transforms.crop(im, 500, 500).size == (100, 50)
    assert transforms.crop(im, 30, 30, x=90, y=40).size == (10, 10)


def test_rotate_flip_mirror_geometry() -> None:
    im = Image.new("RGB", (40, 20))
    im.putpixel((0, 0), (255, 0, 0))
    assert transforms.rotate(im, 90).size == (20, 40)
    assert transforms.rotate(im, 90).getpixel((0, 39)) == (255, 0, 0)
    assert transforms.mirror(im).getpixel((39, 0)) == (255, 0, 0)
    assert transforms.flip(im).getpixel((0, 19)) == (255, 0, 0)
    assert transforms.rotate(im, 45).size[0] > 40


def test_seed_names_are_the_builtins() -> None:
    assert transforms.to_grayscale is transforms.grayscale
    assert transforms.resize_thumbnail is transforms.thumbnail
    assert transforms.lookup("to_grayscale").name == "grayscale"
    assert transforms.lookup("resize_thumbnail").name == "thumbnail"


@pytest.mark.parametrize(("text", "where"), [
    ("thumbnail(0, 10)", "--ops[thumbnail].width"),
    ("thumbnail(10, 10, 10)", "--ops[thumbnail]"),
    ("thumbnail(size=3)", "--ops[thumbnail].size"),
    ("blur(radius='big')", "--ops[blur].radius"),
    ("resize()", "--ops[resize]"),
    ("resize(width=10, scale=0.5)", "--ops[resize].scale"),
    ("rotate()", "--ops[rotate].degrees"),
    ("rotate(10, fill='notacolour')", "--ops[rotate].fill"),
    ("sharpen(percent=-1)", "--ops[sharpen].percent"),
    ("nosuch", "--ops[nosuch]"),
    ("thumbnail(x)", "--ops"),
])
def test_bad_parameters_name_the_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse_step(text, "--ops")
    assert e.value.where == where


def test_ints_accepted_for_floats_but_not_bools_for_ints() -> None:
    assert dict(config.parse_step("blur(3)", "x").params) == {"radius": 3.0}
    with pytest.raises(ConfigError):
        config.parse_step("thumbnail(True, 10)", "x")
