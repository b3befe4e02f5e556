"""The benchmark keeps working: `scripts/bench.py --quick` runs and its output parses. No speed
is asserted here (these machines are shared and noisy): the benchmark reports numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_quick_benchmark_runs_and_its_figures_parse(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out),
         "--chart", str(png)], capture_output=True, text=True, timeout=230, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT),
             "BENCH_CORPUS": str(tmp_path / "no-corpus")})  # hermetic: a synthetic corpus
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["real_corpus"] is False
    for job in ("T", "G", "S"):
        runs = {r["impl"]: r for r in doc[job]["runs"]}
        assert runs["watcher"]["ok"] and runs["watcher"]["wall"] > 0
        assert doc[job]["quality"]["watcher"]["n"] > 0
    assert any(r["impl"] == "watcher" and r["peak"] > 0 for r in doc["M"])
    assert [r["impl"] for r in doc["C"]] == ["watcher x1", "watcher x2"]
    assert doc["W"]["burst_images_per_s"] > 0 and doc["W"]["daemon_rss_mib_with_backlog"] > 0
    assert any(v.startswith("T: quality guard") for v in doc["verdicts"])
    assert "| T | watcher |" in proc.stdout
    assert png.stat().st_size > 1000  # the chart was drawn
