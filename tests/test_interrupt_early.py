"""Ctrl-C (SIGINT) before a batch's workers run: while its list of inputs is read, while a huge
tree is walked for inputs, while the interpreter imports its modules. No traceback: one line,
exit 130, and the ``--report`` asked for is written (the inputs found so far as cancelled)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, wait_until
from tests.test_console import Terminal

pytestmark = pytest.mark.integration


def reading_stdin(pid: int) -> bool:
    """The process's main thread is blocked in read(0, ...)."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return fields[:2] == ["0", "0x0"]


def start(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "watcher", "batch", *args], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the interrupted batch did not exit")
    return proc.returncode, err.decode()


def assert_one_json_line(err: str) -> dict[str, Any]:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [json.loads(x) for x in err.splitlines()]  # every line is JSON
    (line,) = [x for x in lines if x["event"] == "batch.interrupted"]
    assert line["signal"] == "SIGINT" and line["running"] == 0, line
    assert not [x for x in lines if x["level"] == "error"], lines
    return line


def test_ctrl_c_while_the_input_list_is_read_writes_an_empty_interrupted_report(
        tmp_path: Path) -> None:
    proc = start(tmp_path, "-", "-o", "out", "--report", "report.json", "--log-format", "json")
    wait_until(lambda: reading_stdin(proc.pid) or proc.poll() is not None, 60,
               "the batch reading its list on stdin")
    os.killpg(proc.pid, signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err
    line = assert_one_json_line(err)
    assert line["not_started"] == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] == signal.SIGINT and report["items"] == [], report
    assert report["totals"]["inputs"] == 0
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_a_huge_tree_is_walked_reports_what_was_found_as_cancelled(
        tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in range(100):
        (tree / f"d{d:03}").mkdir(parents=True)
        for f in range(400):
            (tree / f"d{d:03}" / f"f{f:03}.jpg").touch()
    # the folder comes through stdin: the walk starts the moment stdin is closed
    proc = start(tmp_path, "-", "-o", "out", "--report", "report.json", "--log-format", "json")
    wait_until(lambda: reading_stdin(proc.pid) or proc.poll() is not None, 60,
               "the batch reading its list on stdin")
    assert proc.stdin is not None
    proc.stdin.write(b"not-there.jpg\ntree\n")
    proc.stdin.close()
    proc.stdin = None  # closed: communicate() has nothing to send
    time.sleep(0.2)  # walking 40,000 files takes longer than this
    os.killpg(proc.pid, signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err
    line = assert_one_json_line(err)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] == signal.SIGINT, report
    items = report["items"]
    assert items[0] == {**items[0], "input": "not-there.jpg", "status": "failed",
                        "reason": "missing"}, items[0]
    cancelled = items[1:]
    assert len(cancelled) == line["not_started"] == report["totals"]["cancelled"]
    assert len(cancelled) <= 40_000
    assert all(i["status"] == "cancelled" and i["input"].startswith("tree/d")
               for i in cancelled), cancelled[:3]
    assert not any(p.suffix == ".jpg" for p in (tmp_path / "out").rglob("*")) \
        if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.35])
def test_ctrl_c_while_the_modules_are_imported_is_one_line(tmp_path: Path, delay: float) -> None:
    proc = start(tmp_path, "-", "-o", "out", "--report", "report.json", "--log-format", "json")
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    code, err = finish(proc)
    if code == -signal.SIGINT and not err:  # before the interpreter installed its handler
        pytest.skip("the signal came before the interpreter handled it")
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(err.splitlines()) == 1, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] == signal.SIGINT and report["items"] == [], report


def test_ctrl_c_on_a_terminal_before_any_work_is_one_line(tmp_path: Path) -> None:
    t = Terminal(tmp_path, "batch", "-", "-o", "out", "--report", "report.json")
    try:
        wait_until(lambda: reading_stdin(t.proc.pid) or t.proc.poll() is not None, 60,
                   "the batch reading its list from the terminal")
        t.type(b"\x03")  # the terminal sends SIGINT to the foreground process group
        assert t.finish() == 130, t.rows()
    finally:
        t.ensure_dead()
    rows = [r for r in t.rows() if r.strip() and r.strip() != "^C"]
    assert "Traceback" not in t.raw(), t.raw()
    assert len(rows) == 1 and "batch.interrupted" in rows[0], rows
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] == signal.SIGINT and report["items"] == [], report
