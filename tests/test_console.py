"""The console rendering on a real terminal: a pty whose slave is the command's controlling
terminal (so a Ctrl-C typed into it is the kernel's SIGINT to the foreground process group),
120 columns wide, with a real batch or a real daemon over real images. A processed line fits in
one row; NO_COLOR (and a stream that is no terminal) means no colour codes; an interrupted batch
of 300 images says so in one line, not one per cancelled input."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from tests import crashers
from tests.conftest import ROOT, make_image, run_cli, wait_until
from tests.test_cli import tagged_processes
from tests.test_logs import libtiff_complaint

pytestmark = pytest.mark.integration

COLUMNS = 120
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO |WARN |ERROR) \S")
# ordinary names: a camera's, a phone's, a scanner's, in a sub-folder
NAMES = ("IMG_20240512_183045.jpg", "DSC_0042.jpg", "PXL_20240601_101112345.png",
         "scan 0007.tif")


def width(text: str) -> int:
    """The columns a row takes on the terminal (wide characters two, combining marks none)."""
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


class Terminal:
    """A ``watcher`` command on a real terminal (a pty, COLUMNS wide) that is its controlling
    terminal, the command's process group in the foreground; everything it writes is kept."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
        base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS")}
        self.tag = f"watcher-test-{os.urandom(8).hex()}"

        def controlling_terminal() -> None:  # in the child: a session whose terminal it is
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", *args], cwd=cwd, stdin=slave, stdout=slave,
            stderr=slave, preexec_fn=controlling_terminal,  # noqa: PLW1509 - set-up only
            env={**base, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color",
                 "WATCHER_TEST_TAG": self.tag, **(env or {})})
        os.close(slave)
        self._master = master
        self._data = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: every process holding the slave has closed it
                return
            if not chunk:
                return
            with self._lock:
                self._data += chunk

    def raw(self) -> str:
        with self._lock:
            return self._data.decode("utf-8", "replace")

    def rows(self) -> list[str]:
        """What was written, as the terminal's rows: colour codes removed, each carriage
        return (a progress bar redrawn) starting the row again."""
        out = []
        for line in ANSI.sub("", self.raw()).split("\n"):
            out.append(line.rstrip("\r").rsplit("\r", 1)[-1])
        return out

    def log_lines(self, event: str) -> list[str]:
        return [r for r in self.rows() if LINE.match(r) and r[15:].split(" ", 1)[0] == event]

    def wait_for(self, event: str, count: int = 1, timeout: float = 60) -> list[str]:
        def enough() -> list[str] | None:
            found = self.log_lines(event)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                self._reader.join(5)
                found = self.log_lines(event)
                if len(found) >= count:
                    return found
                pytest.fail(f"exited ({self.proc.returncode}) before {count} x {event}: "
                            f"{self.rows()[-30:]}")
            return None
        return wait_until(enough, timeout, f"{count} x {event} on the terminal")

    def type(self, data: bytes) -> None:
        os.write(self._master, data)

    def finish(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(10)
            os.close(self._master)

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        wait_until(lambda: not tagged_processes(self.tag), 15, "no process of the run left")


def photos(folder: Path) -> list[Path]:
    return [make_image(folder / "holiday" / name, size=(640, 480), seed=i)
            for i, name in enumerate(NAMES)]


def assert_outputs(line: str, shown_input: str, folder: str) -> None:
    """The line shows ``shown_input``, then its thumbnail and web outputs relative to the output
    folder (``folder``: the mirrored sub-folder) in one brace form, then the time it took. The
    input's name is repeated in the outputs' unless that would not fit in the terminal."""
    name = os.path.basename(shown_input)
    stem, ext = Path(name).stem, Path(name).suffix[1:]
    names = "{thumbnail,web}.jpg" if ext == "jpg" else f"{{thumbnail.{ext},web.jpg}}"
    full, short = f"{folder}{stem}_{names}", f"{folder}…_{names}"
    m = re.search(rf" {re.escape(shown_input)} -> (\S.*?)  \d+(\.\d)? ms$", line)
    assert m, line
    assert m.group(1) == full or (m.group(1) == short and
                                  len(line) - len(short) + len(full) > COLUMNS), line


def assert_readable(line: str, tmp_path: Path) -> None:
    """A console line as the issue asked: one row, no absolute path, no role, no repr."""
    assert len(line) <= COLUMNS, f"{len(line)} columns: {line}"
    assert str(tmp_path) not in line, line
    assert "role=" not in line and "['" not in line and "worker_pid" not in line, line


def test_a_batch_on_a_terminal_writes_one_row_per_processed_file_in_colour(
        tmp_path: Path) -> None:
    photos(tmp_path / "in")
    libtiff_complaint(tmp_path / "in" / "holiday" / "broken.tif")
    t = Terminal(tmp_path, "batch", "in", "-o", "out", "-p", "thumbnail", "-p", "web",
                 "--workers", "2", "--no-progress")  # auto: the console rendering on a tty
    try:
        assert t.finish() == 1  # the broken TIFF failed
    finally:
        t.ensure_dead()
    assert "\x1b[" in t.raw()  # a terminal, no NO_COLOR: coloured
    done = t.log_lines("file.processed")
    assert len(done) == len(NAMES), t.rows()
    for name in NAMES:
        (line,) = [x for x in done if f" in/holiday/{name} -> " in x]
        assert_readable(line, tmp_path)
        assert_outputs(line, f"in/holiday/{name}", "holiday/")  # the input as given
    assert any(" -> holiday/DSC_0042_{thumbnail,web}.jpg " in x for x in done), done
    (failed,) = t.log_lines("file.failed")
    assert re.search(r" in/holiday/broken\.tif  [a-z-]+: ", failed), failed
    assert str(tmp_path) not in failed
    (finished,) = t.log_lines("batch.finished")
    assert "succeeded=4 failed=1" in finished
    for row in t.rows():  # every row is a whole log line (codec.message included)
        assert not row or LINE.match(row), row


@pytest.mark.parametrize(("env", "coloured"), [({"NO_COLOR": "1"}, False),
                                               ({"NO_COLOR": "true"}, False),
                                               ({"NO_COLOR": ""}, True),
                                               ({"TERM": "dumb"}, False)])
def test_no_color_is_honoured_on_a_terminal(tmp_path: Path, env: dict[str, str],
                                            coloured: bool) -> None:
    # https://no-color.org: any non-empty value turns colour off; an empty one does not
    make_image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    t = Terminal(tmp_path, "batch", "in", "-o", "out", "--log-format", "console", "--workers",
                 "1", env=env)
    try:
        assert t.finish() == 1
    finally:
        t.ensure_dead()
    assert ("\x1b[" in t.raw()) is coloured, repr(t.raw()[-2000:])
    assert t.log_lines("file.failed") and t.log_lines("batch.finished")


def test_console_to_a_stream_that_is_no_terminal_has_no_colour(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "a.png")
    proc = run_cli("batch", "in", "-o", "out", "--log-format", "console", cwd=tmp_path,
                   env={"TERM": "xterm-256color", "NO_COLOR": ""})
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr
    assert "{" not in proc.stderr  # console, as asked, not JSON
    (line,) = [x for x in proc.stderr.splitlines() if " file.processed " in x]
    assert re.match(r"^\d\d:\d\d:\d\d INFO  file.processed   in/a.png -> a_thumbnail.png  "
                    r"\d+(\.\d)? ms$", line), line


def test_a_daemon_on_a_terminal_writes_short_lines_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    for d in ("inbox", "processed", "archive", "quarantine", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "watcher.toml").write_text(
        '[watch]\ninbox = "inbox"\noutput = "processed"\narchive = "archive"\n'
        'quarantine = "quarantine"\nwork = "work"\nsettle = 0.3\n'
        '[output]\npipelines = ["thumbnail", "web"]\n')
    # NO_COLOR in the daemon: its workers' lines too
    t = Terminal(tmp_path, "watch", "--workers", "2", env={"NO_COLOR": "1"})
    try:
        t.wait_for("daemon.started", timeout=60)
        for i, name in enumerate(NAMES):
            make_image(tmp_path / "src" / name, size=(640, 480), seed=i)
            os.rename(tmp_path / "src" / name, tmp_path / "inbox" / name)
        (tmp_path / "inbox" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
        done = t.wait_for("file.processed", count=len(NAMES))
        (quarantined,) = t.wait_for("file.quarantined")
        t.type(b"\x03")  # Ctrl-C on the terminal: SIGINT to the foreground group
        assert t.finish(60) == 0
    finally:
        t.ensure_dead()
    assert "\x1b[" not in t.raw()
    for name in NAMES:
        (line,) = [x for x in done if f" {name} -> " in x]
        assert_readable(line, tmp_path)
        assert_outputs(line, name, "")  # relative to the inbox, and to the output folder
    assert_readable(quarantined, tmp_path)
    # the claim's path in the work folder is named by the input's name
    assert " broken.jpg  " in quarantined and "work/" not in quarantined, quarantined
    assert t.log_lines("daemon.stopping") and t.log_lines("daemon.stopped"), t.rows()[-5:]
    for row in t.rows():  # daemon.started and daemon.stopped included
        assert width(row) <= COLUMNS, f"{width(row)} columns: {row}"
    (started,) = t.log_lines("daemon.started")
    assert "inbox=inbox output=processed workers=2 pipelines=thumbnail,web" in started, started
    (stopped,) = t.log_lines("daemon.stopped")
    assert "processed=4 quarantined=1" in stopped, stopped


def slow_photos(folder: Path, n: int, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        crashers.slow_image(str(folder / f"IMG_{i:04d}.png"), seconds)


def progress(t: Terminal, total: int) -> int:
    """The last count the progress bar showed."""
    found = re.findall(rf"\b(\d+)/{total}\b", ANSI.sub("", t.raw()))
    return int(found[-1]) if found else 0


def test_ctrl_c_half_way_through_300_images_is_one_line(tmp_path: Path) -> None:
    slow_photos(tmp_path / "in", 300, 0.1)
    cmd = ("batch", "in", "-o", "out", "--ops", "tests.crashers.slow", "--suffix", "s",
           "--workers", "2")
    t = Terminal(tmp_path, *cmd)  # a progress bar, as a person running it sees
    try:
        wait_until(lambda: progress(t, 300) >= 100, 120, "a third of the images done")
        t.type(b"\x03")  # a real Ctrl-C, typed into the terminal
        assert t.finish(90) == 130
    finally:
        t.ensure_dead()
    written = len(os.listdir(tmp_path / "out"))
    assert 100 <= written < 300
    text = ANSI.sub("", t.raw())
    assert "file.cancelled" not in text  # no line per cancelled input
    (line,) = t.log_lines("batch.cancelled")
    assert re.search(rf"\bcancelled={300 - written} ", line), line
    # where the list is, when no report was asked: how to get one
    assert "--report FILE" in line and "run the same command again" in line, line
    for row in t.rows():  # whole lines: nothing cut off mid-path, only the bar's rows between
        assert not row or LINE.match(row) or "img/s" in row or "/300" in row, row
    # the hint holds: the same command again finishes exactly the cancelled ones
    again = run_cli(*cmd, "--report", "r.json", "--no-progress", cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    totals = json.loads((tmp_path / "r.json").read_text())["totals"]
    assert totals["succeeded"] == 300 - written and totals["skipped"] == written


def test_an_interrupted_batch_in_json_keeps_one_fate_line_per_input(tmp_path: Path) -> None:
    slow_photos(tmp_path / "in", 40, 0.2)
    with open(tmp_path / "log.json", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "batch", "in", "-o", "out", "--ops",
             "tests.crashers.slow", "--suffix", "s", "--workers", "2", "--report", "r.json"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(lambda: (tmp_path / "log.json").read_text().count('"file.processed"') >= 4,
                   60, "four images done")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the group
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    events = [json.loads(x) for x in (tmp_path / "log.json").read_text().splitlines()]
    report = json.loads((tmp_path / "r.json").read_text())
    cancelled = {i["input"] for i in report["items"] if i["status"] == "cancelled"}
    lines: list[dict[str, Any]] = [e for e in events if e["event"] == "file.cancelled"]
    assert cancelled and {e["input"] for e in lines} == cancelled and len(lines) == len(cancelled)
    assert all(e["level"] == "info" and e["reason"] == "cancelled" for e in lines)
    (summary,) = [e for e in events if e["event"] == "batch.cancelled"]
    assert summary["level"] == "warning" and summary["cancelled"] == len(cancelled)
    assert summary["list"] == "r.json"
    fates = [e["input"] for e in events
             if e["event"] in ("file.processed", "file.failed", "file.cancelled")]
    assert sorted(fates) == sorted(f"in/IMG_{i:04d}.png" for i in range(40))  # one each
