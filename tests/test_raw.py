"""Camera RAW through rawpy (LibRaw), on real DNG files written by tests/dnggen.py: the embedded
preview or a full demosaic ([input] raw), upright by the RAW's own orientation either way, a cut
and a damaged file quarantined with the right reason, and the memory estimate before decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.dnggen import make_dng
from tests.test_heif_jxl import _STORE, _quadrants, upright
from watcher import config, extensions
from watcher.imaging import codec, formats
from watcher.imaging.processor import Processor
from watcher.settings.schema import DecodeLimits, OutputOptions
from watcher.tasks import OutputPlan, Result, Task


def _dominant(px: tuple[int, ...]) -> str:
    r, g, b = px[:3]
    if min(r, g, b) > 180:
        return "white"
    return "rgb"[max(range(3), key=lambda i: px[i])]


def _upright(im: Image.Image) -> bool:
    return [_dominant(p) for p in _quadrants(im)] == ["r", "g", "b", "white"]


def run(src: Path, out: Path, *, raw: str = "auto", steps: tuple[str, ...] = (
        "thumbnail(4000, 4000)",), memory_cap: int = 0, fmt: str = "png") -> Result:
    p = config.pipeline_from(list(steps), "p", "p", OutputOptions(format=fmt))
    limits = DecodeLimits(raw=raw)
    out.mkdir(exist_ok=True)
    ext = extensions.output_ext(p.output, str(src), limits.formats)
    return Processor({"p": p}, limits, memory_cap=memory_cap).run(
        Task(seq=1, path=str(src), outputs=(OutputPlan(pipeline="p",
                                                        path=str(out / f"{src.stem}{ext}")),)))


def dng(tmp_path: Path, name: str, orientation: int = 1, size: tuple[int, int] = (96, 64),
        preview: tuple[int, int] | None = (48, 32)) -> Path:
    pic = upright(*size)
    stored = pic.transpose(_STORE[orientation]) if orientation in _STORE else pic
    pv = stored.resize(preview if orientation < 5 else preview[::-1]) if preview else None
    if pv is not None:  # a preview that differs visibly from the demosaic: a dark frame
        frame = Image.new("RGB", pv.size, (0, 0, 0))
        frame.paste(pv.crop((6, 6, pv.width - 6, pv.height - 6)), (6, 6))
        pv = frame
    path = tmp_path / name
    path.write_bytes(make_dng(stored, orientation=orientation, preview=pv))
    return path


def test_raw_is_in_the_table_read_before_tiff_and_written_as_jpeg() -> None:
    assert "RAW" in formats.DEFAULT_FORMATS and "RAW" not in formats.OUTPUTS
    assert formats.open_order(("TIFF", "RAW", "PNG")) == ("RAW", "TIFF", "PNG")
    assert formats.READ_ONLY_EXTENSIONS[".dng"] == "RAW"
    assert extensions.output_ext(OutputOptions(), "x.DNG", formats.DEFAULT_FORMATS) == ".jpg"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", ["demosaic", "preview"])
def test_a_dng_comes_out_upright_from_the_demosaic_and_the_preview(
        tmp_path: Path, mode: str, orientation: int) -> None:
    src = dng(tmp_path, f"o{orientation}.dng", orientation)
    r = run(src, tmp_path / "out", raw=mode)
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as im:
        assert im.size == ((96, 64) if mode == "demosaic" else (48, 32)), im.size
        assert _upright(im), _quadrants(im)
        top = im.convert("RGB").getpixel((im.width // 2, 0))
        assert (max(top) < 40) == (mode == "preview")  # the preview's dark frame


def test_auto_takes_the_preview_only_when_it_is_large_enough(tmp_path: Path) -> None:
    src = dng(tmp_path, "a.dng", 6, size=(192, 128), preview=(96, 64))
    small = run(src, tmp_path / "small", steps=("thumbnail(40, 40)",))
    assert small.ok, small.error
    with Image.open(small.outputs[0]) as im:  # from the preview: its dark top rows
        assert max(im.convert("RGB").getpixel((im.width // 2, 0))) < 60
        assert _upright(im)
    large = run(src, tmp_path / "large", steps=("thumbnail(120, 120)",))
    assert large.ok, large.error
    with Image.open(large.outputs[0]) as im:  # the preview (64 wide) is too small: demosaic
        assert im.size == (120, 80), im.size
        assert max(im.convert("RGB").getpixel((im.width // 2, 0))) > 60
        assert _upright(im)
    plain = run(src, tmp_path / "plain")  # no shrink asked: the full demosaic
    with Image.open(plain.outputs[0]) as im:
        assert im.size == (192, 128)


def test_a_dng_without_preview_is_demosaiced_in_preview_mode_too(tmp_path: Path) -> None:
    src = dng(tmp_path, "np.dng", 1, preview=None)
    r = run(src, tmp_path / "out", raw="preview")
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as im:
        assert im.size == (96, 64) and _upright(im)


def test_format_same_writes_a_jpeg(tmp_path: Path) -> None:
    src = dng(tmp_path, "same.dng")
    r = run(src, tmp_path / "out", fmt="same")
    assert r.ok, r.error
    assert r.outputs[0].endswith(".jpg")
    with Image.open(r.outputs[0]) as im:
        assert im.format == "JPEG"


def test_an_ordinary_tiff_is_still_a_tiff(tmp_path: Path) -> None:
    src = tmp_path / "plain.tif"
    upright().save(src)
    source = codec.decode(str(src), limits=DecodeLimits())
    assert source.format == "TIFF"


def test_a_cut_dng_is_truncated_and_a_damaged_one_corrupt(tmp_path: Path) -> None:
    data = dng(tmp_path, "good.dng", 1, size=(256, 192), preview=None).read_bytes()
    cut = tmp_path / "cut.dng"
    cut.write_bytes(data[: len(data) // 2])
    r = run(cut, tmp_path / "out", raw="demosaic")
    assert not r.ok and r.reason == "truncated", (r.reason, r.error)
    bad = bytearray(data)
    bad[4:8] = b"\xff\xff\xff\x7f"  # IFD0 far past the end
    damaged = tmp_path / "bad.dng"
    damaged.write_bytes(bytes(bad))
    r = run(damaged, tmp_path / "out")
    assert not r.ok and r.reason in ("corrupt", "not-an-image"), (r.reason, r.error)


def test_the_memory_estimate_refuses_a_large_raw_before_demosaicing(tmp_path: Path) -> None:
    src = tmp_path / "big.dng"
    src.write_bytes(make_dng(Image.new("RGB", (3000, 2000), (90, 90, 90))))
    r = run(src, tmp_path / "out", raw="demosaic", memory_cap=128 * 2**20)
    assert not r.ok and r.reason == "too-large", (r.reason, r.error)
    assert "3000x2000" in r.error
