"""``watcher make-samples`` where it cannot write: into a file, a read-only folder, /proc, a full
tmpfs. One clean line and exit 2, and no partial sample left (each is written under a temp name
and renamed when whole)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.integration


def assert_one_line(proc: subprocess.CompletedProcess[str], where: str, why: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "internal" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("watcher make-samples: cannot write ") and where in line \
        and why in line, line


def test_into_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep me")
    proc = run_cli("make-samples", "afile", cwd=tmp_path)
    assert_one_line(proc, "afile", "a file stands where the folder should be")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_into_proc(tmp_path: Path) -> None:
    proc = run_cli("make-samples", "/proc/self/x", cwd=tmp_path)
    assert_one_line(proc, "/proc/self/x", "")


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv")
def test_into_a_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    # as root, without the capability that writes anywhere
    proc = subprocess.run(["setpriv", "--inh-caps=-all",
                           "--bounding-set=-dac_override,-dac_read_search",
                           sys.executable, "-m", "watcher", "make-samples", "ro"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line(proc, "ro", "Permission denied")
    assert os.listdir(ro) == []


def test_into_a_full_tmpfs_leaves_only_whole_samples(tmpfs: Any) -> None:
    full = tmpfs("full", size="600k")  # room for a few samples, not for the 1 MB BMP
    proc = run_cli("make-samples", str(full), timeout=180)
    assert_one_line(proc, str(full), "No space left on device")
    left = sorted(os.listdir(full))
    assert left and all(n.startswith("sample_") for n in left), left  # no temp file left
    # every file left is a whole sample, identical to one written where there is room
    room = full.parent / "room"
    assert run_cli("make-samples", str(room), timeout=180).returncode == 0
    for name in left:
        assert (full / name).read_bytes() == (room / name).read_bytes(), name
