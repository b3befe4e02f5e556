"""The output-naming component: no two inputs ever share an output path; names stay legal."""

from __future__ import annotations

import os
from pathlib import Path

from watcher.fs import naming
from watcher.fs.files import NAME_MAX


def test_counter_on_collision_in_the_run_and_on_disk(tmp_path: Path) -> None:
    names = naming.OutputNames()
    a = names.claim(str(tmp_path), "x", "processed", ".jpg", avoid_existing=False)
    b = names.claim(str(tmp_path), "x", "processed", ".jpg", avoid_existing=False)
    assert Path(a).name == "x_processed.jpg" and Path(b).name == "x_processed_2.jpg"
    (tmp_path / "y_t.png").write_bytes(b"")
    c = names.claim(str(tmp_path), "y", "t", ".png", avoid_existing=True)
    assert Path(c).name == "y_t_2.png"


def test_owners_hold_names_until_released(tmp_path: Path) -> None:
    names = naming.OutputNames()
    png = names.claim(str(tmp_path), "x", "web", ".jpg", avoid_existing=True, owner="x.png")
    jpg = names.claim(str(tmp_path), "x", "web", ".jpg", avoid_existing=True, owner="x.jpg")
    assert png != jpg  # x.png and x.jpg into one fixed format: two names
    assert not names.reuse([png], owner="x.jpg")  # nobody takes another's name
    assert names.holds("x.jpg") == [jpg]
    names.release("x.png")
    assert names.reuse([png], owner="x.jpg") and set(names.holds("x.jpg")) == {png, jpg}
    names.release("x.jpg")
    assert len(names) == 0


def test_long_stems_shorten_within_name_max(tmp_path: Path) -> None:
    names = naming.OutputNames()
    stem = "é" * 127  # 254 bytes in UTF-8
    a = names.claim(str(tmp_path), stem, "thumbnail", ".jpg", avoid_existing=True, owner=1)
    b = names.claim(str(tmp_path), stem, "thumbnail", ".jpg", avoid_existing=True, owner=2)
    other = names.claim(str(tmp_path), "é" * 126 + "e", "thumbnail", ".jpg",
                        avoid_existing=True, owner=3)
    for p in (a, b, other):
        name = os.path.basename(p)
        assert len(os.fsencode(name)) <= NAME_MAX - 40
        assert name.startswith("éééé") and name.endswith(".jpg")
        (tmp_path / name).write_bytes(b"ok")  # the file system takes it
    assert len({a, b, other}) == 3
    assert naming.output_name(stem, "thumbnail", ".jpg") == naming.output_name(
        stem, "thumbnail", ".jpg")  # stable
