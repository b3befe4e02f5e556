"""Every log line is one JSON object: a real daemon and a real batch with stdout and stderr on ONE
file (as systemd's ``StandardError=inherit`` and container runtimes have it), over a TIFF that
makes libtiff write to descriptor 2 itself, and a user transform that logs through stdlib
``logging`` (as watchdog, PIL and distributed do), warns, prints, and writes raw bytes without
a newline to descriptor 2 (which, unhandled, would be glued to the next JSON line)."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import ROOT, make_image, wait_until
from tests.test_cli import tagged_processes
from tests.test_group_signals import Group, watch
from watcher import log

pytestmark = pytest.mark.integration

USEROPS = '''
import logging, os, sys, warnings

# at import: in the process that loads the config (the daemon, the batch) and in each worker
logging.getLogger("watchdog.observers.inotify_buffer").warning("queue overflowed (imported)")


def chatty(im):
    logging.getLogger("PIL.chatty").warning("a stdlib warning from %s", "a worker")
    warnings.warn("a Python warning from a transform")
    print("a print to stdout from a transform")
    print("a print to stderr from a transform", file=sys.stderr)
    sys.stderr.flush()
    os.write(2, b"raw bytes on fd 2 without a newline")
    return im
'''

CONFIG = """
[pipelines.chatty]
steps = ["userops.chatty", "thumbnail(32, 32)"]
[output]
pipelines = ["chatty"]
"""


def libtiff_complaint(path: Path) -> Path:
    """A deflate-compressed TIFF whose strip has a damaged zlib header: Pillow hands it to
    libtiff, which prints "ZIPDecode: Decoding error ..." to descriptor 2 itself."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format="TIFF",
                                                  compression="tiff_deflate")
    data = bytearray(buf.getvalue())
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            strip = struct.unpack_from("<I", data, entry + 8)[0]
            data[strip:strip + 2] = b"\0\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def all_json(lines: list[str]) -> list[dict[str, Any]]:
    """Every line parsed; a line that is not one JSON object fails the test, shown."""
    events = []
    bad = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(obj, dict):
            bad.append(line)
        else:
            events.append(obj)
    assert bad == [], bad
    return events


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "userops.py").write_text(USEROPS)
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def test_a_daemon_run_writes_only_json_lines_on_its_shared_stream(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "watcher.toml").write_text(CONFIG)
    # unbuffered streams, as container images often set: a line and its newline written
    # separately would let other processes' text in between
    d = watch(root, "--config", str(root / "watcher.toml"), "--workers", "2",
              env={**_env(tmp_path), "PYTHONUNBUFFERED": "1"})
    try:
        libtiff_complaint(root / "inbox" / "bad.tif")
        for i in range(6):
            make_image(root / "inbox" / f"ok{i}.png", seed=i)
        d.wait_for("file.quarantined", input="bad.tif", timeout=60)
        d.wait_for("file.processed", count=6, timeout=60)
        d.killpg(signal.SIGTERM)
        assert d.wait(60) == 0
    finally:
        d.ensure_dead()
    events = all_json(d.lines())
    queued = {e["seq"]: e["input"] for e in events if e.get("event") == "file.queued"}
    native = [e for e in events if e.get("event") == "codec.message"]
    tiff = [e for e in native if "ZIPDecode" in e["message"]]
    assert tiff, native
    assert {queued[e["seq"]] for e in tiff} == {"bad.tif"}  # attributed to that input
    assert all(e["role"] == "worker" and e["stream"] == "stderr" for e in tiff)
    side = json.loads((root / "quarantine" / "bad.tif.error.json").read_text())
    assert any("ZIPDecode" in w for w in side["warnings"])  # and kept with its fate
    # what the transform wrote to fd 2 and sys.stderr, each a line of its own input
    for text in ("raw bytes on fd 2 without a newline", "a print to stderr from a transform"):
        mine = [e for e in native if e["message"] == text]
        assert mine and {queued[e["seq"]] for e in mine} <= {f"ok{i}.png" for i in range(6)}
    assert [e for e in native if e["message"] == "a print to stdout from a transform"]
    # stdlib logging, in the daemon and in the workers, through the same renderer
    overflow = [e for e in events if e.get("logger") == "watchdog.observers.inotify_buffer"]
    assert {e["role"] for e in overflow} == {"daemon", "worker"}
    assert all(e["event"] == "queue overflowed (imported)" and e["level"] == "warning"
               for e in overflow)
    assert [e for e in events if e.get("logger") == "PIL.chatty"
            and e["event"] == "a stdlib warning from a worker"]
    processed = [e for e in events if e.get("event") == "file.processed"]
    assert all("raw bytes on fd 2 without a newline" in e["warnings"] for e in processed)


def test_a_batch_in_json_writes_only_json_lines_on_its_shared_stream(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    bad = libtiff_complaint(inputs / "bad.tif")
    for i in range(4):
        make_image(inputs / f"ok{i}.png", seed=i)
    (tmp_path / "watcher.toml").write_text(CONFIG)
    b = Group(tmp_path, "batch", "in", "-o", "out", "-c", "watcher.toml", "--workers", "2",
              "--log-format", "json", "--no-progress", env=_env(tmp_path))
    try:
        assert b.wait(60) == 1  # the TIFF failed, the rest succeeded
    finally:
        b.ensure_dead()
    events = all_json(b.lines())
    tiff = [e for e in events if e.get("event") == "codec.message" and "ZIPDecode" in
            e["message"]]
    assert tiff and {os.path.realpath(tmp_path / e["input"]) for e in tiff} == \
        {os.path.realpath(bad)}, tiff
    failed = [e for e in events if e.get("event") == "file.failed"]
    assert len(failed) == 1 and any("ZIPDecode" in w for w in failed[0]["warnings"])
    assert len([e for e in events if e.get("event") == "file.processed"]) == 4
    assert [e for e in events if e.get("logger") == "watchdog.observers.inotify_buffer"
            and e["role"] == "main"]


def test_a_line_is_written_whole_in_one_write(tmp_path: Path, monkeypatch: Any) -> None:
    writes: list[bytes] = []
    real = os.write

    def spy(fd: int, data: Any) -> int:
        if fd == out:
            writes.append(bytes(data))
        return real(fd, data)

    path = tmp_path / "log"
    saved = log._setup
    with open(path, "w") as stream:
        out = stream.fileno()
        monkeypatch.setattr(os, "write", spy)
        log.configure("test", "json", "info", stream=stream)
        try:
            log.get("t").info("one.line", text="x" * 5000)
            log.get("t").warning("two.line")
        finally:
            log._setup, log._applied = saved, False  # as before, applied at the next line
    assert len(writes) == 2 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert [json.loads(w)["event"] for w in writes] == ["one.line", "two.line"]


def test_after_a_kill_9_of_the_daemon_its_helpers_write_no_plain_text(tmp_path: Path) -> None:
    # The resource tracker outlives a killed daemon a moment, cleans up the semaphores it
    # left, and used to say so in a plain-text warning on the shared stream.
    d = watch(tmp_path, "--workers", "2")
    try:
        make_image(tmp_path / "inbox" / "a.png")
        d.wait_for("file.processed", input="a.png")
        helpers = [p for p in tagged_processes(d.tag) if p != d.proc.pid]
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)
        wait_until(lambda: not set(helpers) & set(tagged_processes(d.tag)), 15,
                   "the forkserver, resource tracker and workers to exit")
    finally:
        d.ensure_dead()
    all_json(d.lines())
