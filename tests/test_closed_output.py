"""A listing whose reader goes away early (``watcher transforms | head -1``): the command ends
quietly, killed by SIGPIPE as other Unix tools are, with no traceback nor "internal error"; the
daemon does not care whether stdout has a reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image
from tests.test_quarantine_cli import _config

pytestmark = pytest.mark.integration


def run_into_closed_pipe(cwd: Path, *args: str) -> tuple[int, str]:
    """Run ``watcher ARGS`` with stdout a pipe whose reader has already gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "watcher", *args], cwd=cwd, stdout=w,
                              stderr=subprocess.PIPE, timeout=120, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w)
    return proc.returncode, proc.stderr.decode()


def assert_quiet(code: int, err: str) -> None:
    assert code == -signal.SIGPIPE, (code, err)
    assert "Traceback" not in err and "internal" not in err and "Broken" not in err, err


@pytest.mark.parametrize("args", [("transforms",), ("completion", "bash"), ("check-config",)])
def test_a_listing_into_a_closed_pipe_ends_quietly(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert_quiet(*run_into_closed_pipe(tmp_path, *args))


def test_a_dry_run_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    for i in range(200):
        make_image(tmp_path / "in" / f"a{i:03}.png", size=(8, 8))
    code, err = run_into_closed_pipe(tmp_path, "batch", "in", "-o", "out", "--dry-run",
                                     "--log-format", "json")
    assert_quiet(code, err)
    assert not (tmp_path / "out").exists()


def test_quarantine_list_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    _config(tmp_path)
    for d in ("in", "out", "done", "bad", "work"):
        (tmp_path / d).mkdir()
    assert_quiet(*run_into_closed_pipe(tmp_path, "quarantine", "list", "--json"))


def test_a_batch_that_processes_does_not_die_of_a_closed_stdout(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "a.png")
    code, err = run_into_closed_pipe(tmp_path, "batch", "in", "-o", "out", "--log-format",
                                     "json")
    assert code == 0, err  # nothing is written to stdout: the batch is not a listing
    assert (tmp_path / "out" / "a_thumbnail.png").exists()
