"""The Python API over real worker processes: the seed's example exactly as written, inputs of
every kind, output names that never collide, the conflict policy, bad inputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import make_image
from watcher import ConfigError, process_images
from watcher.transforms import resize_half, to_grayscale

pytestmark = pytest.mark.integration


def test_seed_example_exactly_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(Path("a/image1.jpg"), size=(640, 480), quality=92)
    make_image(Path("b/image2.png"), size=(301, 199), seed=3)

    from watcher import process_images
    from watcher.transforms import resize_half, to_grayscale
    report = process_images(["a/image1.jpg", "b/image2.png"], "processed_images/",
                            [to_grayscale, resize_half])

    with Image.open("processed_images/image1_processed.jpg") as a:
        assert (a.format, a.mode, a.size) == ("JPEG", "L", (320, 240))
    with Image.open("processed_images/image2_processed.png") as b:
        assert (b.format, b.mode, b.size) == ("PNG", "L", (150, 99))
    assert sorted(os.listdir("processed_images")) == ["image1_processed.jpg",
                                                     "image2_processed.png"]
    assert report.ok and report.succeeded == 2 and report.failed == 0
    assert report.totals == {"inputs": 2, "succeeded": 2, "failed": 0, "skipped": 0,
                             "cancelled": 0, "outputs_written": 2}
    assert [i.outputs for i in report.items] == [["processed_images/image1_processed.jpg"],
                                                 ["processed_images/image2_processed.png"]]
    assert report.wall_time_s > 0 and report.workers >= 1


def test_grayscale_output_matches_a_plain_pillow_reference(tmp_path: Path) -> None:
    src = make_image(tmp_path / "x.png", size=(200, 100))
    process_images([src], tmp_path / "out", [to_grayscale, resize_half])
    with Image.open(src) as im:
        ref = im.convert("L").resize((100, 50), Image.Resampling.LANCZOS)
    with Image.open(tmp_path / "out" / "x_processed.png") as got:
        diffs = [abs(a - b) for a, b in zip(ref.tobytes(), got.tobytes(), strict=True)]
    assert max(diffs) <= 2


def test_registry_names_step_strings_and_user_callables(tmp_path: Path) -> None:
    src = make_image(tmp_path / "x.png", size=(64, 64))
    report = process_images([src], tmp_path / "out",
                            ["grayscale", "thumbnail(16, 16)", crashers.invert], suffix="t")
    assert report.ok, report.items
    with Image.open(tmp_path / "out" / "x_t.png") as o:
        assert o.size == (16, 16) and o.mode == "RGB"


def test_named_pipelines_from_config_give_several_outputs(tmp_path: Path) -> None:
    cfg = tmp_path / "watcher.toml"
    cfg.write_text("""
[pipelines.thumb]
steps = ["thumbnail(32, 32)"]
[pipelines.web]
steps = ["resize(width=100)"]
format = "webp"
""")
    src = make_image(tmp_path / "in" / "p.jpg", size=(200, 150))
    report = process_images([src], tmp_path / "out", pipeline=["thumb", "web"], config=cfg)
    assert report.ok
    assert sorted(os.listdir(tmp_path / "out")) == ["p_thumb.jpg", "p_web.webp"]
    with Image.open(tmp_path / "out" / "p_web.webp") as w:
        assert w.size == (100, 75)


def test_lambda_refused_before_any_work(tmp_path: Path) -> None:
    src = make_image(tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"lambda|top level"):
        process_images([src], tmp_path / "out", [to_grayscale, lambda im: im])
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_reported_and_the_rest_completes(tmp_path: Path) -> None:
    good = [make_image(tmp_path / f"g{i}.png", seed=i) for i in range(3)]
    (tmp_path / "text.jpg").write_text("not an image")
    data = (good[0]).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    inputs = [*good, tmp_path / "missing.png", tmp_path / "text.jpg", tmp_path / "cut.png",
              str(tmp_path / "nomatch*.png")]
    report = process_images(inputs, tmp_path / "out", ["mirror"])
    by = {Path(i.input).name: i for i in report.items}
    assert {n: (i.status, i.reason) for n, i in by.items() if i.status != "ok"} == {
        "missing.png": ("failed", "missing"), "text.jpg": ("failed", "not-an-image"),
        "cut.png": ("failed", "truncated"), "nomatch*.png": ("failed", "missing")}
    assert report.succeeded == 3 and report.failed == 4 and not report.ok
    assert sorted(os.listdir(tmp_path / "out")) == ["g0_processed.png", "g1_processed.png",
                                                   "g2_processed.png"]


def test_same_name_from_two_folders_gets_a_counter(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a" / "x.jpg", seed=1)
    b = make_image(tmp_path / "b" / "x.jpg", seed=2)
    report = process_images([a, b], tmp_path / "out", ["mirror"])
    assert [Path(o).name for i in report.items for o in i.outputs] == [
        "x_processed.jpg", "x_processed_2.jpg"]
    with Image.open(tmp_path / "out" / "x_processed.jpg") as o1, \
            Image.open(tmp_path / "out" / "x_processed_2.jpg") as o2:
        assert o1.tobytes() != o2.tobytes()


def test_different_formats_converted_to_one_never_collide(tmp_path: Path) -> None:
    srcs = [make_image(tmp_path / "x.png"), make_image(tmp_path / "x.bmp", seed=4)]
    report = process_images(srcs, tmp_path / "out", ["mirror"], output={"format": "jpeg"})
    assert report.ok
    assert sorted(os.listdir(tmp_path / "out")) == ["x_processed.jpg", "x_processed_2.jpg"]


def test_folder_input_mirrors_sub_folders(tmp_path: Path) -> None:
    for rel in ("top.png", "a/one.png", "a/b/two.jpg", "c/x.png", "d/x.png"):
        make_image(tmp_path / "photos" / rel)
    report = process_images([tmp_path / "photos"], tmp_path / "out", ["mirror"])
    assert report.ok and report.succeeded == 5
    found = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
                   if p.is_file())
    assert found == ["a/b/two_processed.jpg", "a/one_processed.png", "c/x_processed.png",
                     "d/x_processed.png", "top_processed.png"]


def test_rerun_skip_overwrite_rename(tmp_path: Path) -> None:
    src = make_image(tmp_path / "x.png")
    out = tmp_path / "out"
    assert process_images([src], out, ["mirror"]).ok
    first = (out / "x_processed.png").read_bytes()

    again = process_images([src], out, ["flip"])  # default: skip what exists
    assert again.ok and again.skipped == 1 and again.items[0].reason == "outputs-exist"
    assert (out / "x_processed.png").read_bytes() == first

    over = process_images([src], out, ["flip"], on_conflict="overwrite")
    assert over.ok and over.succeeded == 1
    assert (out / "x_processed.png").read_bytes() != first

    ren = process_images([src], out, ["mirror"], on_conflict="rename")
    assert ren.ok and [Path(o).name for o in ren.items[0].outputs] == ["x_processed_2.png"]


def test_existing_different_file_is_never_overwritten_silently(tmp_path: Path) -> None:
    src = make_image(tmp_path / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_processed.png").write_bytes(b"someone else's file")
    report = process_images([src], out, ["mirror"], on_conflict="skip")
    assert report.items[0].status == "skipped"
    assert (out / "x_processed.png").read_bytes() == b"someone else's file"


def test_empty_input_list_creates_output_folder_only(tmp_path: Path) -> None:
    report = process_images([], tmp_path / "out", [to_grayscale])
    assert report.ok and report.items == [] and report.workers == 0
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []


def test_one_pixel_images_of_every_mode(tmp_path: Path) -> None:
    modes: dict[str, Any] = {"RGB": (1, 2, 3), "RGBA": (1, 2, 3, 4), "L": 7, "LA": (7, 8),
                             "P": 1, "1": 1, "CMYK": (1, 2, 3, 4), "I;16": 300}
    paths = []
    for mode, value in modes.items():
        p = tmp_path / f"px_{mode.replace(';', '')}.tif"
        Image.new(mode, (1, 1), value).save(p)
        paths.append(p)
    report = process_images(paths, tmp_path / "out", [to_grayscale, resize_half])
    assert report.ok, [(i.input, i.error) for i in report.items if not i.ok]
    for item in report.items:
        with Image.open(item.outputs[0]) as o:
            assert o.size == (1, 1)
