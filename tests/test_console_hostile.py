"""Console lines against hostile and long file names: escape sequences in a name are shown, never
acted on (on a real terminal, through a pty), and lines for ordinary names fit 120 columns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image, run_cli
from tests.test_console import COLUMNS, LINE, Terminal, width

pytestmark = pytest.mark.integration

# name (bytes, as on disk) -> how the console line must show it
HOSTILE = {
    b"esc\x1b[2J\x1b[31mRED\x1b]0;PWNED\x07.png": r"esc\x1b[2J\x1b[31mRED\x1b]0;PWNED\x07.png",
    b"nl\n12:00:00 INFO  file.processed forged.png": r"nl\n12:00:00 INFO  file.processed forged",
    b"csi\xc2\x9b31mC1.png": r"csi\x9b31mC1.png",
    b"raw\x9b31m.png": r"raw\x9b31m.png",  # not UTF-8: the byte itself
    b"cr\rOVERWRITE.png": r"cr\rOVERWRITE.png",
    b"bs\x08\x08X\x7f.png": r"bs\x08\x08X\x7f.png",
    b"bidi\xe2\x80\xaegnp.exe.png": r"bidi\u202egnp.exe.png",
}
BROKEN = b"broken\x1b[5mBLINK.jpg"  # fails: its name is in the error as well


def hostile_inbox(folder: Path) -> None:
    folder.mkdir(parents=True)
    src = make_image(folder / "plain.png").read_bytes()
    for name in HOSTILE:
        with open(os.fsencode(folder) + b"/" + name, "wb") as f:
            f.write(src)
    with open(os.fsencode(folder) + b"/" + BROKEN, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")


def test_escape_sequences_in_names_are_shown_not_acted_on_by_a_terminal(tmp_path: Path) -> None:
    hostile_inbox(tmp_path / "in")
    t = Terminal(tmp_path, "batch", "in", "-o", "out", "--workers", "2", "--no-progress",
                 "--log-format", "console")
    try:
        assert t.finish() == 1  # the broken one failed
    finally:
        t.ensure_dead()
    raw = t.raw()
    # what reached the terminal: our colour codes (SGR) and the carriage return each line starts
    # with, nothing else a terminal would act on
    ours = re.sub(r"\x1b\[[0-9;]*m", "", raw).replace("\r\n", "\n").replace("\n\r", "\n")
    assert "\x1b" not in ours and "\x07" not in ours and "\x08" not in ours, repr(ours)
    assert "\x9b" not in ours and "\x7f" not in ours and "\u202e" not in ours, repr(ours)
    assert "\x1b[5m" not in raw and "\x1b[2J" not in raw and "\x1b]0;" not in raw
    assert "\r" not in ours.lstrip("\r").replace("\n\r", "\n"), repr(ours)
    done = t.log_lines("file.processed")
    assert len(done) == len(HOSTILE) + 1, t.rows()
    for shown in HOSTILE.values():
        assert any(f" in/{shown}" in line for line in done), (shown, done)
    # the newline in a name forged no line: every row is a real one, and no row is the forgery
    rows = [r for r in t.rows() if r]
    assert all(LINE.match(r) for r in rows), rows
    assert not any(r.startswith("12:00:00 INFO  file.processed forged") for r in rows), rows
    (failed,) = t.log_lines("file.failed")
    assert r"in/broken\x1b[5mBLINK.jpg" in failed, failed


def test_json_lines_keep_the_name_exact(tmp_path: Path) -> None:
    hostile_inbox(tmp_path / "in")
    proc = subprocess.run([sys.executable, "-m", "watcher", "batch", "in", "-o", "out",
                           "--workers", "1", "--log-format", "json"], cwd=tmp_path,
                          capture_output=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.decode().splitlines()
    events = [json.loads(x) for x in lines]  # every line is one JSON object
    inputs = {os.fsencode(e["input"]) for e in events if e["event"] == "file.processed"}
    assert {b"in/" + n for n in HOSTILE} <= inputs, inputs


def test_the_lines_of_a_batch_of_the_samples_fit_the_terminal(tmp_path: Path) -> None:
    assert run_cli("make-samples", "samples", cwd=tmp_path, timeout=180).returncode == 0
    t = Terminal(tmp_path, "batch", "samples", "-o", "out", "--workers", "2", "--no-progress",
                 "--log-format", "console")
    try:
        assert t.finish() == 1  # sample_012.jpg is broken on purpose
    finally:
        t.ensure_dead()
    rows = [r for r in t.rows() if r]
    for row in rows:
        assert width(row) <= COLUMNS, f"{width(row)} columns: {row}"
    (failed,) = t.log_lines("file.failed")
    assert failed.count("sample_012.jpg") == 1, failed  # the path once, then the error
    assert re.search(r" samples/sample_012\.jpg  truncated: image file is truncated", failed)
    assert "internal" not in failed
    (finished,) = t.log_lines("batch.finished")
    # what a person scans: the counts, the time, the rate; not the pids nor the settings
    assert re.search(r"  inputs=13 succeeded=12 failed=1  \d+\.\d\d s  \d+\.\d images/s$",
                     finished), finished
    assert "workers=" not in finished and "outputs_written" not in finished


def test_a_user_transforms_traceback_is_its_last_line_on_the_terminal(tmp_path: Path) -> None:
    (tmp_path / "mytf.py").write_text(
        "def boom(im):\n    raise ValueError('this image is not wanted')\n\n"
        "def warn(im):\n    import warnings\n    warnings.warn('a warning\\nover two lines')\n"
        "    return im\n")
    make_image(tmp_path / "a.png")
    t = Terminal(tmp_path, "batch", "a.png", "-o", "out", "--ops", "mytf.boom", "--no-progress",
                 "--log-format", "console", env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    try:
        assert t.finish() == 1
    finally:
        t.ensure_dead()
    assert "Traceback" not in t.raw() and "File " not in t.raw(), t.raw()
    (failed,) = t.log_lines("file.failed")
    assert "transform-failed: mytf.boom: ValueError: this image is not wanted" in failed, failed
    assert width(failed) <= COLUMNS, failed
    assert all(LINE.match(r) for r in t.rows() if r), t.rows()


def test_wide_characters_count_two_columns(tmp_path: Path) -> None:
    name = "東京タワーの夜景と富士山の朝焼けの写真.png"  # 16 characters of two columns
    make_image(tmp_path / "in" / name)
    t = Terminal(tmp_path, "batch", "in", "-o", "out", "-p", "thumbnail", "-p", "web",
                 "--no-progress", "--log-format", "console")
    try:
        assert t.finish() == 0
    finally:
        t.ensure_dead()
    (done,) = t.log_lines("file.processed")
    assert len(done) <= COLUMNS < width(done.replace("…", name[:-4])), done  # needs the cut
    assert width(done) <= COLUMNS, f"{width(done)} columns: {done}"
    assert " -> …_{thumbnail.png,web.jpg}  " in done, done
