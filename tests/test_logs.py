"""Every log line is one JSON object: a real daemon and a real batch with stdout and stderr on ONE
file (as systemd's ``StandardError=inherit`` and container runtimes have it), over a TIFF that
makes libtiff write to descriptor 2 itself, and a user transform that logs through stdlib
``logging`` (as watchdog, PIL and distributed do), warns, prints, and writes raw bytes without
a newline to descriptor 2 (which, unhandled, would be glued to the next JSON line)."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import signal
import struct
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import ROOT, make_image, wait_until
from tests.test_cli import tagged_processes
from tests.test_group_signals import Group, watch
from tests.test_ops import free_port
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


# --- one field vocabulary ------------------------------------------------------------------------

DOCS = ROOT / "docs" / "cli.md"
LOG_METHODS = {"debug", "info", "warning", "error", "exception"}


def documented_fields() -> set[str]:
    """The field names docs/cli.md's "Field names and units" table lists (its first column)."""
    section = DOCS.read_text().split("### Field names and units", 1)[1].split("\n### ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    assert len(names) > 50, names  # the table was found and read
    return names


def fields_named_in_the_code() -> dict[str, set[str]]:
    """Every keyword a log call (``x.info("event", key=...)``, ``.bind(key=...)``) names in
    watcher/, and every key added to a line's ``fields``/``common`` dict: field -> where."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "watcher").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id in ("fields", "common")
                       for t in targets):
                    for key in node.value.keys:
                        if isinstance(key, ast.Constant):
                            found.setdefault(key.value, set()).add(
                                f"{path.relative_to(ROOT)}:{node.lineno} a line's fields")
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            f = node.func
            event = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) \
                else None
            logged = f.attr in LOG_METHODS and isinstance(event, str) and "." in event
            bound = f.attr == "bind" and "log" in ast.unparse(f.value)
            line_dict = f.attr == "update" and isinstance(f.value, ast.Name) and \
                f.value.id in ("fields", "common")
            if logged or bound or line_dict:
                for kw in node.keywords:
                    if kw.arg is not None:
                        found.setdefault(kw.arg, set()).add(
                            f"{path.relative_to(ROOT)}:{node.lineno} {event or f.attr}")
    return found


def test_every_field_a_log_call_names_is_documented() -> None:
    documented = documented_fields()
    named = fields_named_in_the_code()
    named.pop("exc_info", None)  # structlog's: written as the line's "exception"
    assert {"worker_pid", "input", "duration_ms", "input_bytes"} <= set(named)  # it looked
    assert {k: sorted(v) for k, v in named.items() if k not in documented} == {}
    # the names the vocabulary replaced are gone
    assert not {"worker", "pid", "bytes_in", "bytes_out", "duration", "note"} & set(named)


def test_every_field_of_every_line_of_a_real_run_is_documented(tmp_path: Path) -> None:
    """A real batch (processed, failed, a worker killed and its input retried, a glob matching
    nothing, native and stdlib messages, skipped on a second run, then an interrupted run) and a
    real daemon (the same files, a quarantine, a reload, the metrics endpoint, a stop), every
    line at debug level, stdout and stderr together: each field of each line is in the table."""
    documented = documented_fields()
    markers = tmp_path / "markers"  # the crashers' marker files: this test's own TMPDIR
    markers.mkdir()
    env = {**_env(tmp_path), "TMPDIR": str(markers)}
    (tmp_path / "watcher.toml").write_text(CONFIG.replace(
        '"userops.chatty"', '"userops.chatty", "tests.crashers.kill_first_time"'))
    inputs = tmp_path / "in"
    for i in range(3):
        make_image(inputs / f"ok{i}.png", seed=i)
    libtiff_complaint(inputs / "bad.tif")
    (inputs / "junk.jpg").write_bytes(b"not an image at all")
    crashers.poison_image(str(inputs / "poison.png"), token=1)
    events: list[dict[str, Any]] = []
    args = ("batch", "in", "nomatch*.png", "-o", "out", "-c", "watcher.toml", "--workers", "2",
            "--log-format", "json", "--log-level", "debug", "--no-progress", "--report",
            "r.json")
    for expected in (1, 1):  # the second run skips what the first wrote
        b = Group(tmp_path, *args, env=env)
        try:
            assert b.wait(90) == expected
        finally:
            b.ensure_dead()
        events += all_json(b.lines())
    slow = tmp_path / "slow"
    slow.mkdir()
    for i in range(8):
        crashers.slow_image(str(slow / f"s{i}.png"), 0.5)
    b = Group(tmp_path, "batch", "slow", "-o", "out2", "--ops", "tests.crashers.slow",
              "--workers", "2", "--log-format", "json", "--log-level", "debug", env=env)
    try:
        b.wait_for("file.processed", timeout=60)
        b.killpg(signal.SIGINT)
        assert b.wait(60) == 130
    finally:
        b.ensure_dead()
    events += all_json(b.lines())

    root = tmp_path / "d"
    root.mkdir()
    port = free_port()
    d = watch(root, "--config", str(tmp_path / "watcher.toml"), "--workers", "2",
              "--log-level", "debug", "--metrics-port", str(port), env=env)
    try:
        for path in sorted(inputs.iterdir()):
            if path.name != "poison.png":
                shutil.copy(path, root / "inbox" / path.name)
        crashers.poison_image(str(root / "inbox" / "poison.png"), token=2)
        d.wait_for("file.processed", count=4, timeout=90)
        d.wait_for("file.quarantined", count=2, timeout=60)
        d.killpg(signal.SIGHUP)
        d.wait_for("config.reloaded", timeout=60)
        d.killpg(signal.SIGTERM)
        assert d.wait(60) == 0
    finally:
        d.ensure_dead()
    events += all_json(d.lines())

    kinds = {e["event"] for e in events}
    assert {"file.processed", "file.failed", "file.skipped", "file.cancelled",
            "batch.cancelled", "batch.interrupted", "batch.finished", "worker.started",
            "worker.died", "file.retried", "codec.message", "file.quarantined",
            "daemon.started", "config.reloaded", "metrics.listening", "daemon.stopped",
            "file.queued", "file.detected"} <= kinds, kinds
    unknown: dict[str, set[str]] = {}
    for e in events:
        for key in e:
            if key not in documented:
                unknown.setdefault(key, set()).add(e["event"])
    assert unknown == {}
