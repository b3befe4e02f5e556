"""Output name templates ({stem}, {suffix}, {ext}, {taken:...}): checked at load naming the key,
the capture time from EXIF (JPEG, HEIC, a DNG's directory) or XMP, else the file's time, and a
real batch sorting photos into dated folders."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.dnggen import make_dng
from tests.test_heif_jxl import encoded, upright
from watcher import config
from watcher.errors import ConfigError
from watcher.fs import template
from watcher.imaging.formats import DEFAULT_FORMATS
from watcher.imaging.taken import capture_time


def _exif_taken(when: str) -> bytes:
    exif = Image.Exif()
    exif[0x0132] = "2001:01:01 00:00:00"  # DateTime (last change): not the capture time
    exif.get_ifd(0x8769)[0x9003] = when
    return exif.tobytes()


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "watcher.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("value", "message"), [
    ("{taken:%Y}/{stem}", "ends with {ext}"),
    ("{date}/{stem}{ext}", "unknown field {date}"),
    ("{stem:>10}{ext}", "only {taken} takes a format"),
    ("{stem!r}{ext}", "no conversions"),
    ("../{stem}{ext}", "below the output folder"),
    ("/abs/{stem}{ext}", "below the output folder"),
    ("{taken:%Y//%m}/{stem}{ext}", "below the output folder"),
    ("{taken:Y}/{stem}{ext}", "strftime"),
    ("{stem{ext}", "not a valid template"),
])
def test_a_bad_template_is_refused_at_load_naming_the_key(tmp_path: Path, value: str,
                                                          message: str) -> None:
    path = _write(tmp_path, f"[pipelines.a]\nsteps = ['grayscale']\nname_template = '{value}'\n")
    with pytest.raises(ConfigError, match=r"pipelines\.a\.name_template") as info:
        config.load(path)
    assert message in str(info.value)


def test_a_good_template_loads_and_places_outputs(tmp_path: Path) -> None:
    path = _write(tmp_path, "[pipelines.a]\nsteps = ['grayscale']\n"
                            "name_template = '{taken:%Y/%m-%d}/{stem}-{suffix}{ext}'\n")
    (p,) = config.load(path).select(["a"])
    when = datetime(2023, 7, 14, 10, 0, 0)
    assert template.place("/out/sub", "IMG_1", "a", ".jpg", p.output.name_template,
                          lambda: when) == ("/out/sub/2023/07-14", "IMG_1-a", "")
    assert template.place("/out", "x", "a", ".png", "", lambda: when) == ("/out", "x", "a")
    calls = []
    template.place("/o", "x", "a", ".png", "{stem}{ext}", lambda: calls.append(1) or when)
    assert calls == []  # no {taken}: the file's header is never read for it


def test_the_capture_time_comes_from_exif_xmp_or_the_file(tmp_path: Path) -> None:
    jpg = tmp_path / "a.jpg"
    upright().save(jpg, exif=_exif_taken("2019:06:01 12:30:45"))
    assert capture_time(str(jpg), DEFAULT_FORMATS) == datetime(2019, 6, 1, 12, 30, 45)
    heic = tmp_path / "b.heic"
    heic.write_bytes(encoded(upright(), "HEIF", exif=_exif_taken("2021:02:03 04:05:06")))
    assert capture_time(str(heic), DEFAULT_FORMATS) == datetime(2021, 2, 3, 4, 5, 6)
    xmp = tmp_path / "c.png"
    upright().save(xmp, pnginfo=None)
    packet = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
              b'exif:DateTimeOriginal="2018-11-12T13:14:15"/></rdf:RDF></x:xmpmeta>')
    withxmp = tmp_path / "d.jpg"
    upright().save(withxmp, xmp=packet)
    assert capture_time(str(withxmp), DEFAULT_FORMATS) == datetime(2018, 11, 12, 13, 14, 15)
    stamp = datetime(2015, 5, 5, 5, 5, 5).timestamp()
    os.utime(xmp, (stamp, stamp))
    assert capture_time(str(xmp), DEFAULT_FORMATS) == datetime(2015, 5, 5, 5, 5, 5)
    blank = tmp_path / "e.jpg"  # an unset EXIF time ("    :  :  ") falls back too
    upright().save(blank, exif=_exif_taken("    :  :     :  :  "))
    os.utime(blank, (stamp, stamp))
    assert capture_time(str(blank), DEFAULT_FORMATS) == datetime(2015, 5, 5, 5, 5, 5)


def test_a_dng_gives_its_capture_time(tmp_path: Path) -> None:
    raw = tmp_path / "r.dng"
    raw.write_bytes(make_dng(upright(96, 64)))
    # the synthetic DNG has no time: the file's; then one with DateTime in IFD0
    stamp = datetime(2012, 1, 2, 3, 4, 5).timestamp()
    os.utime(raw, (stamp, stamp))
    assert capture_time(str(raw), DEFAULT_FORMATS) == datetime(2012, 1, 2, 3, 4, 5)
    raw.write_bytes(make_dng(upright(96, 64), taken="2016:08:09 10:11:12"))
    os.utime(raw, (stamp, stamp))
    assert capture_time(str(raw), DEFAULT_FORMATS) == datetime(2016, 8, 9, 10, 11, 12)


@pytest.mark.integration
def test_a_batch_sorts_photos_into_dated_folders(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    upright().save(src / "a.jpg", exif=_exif_taken("2020:03:04 05:06:07"))
    (src / "b.heic").write_bytes(encoded(upright(), "HEIF",
                                         exif=_exif_taken("2022:12:25 08:00:00")))
    upright().save(src / "c.png")
    stamp = datetime(2010, 10, 10, 10, 10, 10).timestamp()
    os.utime(src / "c.png", (stamp, stamp))
    cfg = _write(tmp_path, "[output]\npipelines = ['dated']\n[pipelines.dated]\n"
                           "steps = ['thumbnail(32, 32)']\nformat = 'jpeg'\n"
                           "name_template = '{taken:%Y/%m/%d}/{stem}_{suffix}{ext}'\n")
    out = tmp_path / "out"
    proc = run_cli("batch", "--config", str(cfg), "-o", str(out), "-j", "1", "--no-progress",
                   str(src / "a.jpg"), str(src / "b.heic"), str(src / "c.png"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert made == ["2010/10/10/c_dated.jpg", "2020/03/04/a_dated.jpg",
                    "2022/12/25/b_dated.jpg"], made
    # a second photo of the same day and name: the usual counter, same folder
    proc = run_cli("batch", "--config", str(cfg), "-o", str(out), "-j", "1", "--no-progress",
                   "--on-conflict", "rename", str(src / "a.jpg"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "2020/03/04/a_dated_2.jpg").exists()
