"""One input through the real pipeline (the worker's Processor, in this process): modes and
formats, colour, metadata, animation, shrink-on-load, and every way an input can be bad."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms

from tests import crashers
from tests.iccgen import rgb_profile
from watcher import config
from watcher.imaging import codec
from watcher.imaging.pipeline import Pipeline, plan_shrink
from watcher.imaging.processor import Processor
from watcher.samples import picture
from watcher.settings.schema import DecodeLimits, OutputOptions
from watcher.tasks import OutputPlan, Task

CMYK_ICC = "/usr/share/color/icc/ghostscript/default_cmyk.icc"
ADOBE_RGB_ICC = "/usr/share/color/icc/ghostscript/a98.icc"


def pipe(*steps: Any, name: str = "p", **opts: Any) -> Pipeline:
    return config.pipeline_from(list(steps) or ["grayscale"], name, name, OutputOptions(**opts))


def run(src: Path, out: Path, pipeline: Pipeline, limits: DecodeLimits | None = None,
        nofollow: bool = False) -> Any:
    proc = Processor({pipeline.name: pipeline}, limits or DecodeLimits())
    return proc.run(Task(seq=1, path=str(src),
                         outputs=(OutputPlan(pipeline=pipeline.name, path=str(out)),),
                         nofollow=nofollow))


def px(path: Path, xy: tuple[int, int] = (0, 0)) -> Any:
    with Image.open(path) as im:
        return im.convert("RGB").getpixel(xy)


# --- the seed transforms and format conversion ---------------------------------------------------

def test_grayscale_half_keeps_format(tmp_path: Path, img: Any) -> None:
    src = img("a.png", size=(101, 51))
    r = run(src, tmp_path / "a_processed.png", pipe("grayscale", "resize_half"))
    assert r.ok, r.error
    with Image.open(tmp_path / "a_processed.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (50, 25))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"])
@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "avif", "bmp", "tif", "gif"])
def test_every_mode_saves_in_every_format(tmp_path: Path, mode: str, fmt: str) -> None:
    im = picture(40, 30)
    im = {"RGBA": lambda: im.convert("RGBA"), "LA": lambda: im.convert("LA"),
          "I;16": lambda: im.convert("L").point(lambda v: v * 257, "I").convert("I;16"),
          }.get(mode, lambda: im.convert(mode))()
    src = tmp_path / "in.tif"
    im.save(src)
    out = tmp_path / f"out.{fmt}"
    r = run(src, out, pipe("thumbnail(20, 20)"))
    assert r.ok, r.error
    with Image.open(out) as o:
        assert o.size == (20, 15)
        o.load()


def test_alpha_flattened_onto_configured_background_for_jpeg(tmp_path: Path) -> None:
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((5, 5), (0, 0, 255, 255))
    im.save(tmp_path / "t.png")
    r = run(tmp_path / "t.png", tmp_path / "t.jpg", pipe("mirror", background="#00ff00"))
    assert r.ok, r.error
    r_, g, b = px(tmp_path / "t.jpg", (0, 0))
    assert g > 240 and r_ < 20 and b < 20  # the background, not the hidden red


def test_palette_with_transparency_to_jpeg(tmp_path: Path) -> None:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 1
    im.save(tmp_path / "p.gif", transparency=1)
    r = run(tmp_path / "p.gif", tmp_path / "p.jpg", pipe("mirror"))
    assert r.ok, r.error
    assert min(px(tmp_path / "p.jpg")) > 240  # white background, not red


def test_sixteen_bit_png_is_scaled_not_clamped(tmp_path: Path) -> None:
    Image.new("I;16", (4, 4), 40000).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode == "I;16"
    r = run(tmp_path / "g16.png", tmp_path / "g16_out.png", pipe("mirror"))
    assert r.ok, r.error
    with Image.open(tmp_path / "g16_out.png") as o:
        assert o.mode == "L"
        assert o.getpixel((0, 0)) == round(40000 * 255 / 65535)  # 156, where convert("L") is 255


def test_float_tiff_is_scaled(tmp_path: Path) -> None:
    Image.new("F", (4, 4), 0.5).save(tmp_path / "f.tif")
    r = run(tmp_path / "f.tif", tmp_path / "f.png", pipe("mirror"))
    assert r.ok, r.error
    assert px(tmp_path / "f.png")[0] in (127, 128)


def test_adobe_cmyk_jpeg_without_profile_keeps_colours(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    with Image.open(tmp_path / "c.jpg") as check:
        assert check.mode == "CMYK" and check.info.get("adobe")
    r = run(tmp_path / "c.jpg", tmp_path / "c_out.jpg", pipe("mirror"))
    assert r.ok, r.error
    r_, g, b = px(tmp_path / "c_out.jpg", (8, 8))
    assert r_ > 235 and g < 20 and b < 20


@pytest.mark.skipif(not os.path.exists(CMYK_ICC), reason="needs Debian's libgs-common "
                    "(a CMYK ICC profile); scripts/test installs it")
def test_cmyk_with_profile_goes_through_the_profile(tmp_path: Path) -> None:
    icc = Path(CMYK_ICC).read_bytes()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", icc_profile=icc)
    r = run(tmp_path / "c.jpg", tmp_path / "c.png", pipe("mirror"))
    assert r.ok, r.error
    with Image.open(tmp_path / "c.jpg") as src:
        expected = ImageCms.profileToProfile(src, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                             ImageCms.createProfile("sRGB"), outputMode="RGB")
        naive = src.convert("RGB").getpixel((8, 8))
    got = px(tmp_path / "c.png", (8, 8))
    assert all(abs(a - b) <= 2 for a, b in zip(got, expected.getpixel((8, 8)), strict=True))
    assert got != naive  # the SWOP profile gives a different red than the naive formula


def test_display_p3_converted_to_srgb_and_tagged(tmp_path: Path) -> None:
    p3 = rgb_profile()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "p3.png", icc_profile=p3)
    r = run(tmp_path / "p3.png", tmp_path / "out.png", pipe("mirror"))
    assert r.ok, r.error
    with Image.open(tmp_path / "out.png") as o:
        assert o.getpixel((0, 0)) == (216, 93, 24)  # LittleCMS: P3 (200,100,50) in sRGB
        prof = ImageCms.ImageCmsProfile(io.BytesIO(o.info["icc_profile"]))
        assert "sRGB" in prof.profile.profile_description


def test_colour_keep_leaves_pixels_and_profile(tmp_path: Path) -> None:
    p3 = rgb_profile()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "p3.png", icc_profile=p3)
    r = run(tmp_path / "p3.png", tmp_path / "out.png", pipe("mirror", colour="keep"))
    assert r.ok, r.error
    with Image.open(tmp_path / "out.png") as o:
        assert o.getpixel((0, 0)) == (200, 100, 50)
        assert o.info["icc_profile"] == p3


@pytest.mark.skipif(not os.path.exists(ADOBE_RGB_ICC), reason="needs Debian's libgs-common")
def test_adobe_rgb_converted_to_srgb(tmp_path: Path) -> None:
    icc = Path(ADOBE_RGB_ICC).read_bytes()
    Image.new("RGB", (8, 8), (40, 200, 60)).save(tmp_path / "a.png", icc_profile=icc)
    r = run(tmp_path / "a.png", tmp_path / "o.png", pipe("mirror"))
    assert r.ok, r.error
    got = px(tmp_path / "o.png")
    assert got != (40, 200, 60) and got[1] > 200  # Adobe green is more saturated than sRGB's


def test_grayscale_of_wide_gamut_has_no_rgb_profile(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "p3.jpg", icc_profile=rgb_profile())
    r = run(tmp_path / "p3.jpg", tmp_path / "g.jpg", pipe("grayscale"))
    assert r.ok, r.error
    with Image.open(tmp_path / "g.jpg") as o:
        assert o.mode == "L" and "icc_profile" not in o.info


# --- metadata ---------------------------------------------------------------------------------

def exif_photo(path: Path, orientation: int = 1) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x8298] = "(c) Test Photographer"
    exif[0x013B] = "Test Photographer"
    exif[0x010F] = "CameraMaker"
    gps = {1: "N", 2: (52.0, 22.0, 1.0), 3: "E", 4: (4.0, 53.0, 2.0)}
    exif[0x8825] = gps
    picture(64, 48).save(path, exif=exif.tobytes(), quality=90)
    return path


def test_default_strips_exif_including_gps(tmp_path: Path) -> None:
    r = run(exif_photo(tmp_path / "e.jpg"), tmp_path / "o.jpg", pipe("mirror"))
    assert r.ok, r.error
    with Image.open(tmp_path / "o.jpg") as o:
        assert not o.info.get("exif")
        assert len(o.getexif()) == 0


def test_metadata_keep_keeps_exif_with_orientation_reset(tmp_path: Path) -> None:
    r = run(exif_photo(tmp_path / "e.jpg", 6), tmp_path / "o.jpg", pipe("mirror", metadata="keep"))
    assert r.ok, r.error
    with Image.open(tmp_path / "o.jpg") as o:
        exif = o.getexif()
        assert exif[0x010F] == "CameraMaker" and exif[0x0112] == 1
        assert 0x8825 in exif
        assert o.size == (48, 64)


def test_metadata_copyright_keeps_only_artist_and_copyright(tmp_path: Path) -> None:
    r = run(exif_photo(tmp_path / "e.jpg"), tmp_path / "o.jpg",
            pipe("mirror", metadata="copyright"))
    assert r.ok, r.error
    with Image.open(tmp_path / "o.jpg") as o:
        exif = o.getexif()
        assert dict(exif) == {0x013B: "Test Photographer", 0x8298: "(c) Test Photographer"}


def test_orientation_applied_by_default(tmp_path: Path) -> None:
    r = run(exif_photo(tmp_path / "e.jpg", 6), tmp_path / "o.jpg", pipe("thumbnail(32, 32)"))
    assert r.ok, r.error
    with Image.open(tmp_path / "o.jpg") as o:
        assert o.size == (24, 32)  # stored 64x48 sideways: upright it is 48x64


def test_malformed_exif_does_not_fail_the_image(tmp_path: Path) -> None:
    good = io.BytesIO()
    picture(64, 48).save(good, "JPEG")
    data = good.getvalue()
    bad_exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff"
    app1 = b"\xff\xe1" + (len(bad_exif) + 2).to_bytes(2, "big") + bad_exif
    (tmp_path / "bad.jpg").write_bytes(data[:2] + app1 + data[2:])
    r = run(tmp_path / "bad.jpg", tmp_path / "o.jpg", pipe("thumbnail(32, 32)", metadata="keep"))
    assert r.ok, r.error
    assert any("exif" in w.lower() for w in r.warnings), r.warnings
    with Image.open(tmp_path / "o.jpg") as o:
        assert o.size == (32, 24)


# --- animation ---------------------------------------------------------------------------------

def animated(path: Path, n: int = 5) -> Path:
    frames = [picture(40, 30, seed=i) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
    return path


def test_animated_gif_first_frame_by_default(tmp_path: Path) -> None:
    r = run(animated(tmp_path / "a.gif"), tmp_path / "o.gif", pipe("thumbnail(20, 20)"))
    assert r.ok, r.error
    with Image.open(tmp_path / "o.gif") as o:
        assert getattr(o, "n_frames", 1) == 1 and o.size == (20, 15)


@pytest.mark.parametrize("ext", ["gif", "webp", "png"])
def test_animated_all_frames_where_the_format_keeps_them(tmp_path: Path, ext: str) -> None:
    r = run(animated(tmp_path / "a.gif"), tmp_path / f"o.{ext}",
            pipe("thumbnail(20, 20)", frames="all"))
    assert r.ok, r.error
    with Image.open(tmp_path / f"o.{ext}") as o:
        assert o.n_frames == 5 and o.size == (20, 15)


def test_animated_to_jpeg_takes_first_frame(tmp_path: Path) -> None:
    r = run(animated(tmp_path / "a.webp"), tmp_path / "o.jpg", pipe("mirror", frames="all"))
    assert r.ok, r.error
    with Image.open(tmp_path / "o.jpg") as o:
        assert o.size == (40, 30)


def test_frame_limit(tmp_path: Path) -> None:
    r = run(animated(tmp_path / "a.gif", 6), tmp_path / "o.gif",
            pipe("mirror", frames="all", max_frames=3))
    assert r.ok, r.error
    assert any("max_frames" in w for w in r.warnings)
    with Image.open(tmp_path / "o.gif") as o:
        assert o.n_frames == 3


def test_multipage_tiff_first_page(tmp_path: Path) -> None:
    pages = [picture(40, 30, seed=i) for i in range(3)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    r = run(tmp_path / "m.tif", tmp_path / "o.png", pipe("mirror"))
    assert r.ok, r.error
    with Image.open(tmp_path / "o.png") as o:
        assert o.size == (40, 30)


# --- shrink-on-load --------------------------------------------------------------------------

def test_plan_shrink_for_thumbnail_and_orientation() -> None:
    p = pipe("thumbnail(256, 256)")
    # the smallest DCT scale that leaves ~2x for the final filter (libvips' rule)
    s = plan_shrink(p, (4000, 3000), 1)
    assert s is not None and s.target == (256, 192) and s.need == (487, 365) and not s.luma
    s6 = plan_shrink(p, (4000, 3000), 6)  # stored sideways: upright it is 3000x4000
    # upright it needs 365x487; the decoder is asked in stored orientation
    assert s6 is not None and s6.target == (192, 256) and s6.need == (487, 365)
    g = plan_shrink(pipe("grayscale", "resize_half"), (4000, 3000), 1)
    assert g is not None and g.luma and g.need == (2000, 1500)
    assert plan_shrink(pipe("blur", "thumbnail(10,10)"), (4000, 3000), 1) is None
    assert plan_shrink(pipe("thumbnail(8000, 8000)"), (4000, 3000), 1) is None


def test_big_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    picture(4000, 3000).save(tmp_path / "big.jpg", quality=90)
    p = pipe("thumbnail(256, 256)")
    shrink = plan_shrink(p, (4000, 3000), 1)
    assert shrink is not None
    src = codec.decode(str(tmp_path / "big.jpg"), limits=DecodeLimits(),
                       plan=lambda im: ("RGB", shrink.need))
    assert src.size == (4000, 3000) and src.image.size == (500, 375)  # decoded at 1/8 scale
    r = run(tmp_path / "big.jpg", tmp_path / "t.jpg", p)
    assert r.ok, r.error
    with Image.open(tmp_path / "t.jpg") as o:
        assert o.size == (256, 192)


def test_reduced_decode_matches_full_decode_quality(tmp_path: Path) -> None:
    picture(2400, 1800).save(tmp_path / "big.jpg", quality=95)
    r = run(tmp_path / "big.jpg", tmp_path / "t.png", pipe("thumbnail(200, 200)"))
    assert r.ok, r.error
    with Image.open(tmp_path / "big.jpg") as full:
        ref = full.convert("RGB").resize((200, 150), Image.Resampling.LANCZOS)
    with Image.open(tmp_path / "t.png") as got:
        diff = [abs(a - b) for a, b in zip(ref.tobytes(), got.convert("RGB").tobytes(),
                                           strict=True)]
    mse = sum(d * d for d in diff) / len(diff)
    psnr = 10 * __import__("math").log10(255 * 255 / max(mse, 1e-9))
    assert psnr >= 35, psnr


# --- bad inputs ----------------------------------------------------------------------------------

def reason(tmp_path: Path, src: Path, **kw: Any) -> str:
    r = run(src, tmp_path / "out" / "o.png", pipe("thumbnail(16,16)"), **kw)
    assert not r.ok
    assert not (tmp_path / "out" / "o.png").exists()
    return r.reason


def test_missing_file(tmp_path: Path) -> None:
    assert reason(tmp_path, tmp_path / "nope.jpg") == "missing"


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_text("hello, I am text")
    assert reason(tmp_path, tmp_path / "x.jpg") == "not-an-image"


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    assert reason(tmp_path, tmp_path / "x.png") == "not-an-image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF"])
def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    b = io.BytesIO()
    picture(300, 200).save(b, fmt)
    data = b.getvalue()
    (tmp_path / "t.img").write_bytes(data[: len(data) * 2 // 3])
    assert reason(tmp_path, tmp_path / "t.img") in ("truncated", "corrupt")


def test_truncated_jpeg_reason_is_truncated(tmp_path: Path) -> None:
    b = io.BytesIO()
    picture(300, 200).save(b, "JPEG")
    (tmp_path / "t.jpg").write_bytes(b.getvalue()[:-2000])
    assert reason(tmp_path, tmp_path / "t.jpg") == "truncated"


def test_corrupt_image(tmp_path: Path) -> None:
    b = io.BytesIO()
    picture(300, 200).save(b, "PNG")
    data = bytearray(b.getvalue())
    data[24] = 3  # IHDR bit depth 3 does not exist
    (tmp_path / "c.png").write_bytes(bytes(data))
    assert reason(tmp_path, tmp_path / "c.png") == "corrupt"


def test_corrupt_compressed_data(tmp_path: Path) -> None:
    b = io.BytesIO()
    picture(300, 200).save(b, "PNG", compress_level=9)
    data = bytearray(b.getvalue())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4: at], "big")
    body = slice(at + 6, at + 4 + length - 4)  # keep the zlib header, garble the rest
    data[body] = __import__("random").Random(1).randbytes(body.stop - body.start)
    (tmp_path / "c.png").write_bytes(bytes(data))
    assert reason(tmp_path, tmp_path / "c.png") == "corrupt"


def test_decompression_bomb(tmp_path: Path, img: Any) -> None:
    src = img("big.png", size=(300, 300))
    assert reason(tmp_path, src, limits=DecodeLimits(pixel_limit=50_000)) == "decompression-bomb"


def test_format_not_allowed(tmp_path: Path, img: Any) -> None:
    src = img("x.bmp")
    assert reason(tmp_path, src, limits=DecodeLimits(formats=("JPEG", "PNG"))) \
        == "format-not-allowed"


def test_too_large_file(tmp_path: Path, img: Any) -> None:
    src = img("x.png", size=(100, 100))
    assert reason(tmp_path, src, limits=DecodeLimits(max_file_size=100)) == "too-large"


def test_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(reason(tmp_path, fifo)), daemon=True)
    t.start()
    t.join(10)
    assert result == ["not-a-file"]


def test_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "d.jpg").mkdir()
    assert reason(tmp_path, tmp_path / "d.jpg") == "not-a-file"


def test_symlink_refused_with_nofollow_without_reading_target(tmp_path: Path, img: Any) -> None:
    os.symlink("/etc/passwd", tmp_path / "l.jpg")
    assert reason(tmp_path, tmp_path / "l.jpg", nofollow=True) == "symlink"
    os.symlink(img("real.png"), tmp_path / "l2.png")
    assert reason(tmp_path, tmp_path / "l2.png", nofollow=True) == "symlink"


def test_symlink_followed_in_batch_by_default(tmp_path: Path, img: Any) -> None:
    os.symlink(img("real.png"), tmp_path / "l.png")
    assert run(tmp_path / "l.png", tmp_path / "o.png", pipe("mirror")).ok


def test_transform_error_is_reported_with_step(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), crashers.POISON).save(tmp_path / "p.png")
    r = run(tmp_path / "p.png", tmp_path / "o.png", pipe(crashers.raise_on_poison))
    assert (r.ok, r.reason) == (False, "transform-failed")
    assert "raise_on_poison" in r.error and "poisoned pixel" in r.error
    assert not (tmp_path / "o.png").exists()


def test_transform_returning_none_is_explained(tmp_path: Path, img: Any) -> None:
    r = run(img("a.png"), tmp_path / "o.png", pipe(crashers.in_place_thumbnail))
    assert r.reason == "transform-failed" and "returned NoneType" in r.error
