"""The ``watcher`` command as a real subprocess: the seed's CLI examples, exit codes, logs,
lists and stdin, a progress bar on a real terminal, permissions, and signals mid-batch."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import ROOT, json_lines, make_image, run_cli, wait_until

pytestmark = pytest.mark.integration


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag``: any left after the CLI exits is an
    orphan (a worker or forkserver of that run)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if tag.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def test_seed_cli_example_100_bmps(tmp_path: Path) -> None:
    for i in range(1, 101):
        make_image(tmp_path / f"img_{i:03d}.bmp", size=(200 + i, 150), seed=i)
    proc = run_cli("batch", "img_*.bmp", "--out", "thumbnails/", "--pipeline", "thumbnail",
                   cwd=tmp_path, shell=True, timeout=120)  # the shell expands the glob
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(os.listdir(tmp_path / "thumbnails"))
    assert names == [f"img_{i:03d}_thumbnail.bmp" for i in range(1, 101)]
    with Image.open(tmp_path / "thumbnails" / "img_100_thumbnail.bmp") as im:
        assert im.format == "BMP" and im.size == (128, 64)
    logs = json_lines(proc.stderr)  # JSON by default: stderr is not a terminal
    assert sum(1 for e in logs if e["event"] == "file.processed") == 100
    done = [e for e in logs if e["event"] == "batch.finished"]
    assert len(done) == 1 and done[0]["succeeded"] == 100 and done[0]["failed"] == 0


def test_seed_cli_example_with_ops_and_a_quoted_glob(tmp_path: Path) -> None:
    for i in range(1, 6):
        make_image(tmp_path / f"img_{i:03d}.bmp", size=(300, 200), seed=i)
    proc = run_cli("batch", "img_*.bmp", "--out", "thumbnails/", "--ops", "thumbnail(128,128)",
                   cwd=tmp_path)  # no shell: watcher expands the glob itself
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "thumbnails")) == [
        f"img_{i:03d}_thumbnail.bmp" for i in range(1, 6)]


def test_seed_empty_input_list(tmp_path: Path) -> None:
    proc = run_cli("batch", "--out", "out/", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["event"] == "batch.empty"


def test_canonical_log_line_per_file(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_text("nope")
    proc = run_cli("batch", "ok.png", "bad.jpg", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 1
    logs = json_lines(proc.stderr)
    ok = [e for e in logs if e["event"] == "file.processed"]
    bad = [e for e in logs if e["event"] == "file.failed"]
    assert len(ok) == 1 and ok[0]["input"] == "ok.png"
    assert ok[0]["outputs"] == ["o/ok_thumbnail.png"] and ok[0]["duration_ms"] >= 0
    assert ok[0]["worker_pid"] > 0 and ok[0]["output_bytes"] > 0
    assert len(bad) == 1 and bad[0]["reason"] == "not-an-image" and bad[0]["level"] == "error"


def test_exit_code_1_when_an_input_fails_and_report_json(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    proc = run_cli("batch", "ok.png", "missing.png", "--out", "o", "--report", "r.json",
                   cwd=tmp_path)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["succeeded"] == 1 and report["totals"]["failed"] == 1
    assert {i["input"]: i["reason"] for i in report["items"]} == {"ok.png": "",
                                                                 "missing.png": "missing"}


@pytest.mark.parametrize(("args", "needle"), [
    (["batch", "x.png"], "the following arguments are required: -o/--out"),
    (["batch", "x.png", "-o", "o", "--ops", "thumbnail(0)"], "--ops[thumbnail].width"),
    (["batch", "x.png", "-o", "o", "--ops", "blurr"], "unknown transform 'blurr'"),
    (["batch", "x.png", "-o", "o", "--pipeline", "nope"], "no such pipeline"),
    (["batch", "x.png", "-o", "o", "--workers", "0"], "--workers: must be >= 1"),
    (["batch", "x.png", "-o", "o", "--format", "jpg2000"], "invalid choice"),
    (["batch", "x.png", "-o", "o", "--on-conflict", "clobber"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_get_a_usage_line_and_exit_2(tmp_path: Path, args: list[str],
                                                   needle: str) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: watcher"), proc.stderr
    assert needle in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bad_config_file_exit_2_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "watcher.toml").write_text("[pipelines.web]\nsteps = [{op='resize', width='x'}]")
    make_image(tmp_path / "x.png")
    proc = run_cli("batch", "x.png", "-o", "o", cwd=tmp_path)  # ./watcher.toml is picked up
    assert proc.returncode == 2
    assert "watcher.toml: pipelines.web.steps[0][resize].width: expected int" in proc.stderr
    assert not (tmp_path / "o").exists()
    check = run_cli("check-config", "--config", "watcher.toml", cwd=tmp_path)
    assert check.returncode == 2 and "pipelines.web.steps[0][resize].width" in check.stderr


def test_check_config_prints_effective_settings(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text("[engine]\nworkers = 3\n[pipelines.t]\n"
                                     "steps = ['thumbnail(64, 64)']\nformat = 'webp'\n")
    proc = run_cli("check-config", "-c", "w.toml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = tomllib.loads(proc.stdout)
    assert doc["engine"]["workers"] == 3
    assert doc["pipelines"]["t"]["steps"] == ["thumbnail(width=64, height=64)"]
    assert doc["pipelines"]["t"]["format"] == "webp"


def test_list_file_and_stdin(tmp_path: Path) -> None:
    for n in ("a", "b", "c"):
        make_image(tmp_path / f"{n}.png")
    (tmp_path / "list.txt").write_text("# my files\na.png\n\nb.png\n")
    proc = run_cli("batch", "--list", "list.txt", "-", "-o", "o", cwd=tmp_path, input="c.png\n")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "o")) == ["a_thumbnail.png", "b_thumbnail.png",
                                                 "c_thumbnail.png"]


def test_folder_input_recurses_and_mirrors(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "x" / "1.jpg")
    make_image(tmp_path / "in" / "y" / "1.jpg")
    proc = run_cli("batch", "in", "-o", "o", "--format", "webp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "x" / "1_thumbnail.webp").exists()
    assert (tmp_path / "o" / "y" / "1_thumbnail.webp").exists()


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    for i in range(20):
        make_image(tmp_path / f"{i}.png", seed=i)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24x100
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "batch", ".", "-o", "../o"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"})
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(30) == 0
    text = out.decode(errors="replace")
    assert "img/s" in text or "it/s" in text, text[-2000:]  # tqdm drew a bar
    assert "batch.finished" in text and "{" not in text  # console logs, not JSON, on a terminal
    assert len(os.listdir(tmp_path.parent / "o")) == 20


def test_permission_denied_is_reported(tmp_path: Path) -> None:
    make_image(tmp_path / "open.png")
    make_image(tmp_path / "secret.png").chmod(0o000)
    cmd = [sys.executable, "-m", "watcher", "batch", "open.png", "secret.png", "-o", "out"]
    if os.geteuid() == 0:
        # root reads any file: drop the capabilities that let it, so the kernel refuses for real
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux) to drop root's file-permission override")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
               "-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    fates = {e["input"]: e.get("reason") for e in json_lines(proc.stderr)
             if e["event"] in ("file.processed", "file.failed")}
    assert fates == {"open.png": None, "secret.png": "permission-denied"}


# --- signals ------------------------------------------------------------------------------------

class Running:
    """A batch CLI run in the background whose JSON log lines are collected as they come."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.tag = f"watcher-test-{uuid.uuid4().hex}"
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "batch", *args], cwd=cwd, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT), "WATCHER_TEST_TAG": self.tag})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def seen(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code


def slow_inputs(folder: Path, n: int, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        crashers.slow_image(str(folder / f"s{i}.png"), seconds)


SLOW_CONFIG = "[pipelines.slow]\nsteps = ['grayscale']\n"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_drains_running_tasks_and_cancels_the_rest(tmp_path: Path, sig: int,
                                                          code: int) -> None:
    slow_inputs(tmp_path / "in", 8, 1.5)
    run = Running(tmp_path, "in", "-o", "out", "--workers", "2", "--ops",
                  "tests.crashers.slow", "--report", "r.json")
    try:
        # the first two tasks are running when a worker has been busy for a moment
        wait_until(lambda: tagged_processes(run.tag) and len(tagged_processes(run.tag)) >= 3,
                   30, "the batch to start its workers")
        time.sleep(0.5)  # let both workers pick up a task (timing only widens the window)
        run.proc.send_signal(sig)
        assert run.finish(60) == code
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    report = json.loads((tmp_path / "r.json").read_text())
    t = report["totals"]
    assert t["succeeded"] >= 1 and t["cancelled"] >= 1 and t["failed"] == 0
    assert t["succeeded"] + t["cancelled"] == 8
    written = sorted(os.listdir(tmp_path / "out"))
    assert len(written) == t["succeeded"]  # each finished task's output, complete; no temps
    for name in written:
        with Image.open(tmp_path / "out" / name) as im:
            im.load()
    assert run.seen("batch.interrupted")
    wait_until(lambda: not tagged_processes(run.tag), 10, "no process of the run to be left")


def test_second_signal_stops_at_once(tmp_path: Path) -> None:
    slow_inputs(tmp_path / "in", 4, 20.0)
    run = Running(tmp_path, "in", "-o", "out", "--workers", "2", "--ops", "tests.crashers.slow")
    try:
        wait_until(lambda: len(tagged_processes(run.tag)) >= 3, 30, "the workers to start")
        time.sleep(0.5)
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        wait_until(lambda: run.seen("batch.interrupted"), 10, "the first signal to be seen")
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(30) == 130
        assert time.monotonic() - t0 < 15  # not the 20 s the running tasks would take
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    wait_until(lambda: not tagged_processes(run.tag), 10, "no process of the run to be left")
