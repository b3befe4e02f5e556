"""The errors a batch user meets first, through the real command: an output folder that is a
file, cannot be created or is read-only (a real read-only mount: root ignores mode bits), inputs
that do not exist, and a rerun that skips everything. Each is one clear line, found before any
worker starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, json_lines, make_image, run_cli
from watcher import ConfigError, process_images

pytestmark = pytest.mark.integration


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def photos(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        make_image(folder / f"p{i}.png", size=(40, 30), seed=i)
    return folder


@pytest.fixture
def read_only(tmpfs: Any) -> Any:
    """A real read-only file system holding an existing folder ``out``."""
    mounted: list[Path] = []

    def make(name: str = "ro") -> Path:
        folder = tmpfs(name)
        (folder / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        mounted.append(folder)
        return folder
    return make


def test_an_output_that_is_a_file_is_one_line_and_exit_2_as_in_watch(tmp_path: Path) -> None:
    photos(tmp_path / "photos")
    (tmp_path / "afile").write_text("not a folder")
    batch = run_cli("batch", "photos", "-o", "afile", cwd=tmp_path)
    assert batch.returncode == 2, batch.stderr
    assert lines(batch.stderr) == ["watcher: config error: --out: afile exists and is not a "
                                   "folder"]
    under = run_cli("batch", "photos", "-o", "afile/sub", cwd=tmp_path)
    assert under.returncode == 2
    assert lines(under.stderr) == ["watcher: config error: --out: cannot create afile/sub: "
                                   "Not a directory"]
    # the daemon says the same thing the same way
    watch = run_cli("watch", "--inbox", "photos", "--output", "afile", cwd=tmp_path)
    assert watch.returncode == 2
    assert lines(watch.stderr) == [f"watcher: config error: watch.output: {tmp_path}/afile "
                                   "exists and is not a folder"]
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_an_output_under_a_read_only_parent_is_one_line_and_exit_2(tmp_path: Path,
                                                                   read_only: Any) -> None:
    photos(tmp_path / "photos")
    ro = read_only()
    proc = run_cli("batch", "photos", "-o", str(ro / "new"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert lines(proc.stderr) == [f"watcher: config error: --out: cannot create {ro}/new: "
                                  "Read-only file system"]


def test_a_read_only_output_folder_is_found_once_at_start(tmp_path: Path, read_only: Any) -> None:
    photos(tmp_path / "photos", 12)
    ro = read_only()
    proc = run_cli("batch", "photos", "-o", str(ro / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    # one line: no write-failed per file naming a temp file, no images_per_s, no worker
    assert lines(proc.stderr) == [f"watcher: config error: --out: cannot write in {ro}/out: "
                                  "Read-only file system"]
    with pytest.raises(ConfigError, match=r"^output_dir: cannot write in .*Read-only file"):
        process_images([str(tmp_path / "photos")], ro / "out", ["grayscale"])
    # (the daemon starts on an unwritable output on purpose: it retries, degraded, as a full
    # disk; tests/test_fates.py)


def test_an_unwritable_output_folder_for_a_user_whom_mode_bits_bind(tmp_path: Path) -> None:
    """Root without its permission override (setpriv), as an ordinary user: a folder 0555."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root's permission override")
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
              "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    photos(tmp_path / "photos")
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "watcher", "batch", "photos", "-o",
                               "out"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    finally:
        (tmp_path / "out").chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert lines(proc.stderr) == ["watcher: config error: --out: cannot write in out: "
                                  "Permission denied"]
    assert list((tmp_path / "out").iterdir()) == []


def test_the_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    proc = run_cli("batch", "a.png", "-o", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_thumbnail.png"]


def test_a_missing_folder_is_one_line_and_no_worker_starts(tmp_path: Path) -> None:
    proc = run_cli("batch", "/nonexistent/photos", "-o", "out", cwd=tmp_path)
    assert proc.returncode == 1
    events = [json.loads(line) for line in lines(proc.stderr)]
    assert len(events) == 1, proc.stderr  # no worker.started, no batch.finished
    assert events[0]["event"] == "file.failed" and events[0]["reason"] == "missing"
    assert events[0]["error"] == "/nonexistent/photos: no such file or folder"


def test_a_glob_that_matches_nothing_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("batch", "nomatch*.jpg", "-o", "out", "--report", "r.json", cwd=tmp_path)
    assert proc.returncode == 1
    events = [json.loads(line) for line in lines(proc.stderr)]
    assert [(e["event"], e["reason"], e["error"]) for e in events] == [
        ("file.failed", "missing", "nomatch*.jpg: no file matches")]  # no batch.empty
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["failed"] == 1 and report["workers"] == 0


def test_missing_inputs_among_good_ones_are_reported_once_each(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    proc = run_cli("batch", "ok.png", "gone.png", "none*.png", "-o", "out", cwd=tmp_path)
    assert proc.returncode == 1
    logs = json_lines(proc.stderr)
    failed = [(e["input"], e["reason"]) for e in logs if e["event"] == "file.failed"]
    assert failed == [("gone.png", "missing"), ("none*.png", "missing")]
    done = [e for e in logs if e["event"] == "batch.finished"]
    assert len(done) == 1 and done[0]["succeeded"] == 1 and done[0]["failed"] == 2
    assert done[0]["workers"] == 1  # one task: one worker, not one per CPU


def test_a_rerun_that_skips_everything_says_why_and_what_to_do(tmp_path: Path) -> None:
    photos(tmp_path / "samples", 12)
    first = run_cli("batch", "samples", "--out", "processed", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli("batch", "samples", "--out", "processed", cwd=tmp_path)
    assert again.returncode == 0
    logs = json_lines(again.stderr)
    assert not [e for e in logs if e["event"] == "worker.started"]
    done = [e for e in logs if e["event"] == "batch.finished"]
    assert len(done) == 1 and done[0]["skipped"] == 12 and done[0]["workers"] == 0
    assert done[0]["why"].startswith("12 up to date: their outputs exist (on_conflict=skip); use "
                                      "--on-conflict overwrite")
    # and the advice works
    redo = run_cli("batch", "samples", "--out", "processed", "--on-conflict", "overwrite",
                   cwd=tmp_path)
    redone = [e for e in json_lines(redo.stderr) if e["event"] == "batch.finished"]
    assert redo.returncode == 0 and redone[0]["succeeded"] == 12 and "why" not in redone[0]


def test_a_read_only_sub_folder_fails_its_inputs_naming_their_outputs(tmp_path: Path,
                                                                      tmpfs: Any) -> None:
    """The start-up probe covers the output folder; a read-only mount below it (a mirrored
    sub-folder) fails only its own inputs, naming the output (not a hidden temp file), and
    costs no worker."""
    make_image(tmp_path / "photos" / "top.png")
    make_image(tmp_path / "photos" / "a" / "x.png", seed=1)
    make_image(tmp_path / "photos" / "a" / "y.jpg", seed=2)
    out = tmpfs("out")
    sub = out / "a"
    sub.mkdir()
    subprocess.run(["mount", "--bind", str(sub), str(sub)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(sub)], check=True)
        proc = run_cli("batch", "photos", "-o", str(out), cwd=tmp_path)
    finally:
        subprocess.run(["umount", str(sub)], check=False)
    assert proc.returncode == 1, proc.stderr
    logs = json_lines(proc.stderr)
    failed = {e["input"]: e["error"] for e in logs if e["event"] == "file.failed"}
    assert failed == {
        "photos/a/x.png": f"[Errno 30] Read-only file system: '{sub}/x_thumbnail.png'",
        "photos/a/y.jpg": f"[Errno 30] Read-only file system: '{sub}/y_thumbnail.jpg'"}
    assert ".watcher-tmp" not in proc.stderr
    assert not [e for e in logs if e["event"] in ("worker.failed", "worker.died")]
    assert (out / "top_thumbnail.png").is_file()
