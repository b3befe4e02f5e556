"""Whose fault is a failure: one test per defect of issue 12, each with a real file.

A bad input ends with a documented, permanent reason (it is quarantined, never retried); a
transient reason (``io-error``, ``write-failed``) needs evidence that the system failed.
"""

from __future__ import annotations

import errno
import io
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import make_image
from tests.test_fuzz import grey_png_bomb, make_seeds
from watcher import config, extensions
from watcher.errors import REASONS, TRANSIENT_REASONS
from watcher.imaging import codec, encode, inputfile
from watcher.imaging.processor import Processor
from watcher.samples import picture
from watcher.settings.schema import DecodeLimits, OutputOptions
from watcher.tasks import OutputPlan, Result, Task


def _run(src: Path, out: Path, *, fmt: str = "same", frames: str = "first",
         steps: tuple[str, ...] = ("thumbnail(32, 32)",), name: str | None = None) -> Result:
    """``src`` through one pipeline, its output named as the batch planner names it."""
    p = config.pipeline_from(list(steps), "p", "p", OutputOptions(format=fmt, frames=frames))
    limits = DecodeLimits()
    out.mkdir(exist_ok=True)
    ext = extensions.output_ext(p.output, str(src), limits.formats)
    target = out / (name or f"{src.stem}_p{ext}")
    return Processor({"p": p}, limits).run(
        Task(seq=1, path=str(src), outputs=(OutputPlan(pipeline="p", path=str(target)),)))


def _permanent(r: Result, reason: str) -> None:
    assert not r.ok and r.reason == reason, (r.reason, r.error)
    assert reason in REASONS and reason not in TRANSIENT_REASONS


# --- 1: every bad input maps to a documented reason ---------------------------------------------

def test_a_grey_png_more_than_twice_the_pixel_limit_is_a_decompression_bomb(
        tmp_path: Path) -> None:
    src = tmp_path / "bomb.png"
    data = grey_png_bomb(13380)  # complete and valid: 179 M black pixels in ~200 kB
    src.write_bytes(data)
    assert len(data) < 300_000 and data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, colour) == (13380, 13380, 8, 0)
    assert width * height > 2 * DecodeLimits().pixel_limit  # Pillow raises, not warns
    _permanent(_run(src, tmp_path / "out"), "decompression-bomb")


def _pages_with_a_bad_next_ifd(path: Path) -> Path:
    """A 3-page TIFF whose first IFD points its next one at the middle of the file."""
    data = bytearray(make_seeds()["pages.tif"])
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    struct.pack_into("<I", data, ifd + 2 + 12 * count, 9)
    path.write_bytes(data)
    return path


def test_a_tiff_whose_frame_count_cannot_be_read_is_corrupt(tmp_path: Path) -> None:
    # Counting its frames raises TypeError ("Missing dimensions") in Pillow.
    src = _pages_with_a_bad_next_ifd(tmp_path / "pages.tif")
    _permanent(_run(src, tmp_path / "out", fmt="webp", frames="all"), "corrupt")


def test_an_animated_webp_the_encoder_refuses_is_encode_failed(tmp_path: Path) -> None:
    # Pages wider than WebP's 16383 pixels: libwebp's animation encoder raises RuntimeError.
    src = tmp_path / "wide.tif"
    first, second = Image.new("RGB", (20000, 8), "red"), Image.new("RGB", (20000, 8), "blue")
    first.save(src, save_all=True, append_images=[second])
    r = _run(src, tmp_path / "out", fmt="webp", frames="all", steps=("grayscale",))
    _permanent(r, "encode-failed")
    assert "RuntimeError" in r.error
    assert os.listdir(tmp_path / "out") == []


def test_pages_of_different_sizes_become_one_animated_webp(tmp_path: Path) -> None:
    src = tmp_path / "pages.tif"
    picture(40, 30).save(src, save_all=True, append_images=[picture(20, 50, 1)])
    r = _run(src, tmp_path / "out", fmt="webp", frames="all", steps=("grayscale",))
    assert r.ok, r.error
    with Image.open(r.outputs[0]) as im:
        assert im.n_frames == 2 and im.size == (40, 30)
    assert any("resized to the first frame's" in w for w in r.warnings)


def test_a_rotation_that_would_exceed_the_pixel_limit_fails_the_transform(
        tmp_path: Path) -> None:
    src = make_image(tmp_path / "strip.png", size=(65000, 48))  # 3 M pixels; 30 degrees: 1.8 G
    r = _run(src, tmp_path / "out", steps=("rotate(30)",))
    _permanent(r, "transform-failed")
    assert "pixel limit" in r.error


# --- 2: a non-image is not-an-image, and an output without an encoder is never transient --------

@pytest.mark.parametrize(("name", "data"), [
    ("notes.txt", b"shopping list\n- milk\n"),
    ("doc.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"),
    ("meta.json", b'{"camera": "x", "iso": 100}'),
    ("IMG_1.xmp", b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'),
])
def test_a_non_image_is_not_an_image(tmp_path: Path, name: str, data: bytes) -> None:
    src = tmp_path / name
    src.write_bytes(data)
    r = _run(src, tmp_path / "out")  # format "same": the planner keeps the extension
    _permanent(r, "not-an-image")


def test_a_planned_output_without_an_encoder_is_a_permanent_failure(tmp_path: Path) -> None:
    src = make_image(tmp_path / "photo.png")
    r = _run(src, tmp_path / "out", name="photo_p.txt")
    _permanent(r, "encode-failed")
    assert "no encoder" in r.error and os.listdir(tmp_path / "out") == []


# --- 3: io-error only when the system's read of the input failed --------------------------------

def test_a_bigtiff_marker_in_a_little_endian_tiff_is_corrupt_not_io_error(tmp_path: Path) -> None:
    src = make_image(tmp_path / "le.tif", fmt="TIFF")
    data = bytearray(src.read_bytes())
    assert data[:4] == b"II*\x00"
    data[2] = 0x2B  # BigTIFF: Pillow now seeks to an offset no file has ([Errno 22] before)
    src.write_bytes(data)
    _permanent(_run(src, tmp_path / "out"), "corrupt")


def test_a_read_the_kernel_fails_is_io_error(tmp_path: Path) -> None:
    # /proc/self/mem is a regular file whose read at offset 0 (never mapped) fails with EIO.
    r = _run(Path("/proc/self/mem"), tmp_path / "out", fmt="png")
    assert not r.ok and r.reason == "io-error" and "Input/output error" in r.error


class _Failing(io.BufferedReader):
    """A real file whose read fails with EIO once ``limit`` bytes were read (a disk that dies
    in the middle of a file cannot be made on demand)."""

    limit = 200

    def read(self, n: int | None = -1) -> bytes:
        if self.tell() + (n if n is not None and n >= 0 else 1 << 30) > self.limit:
            raise OSError(errno.EIO, "Input/output error")
        return super().read(n)


@pytest.mark.parametrize("name", ["rgb.png", "lossless.webp", "lzw.tif", "baseline.jpg"])
def test_a_read_that_fails_midway_is_io_error_and_the_same_bytes_cut_there_are_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    src = tmp_path / name
    data = make_seeds()[name]
    src.write_bytes(data)
    real = inputfile.open_regular

    def failing(path: str, **kw: Any) -> tuple[Any, int]:
        f, size = real(path, **kw)
        return _Failing(f.detach()), size  # the same descriptor, read through _Failing

    monkeypatch.setattr(inputfile, "open_regular", failing)
    r = _run(src, tmp_path / "out")
    assert not r.ok and r.reason == "io-error", (r.reason, r.error)
    monkeypatch.setattr(inputfile, "open_regular", real)
    cut = tmp_path / f"cut-{name}"
    cut.write_bytes(data[:_Failing.limit])
    r = _run(cut, tmp_path / "out")
    assert not r.ok and r.reason in ("truncated", "corrupt"), (r.reason, r.error)


def test_an_errno_from_the_parser_is_the_data_s_fault(tmp_path: Path) -> None:
    f = inputfile.InputFile(open(make_image(tmp_path / "a.png"), "rb"))  # noqa: SIM115
    try:
        with pytest.raises(ValueError, match="negative"):
            f.seek(-5)
        assert f.seek(1 << 48) == 1 << 48  # past the end: kept here, lseek never sees it
        assert f.read(10) == b"" and f.tell() == 1 << 48
        assert f.failure is None
        f.seek(0)
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        f.close()


# --- the encode side ----------------------------------------------------------------------------

class _FullDisk(io.BytesIO):
    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _source() -> tuple[list[tuple[Image.Image, int]], codec.Source]:
    im = picture(64, 48)
    return [(im, 0)], codec.Source(image=im, format="PNG", size=im.size, n_frames=1, bytes_in=0,
                                   icc=None, exif=None, xmp=None)


def test_an_errno_from_the_output_file_is_write_failed() -> None:
    images, src = _source()
    with pytest.raises(OSError, match="No space left") as caught:
        encode.encode(images, _FullDisk(), "PNG", OutputOptions(), src, False, [], "x.png")
    assert caught.value.errno == errno.ENOSPC


def test_an_encoder_error_is_encode_failed_even_with_an_errno(
        monkeypatch: pytest.MonkeyPatch) -> None:
    images, src = _source()

    def save(*args: Any, **kw: Any) -> None:  # an encoder that reports EINVAL of its own
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(encode, "save", save)
    with pytest.raises(encode.EncodeError):
        encode.encode(images, io.BytesIO(), "PNG", OutputOptions(), src, False, [], "x.png")


def test_the_worker_refuses_a_hard_linked_input_on_its_open_descriptor(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.png")
    os.link(src, tmp_path / "other-name.png")  # two links: its data may be a file elsewhere
    proc = Processor({"p": config.pipeline_from(["grayscale"], "p", "p")}, DecodeLimits())
    out = OutputPlan(pipeline="p", path=str(tmp_path / "out" / "a_p.png"))
    r = proc.run(Task(seq=1, path=str(src), outputs=(out,), nofollow=True, max_links=1))
    assert (r.ok, r.reason) == (False, "hard-link") and not Path(out.path).exists()
    # batch mode: no link limit
    ok = proc.run(Task(seq=2, path=str(src), outputs=(out,), nofollow=True))
    assert ok.ok, ok


def test_a_header_above_the_default_pixel_limit_still_names_its_output(tmp_path: Path) -> None:
    path = tmp_path / "big.data"
    path.write_bytes(grey_png_bomb(13380))
    assert extensions.output_ext(OutputOptions(), str(path), ("PNG",)) == ".png"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # restored
