"""A batch over a tree with a sub-folder it cannot enter (permission denied): the folder is a
failed input (reason ``permission-denied``, naming it) in the log and the report, exit 1; the
files it can read are processed. Run without root's DAC override, so the permissions count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv")]

UNPRIVILEGED = ["setpriv", "--inh-caps=-all",
                "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_a_folder_the_batch_cannot_enter_is_a_failed_input(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "ok.png")
    make_image(tmp_path / "in" / "locked" / "x.png")
    make_image(tmp_path / "in" / "sub" / "fine.png")
    make_image(tmp_path / "in" / "sub" / "deeper" / "y.png")
    (tmp_path / "in" / "locked").chmod(0o000)
    (tmp_path / "in" / "sub" / "deeper").chmod(0o311)  # may be entered, not listed
    try:
        proc = subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "watcher", "batch", "in",
                               "-o", "out", "--log-format", "json", "--report", "r.json"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        (tmp_path / "in" / "locked").chmod(0o755)
        (tmp_path / "in" / "sub" / "deeper").chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(x) for x in proc.stderr.splitlines()]
    failed = {x["input"]: x for x in lines if x["event"] == "file.failed"}
    assert set(failed) == {"in/locked", "in/sub/deeper"}, lines
    for folder, line in failed.items():
        assert line["reason"] == "permission-denied" and folder in line["error"], line
    done = sorted(x["input"] for x in lines if x["event"] == "file.processed")
    assert done == ["in/ok.png", "in/sub/fine.png"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["failed"] == 2 and report["totals"]["succeeded"] == 2
    items = {i["input"]: i for i in report["items"]}
    assert items["in/locked"]["status"] == "failed"
    assert items["in/locked"]["reason"] == "permission-denied"
    assert items["in/sub/deeper"]["reason"] == "permission-denied"
