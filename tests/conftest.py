"""Shared fixtures: real image files of every format and mode, and a guard that fails any test
leaving worker processes behind (the forkserver itself is shared and long-lived by design)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from watcher.samples import picture

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def descendants(pid: int | None = None) -> set[int]:
    """Live descendants of ``pid`` (default: this process), not counting the shared forkserver
    and resource tracker, nor zombies."""
    pid = pid or os.getpid()
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in _children(stack.pop()):
            if child in found:
                continue
            stack.append(child)
            cmd = _cmdline(child)
            if "forkserver import main" in cmd or "resource_tracker" in cmd:
                continue
            if _stat_state(child) in ("Z", "X"):
                continue
            found.add(child)
    return found


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Any:
    before = descendants()
    yield
    deadline = time.monotonic() + 10
    while True:
        left = descendants() - before
        if not left:
            return
        if time.monotonic() > deadline:
            cmds = {p: _cmdline(p) for p in left}
            pytest.fail(f"test left processes behind: {cmds}")
        time.sleep(0.05)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    """Mount a real, small tmpfs: ``tmpfs(name, size="1m")`` returns its folder (root only)."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("needs root to mount a tmpfs")
    mounted: list[Path] = []

    def mount(name: str, size: str = "1m") -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last byte; the filler's path."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def make_image(path: Path, *, size: tuple[int, int] = (64, 48), mode: str = "RGB",
               fmt: str | None = None, seed: int = 0, **save: Any) -> Path:
    """Write a real image file: a photo-like picture converted to ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = picture(*size, seed=seed)
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.linear_gradient("L").resize(size))
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt, **save)
    return path


@pytest.fixture
def img(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, **kw: Any) -> Path:
        return make_image(tmp_path / name, **kw)
    return make


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None,
            timeout: float = 60, env: dict[str, str] | None = None,
            shell: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real ``watcher`` command in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd: Any = " ".join([sys.executable, "-m", "watcher", *args]) if shell \
        else [sys.executable, "-m", "watcher", *args]
    return subprocess.run(cmd, check=False, cwd=cwd, input=input, capture_output=True, text=True,
                          timeout=timeout, env=full_env, shell=shell)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
