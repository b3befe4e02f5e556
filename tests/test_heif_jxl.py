"""HEIC/HEIF (pillow-heif) and JPEG XL (pillow-jxl-plugin) in and out, on real files the tests
encode with those libraries: round trips, the eight orientations, ICC and EXIF kept, a cut and a
damaged file quarantined with the right reason, and the memory governor's estimate applied
before a pixel is decoded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageCms

from watcher import config, extensions
from watcher.imaging import codec, formats, jxl
from watcher.imaging.pil import register_external
from watcher.imaging.processor import Processor
from watcher.settings.schema import DecodeLimits, OutputOptions
from watcher.tasks import OutputPlan, Result, Task

register_external(("HEIF", "JXL"))

RED, GREEN, BLUE, WHITE = (230, 20, 20), (20, 200, 20), (20, 20, 230), (240, 240, 240)
# EXIF orientation -> the transpose that turns an upright image into what is stored
_STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
          6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def upright(w: int = 96, h: int = 64) -> Image.Image:
    """Quadrants: red top-left, green top-right, blue bottom-left, white bottom-right."""
    im = Image.new("RGB", (w, h), WHITE)
    im.paste(RED, (0, 0, w // 2, h // 2))
    im.paste(GREEN, (w // 2, 0, w, h // 2))
    im.paste(BLUE, (0, h // 2, w // 2, h))
    return im


def encoded(im: Image.Image, fmt: str, **params: object) -> bytes:
    b = io.BytesIO()
    if fmt == "JXL":
        params.setdefault("lossless_jpeg", False)
    im.save(b, format=fmt, quality=params.pop("quality", 92), **params)
    return b.getvalue()


def _near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a[:3], b[:3], strict=True))


def _quadrants(im: Image.Image) -> list[tuple[int, ...]]:
    im = im.convert("RGB")
    w, h = im.size
    return [im.getpixel((w // 4, h // 4)), im.getpixel((3 * w // 4, h // 4)),
            im.getpixel((w // 4, 3 * h // 4)), im.getpixel((3 * w // 4, 3 * h // 4))]


def _upright(im: Image.Image) -> bool:
    return all(_near(got, want) for got, want in
               zip(_quadrants(im), (RED, GREEN, BLUE, WHITE), strict=True))


def run(src: Path, out: Path, *, fmt: str = "same",
        steps: tuple[str, ...] = ("thumbnail(4000, 4000)",),
        memory_cap: int = 0, **opts: object) -> Result:
    p = config.pipeline_from(list(steps), "p", "p", OutputOptions(format=fmt, **opts))
    limits = DecodeLimits()
    out.mkdir(exist_ok=True)
    ext = extensions.output_ext(p.output, str(src), limits.formats)
    return Processor({"p": p}, limits, memory_cap=memory_cap).run(
        Task(seq=1, path=str(src), outputs=(OutputPlan(pipeline="p",
                                                        path=str(out / f"{src.stem}{ext}")),)))


FORMATS = [("HEIF", ".heic"), ("JXL", ".jxl")]


def test_the_new_formats_are_in_the_one_table_and_allowed_by_default() -> None:
    for pillow, ext in FORMATS:
        assert pillow in formats.DEFAULT_FORMATS and pillow in formats.OUTPUTS
        assert formats.OUTPUT_EXTENSIONS[ext] == pillow
    assert formats.OUTPUT_FORMATS["heif"] == "HEIF" and formats.OUTPUT_FORMATS["jxl"] == "JXL"
    assert formats.sniff(encoded(upright(), "HEIF")[:16]) == "HEIF"
    assert formats.sniff(encoded(upright(), "JXL")[:16]) == "JXL"
    exif = Image.Exif()
    exif[0x013B] = "someone"
    assert formats.sniff(encoded(upright(), "JXL", exif=exif.tobytes())[:16]) == "JXL"
    assert "pillow-heif" in formats.library("HEIF") and "libjxl" in formats.library("JXL")


@pytest.mark.parametrize(("pillow", "ext"), FORMATS)
def test_round_trip_keeps_format_size_and_colours(tmp_path: Path, pillow: str, ext: str) -> None:
    src = tmp_path / f"photo{ext}"
    src.write_bytes(encoded(upright(), pillow))
    r = run(src, tmp_path / "out")
    assert r.ok, r.error
    (out,) = r.outputs
    assert out.endswith(ext)
    with Image.open(out) as im:
        assert im.format == pillow and im.size == (96, 64)
        assert _upright(im)
    # and to JPEG, and from JPEG into this format
    r = run(src, tmp_path / "jpeg", fmt="jpeg", steps=("thumbnail(48, 48)",))
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as im:
        assert im.format == "JPEG" and im.size == (48, 32) and _upright(im)
    jpg = tmp_path / "in.jpg"
    upright().save(jpg, quality=95)
    r = run(jpg, tmp_path / "back", fmt=pillow.lower() if pillow != "HEIF" else "heif")
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as im:
        assert im.format == pillow and _upright(im)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("pillow", "ext"), FORMATS)
def test_every_orientation_comes_out_upright(tmp_path: Path, pillow: str, ext: str,
                                             orientation: int) -> None:
    im = upright()
    stored = im.transpose(_STORE[orientation]) if orientation in _STORE else im
    exif = Image.Exif()
    exif[0x0112] = orientation
    src = tmp_path / f"o{orientation}{ext}"
    src.write_bytes(encoded(stored, pillow, exif=exif.tobytes()))
    r = run(src, tmp_path / "out", fmt="png", steps=("thumbnail(48, 48)",))
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as out:
        assert out.size == (48, 32), out.size
        assert _upright(out), _quadrants(out)


def _adobe_like_profile() -> bytes:
    p = ImageCms.createProfile("sRGB")
    return ImageCms.ImageCmsProfile(p).tobytes()


@pytest.mark.parametrize(("pillow", "ext"), FORMATS)
def test_icc_and_exif_reach_the_decoder_and_the_output(tmp_path: Path, pillow: str,
                                                       ext: str) -> None:
    icc = _adobe_like_profile()
    exif = Image.Exif()
    exif[0x013B] = "A. Photographer"
    src = tmp_path / f"meta{ext}"
    src.write_bytes(encoded(upright(), pillow, exif=exif.tobytes(), icc_profile=icc))
    source = codec.decode(str(src), limits=DecodeLimits())
    assert source.format == pillow
    if pillow == "HEIF":
        assert source.icc == icc
    else:  # libjxl stores a known colour space as such, and gives back its own profile of it
        assert source.icc is not None
        assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(source.icc)))
    assert source.exif is not None
    got = Image.Exif()
    got.load(source.exif)
    assert got[0x013B] == "A. Photographer"
    r = run(src, tmp_path / "out", fmt="jpeg", metadata="keep", colour="keep")
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as out:
        assert out.info.get("icc_profile") == source.icc
        assert out.getexif()[0x013B] == "A. Photographer"
    r = run(src, tmp_path / "same", metadata="keep", colour="keep")
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as out:
        assert out.format == pillow
        out.load()
        assert out.getexif()[0x013B] == "A. Photographer"


@pytest.mark.parametrize(("pillow", "ext"), FORMATS)
def test_a_cut_file_is_truncated_and_a_damaged_one_corrupt(tmp_path: Path, pillow: str,
                                                           ext: str) -> None:
    exif = Image.Exif()
    exif[0x013B] = "x"  # a JPEG XL with EXIF is a container whose boxes tell its length
    data = encoded(upright(320, 240).effect_spread(8), pillow, exif=exif.tobytes())
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    r = run(cut, tmp_path / "out")
    assert not r.ok and r.reason == "truncated", (r.reason, r.error)
    bad = bytearray(data)
    start = 300 if pillow == "HEIF" else 120
    for i in range(start, len(bad) - 16, 5):
        bad[i] ^= 0xA5
    damaged = tmp_path / f"bad{ext}"
    damaged.write_bytes(bytes(bad))
    r = run(damaged, tmp_path / "out")
    assert not r.ok and r.reason == "corrupt", (r.reason, r.error)
    # a header no decoder reads, but a signature that says what it was
    head = tmp_path / f"head{ext}"
    head.write_bytes(data[:16] + b"\x00" * 8)
    r = run(head, tmp_path / "out")
    assert not r.ok and r.reason in ("corrupt", "truncated"), (r.reason, r.error)


@pytest.mark.parametrize(("pillow", "ext"), FORMATS)
def test_the_memory_estimate_refuses_a_large_image_before_decoding(
        tmp_path: Path, pillow: str, ext: str) -> None:
    big = tmp_path / f"big{ext}"
    big.write_bytes(encoded(Image.new("RGB", (6000, 4000), (90, 90, 90)), pillow,
                            quality=30))
    r = run(big, tmp_path / "out", steps=("thumbnail(64, 64)",), memory_cap=128 * 2**20)
    assert not r.ok and r.reason == "too-large", (r.reason, r.error)
    assert "6000x4000" in r.error and "would need about" in r.error
    # with room, the same file is decoded
    r = run(big, tmp_path / "out", fmt="png", steps=("thumbnail(64, 64)",),
            memory_cap=4 * 2**30)
    assert r.ok, r.error


def test_the_jxl_header_is_read_without_decoding() -> None:
    data = encoded(upright(1000, 200), "JXL")
    assert jxl.parse_codestream_header(data[:64]) == ((1000, 200), 1)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (1000, 200)
        assert im._im is None  # no pixels yet
        im.load()
        assert _near(im.getpixel((10, 10)), RED)


def test_jxl_quality_maps_to_size_and_100_is_lossless(tmp_path: Path) -> None:
    src = tmp_path / "in.png"
    noise = [Image.effect_noise((256, 256), sigma) for sigma in (30, 50, 70)]
    Image.merge("RGB", noise).save(src)  # photo-like: lossless costs more than lossy
    sizes = {}
    for q in (30, 90, 100):
        r = run(src, tmp_path / f"q{q}", fmt="jxl", quality=q)
        assert r.ok, r.error
        sizes[q] = Path(r.outputs[0]).stat().st_size
    assert sizes[30] < sizes[90] < sizes[100]
    with Image.open(tmp_path / "q100" / "in.jxl") as im, Image.open(src) as orig:
        assert im.convert("RGB").tobytes() == orig.convert("RGB").tobytes()
