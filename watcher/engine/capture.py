"""A worker's own stdout and stderr descriptors, read back as lines by a thread.

Native libraries in a worker (libtiff, libjpeg, libwebp) write their messages to descriptor 2
themselves, as plain text, past every Python logger: on a stream shared with JSON log lines
they would be lines no one can parse, or glued into one. ``Capture`` points descriptors 1 and 2
at pipes; a thread reads them and hands each line on (the worker logs it as a ``codec.message``
event to the original stderr). Python's own ``sys.stdout``/``sys.stderr`` text (a transform's
print) takes the same way.

A line is attributed to the input being processed when it was written: ``attribute(path)``
around a task drains the pipes under a lock when the task starts and when it ends, so every
byte the task wrote (synchronously, from its own thread) is read back while its path is the
current one. The pipes are enlarged so that a chatty decode does not fill them before the
thread gets to run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Called with (stream name, the line without its newline, what ``attribute`` was given or None).
OnLine = Callable[[str, str, Any], None]
PIPE_SIZE = 1024 * 1024
MAX_LINE = 16 * 1024  # a longer run of text without a newline is handed on in pieces
_NAMES = {1: "stdout", 2: "stderr"}
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Capture:
    """Descriptors ``fds`` of this process redirected into pipes read by a daemon thread."""

    def __init__(self, on_line: OnLine, fds: tuple[int, ...] = (1, 2)) -> None:
        self._on_line = on_line
        self._lock = threading.Lock()
        self._input: Any = None
        self.original: dict[int, int] = {}  # fd -> a duplicate of what it was
        self._readers: dict[int, int] = {}  # read end -> fd
        self._partial: dict[int, bytes] = {}
        self.lines: list[str] = []  # lines of the current attribution, for its result
        for fd in fds:
            self.original[fd] = os.dup(fd)  # not inheritable
            r, w = os.pipe()
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            self._readers[r] = fd
            self._partial[r] = b""
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def attribute(self, key: Any) -> Iterator[list[str]]:
        """Lines written meanwhile are ``key``'s (the task being processed): yields the list
        they are collected in (complete once the block has ended)."""
        with self._lock:
            self._drain_all(final=True)
            self._input = key
            self.lines = []
        lines = self.lines
        try:
            yield lines
        finally:
            for stream in (sys.stdout, sys.stderr):  # Python's own buffered text, now
                with contextlib.suppress(Exception):
                    stream.flush()
            with self._lock:
                self._drain_all(final=True)
                self._input = None
                self.lines = []

    def close(self) -> None:
        """Hand on what is left, and put the descriptors back."""
        with self._lock:
            self._drain_all(final=True)
            for fd, orig in self.original.items():
                with contextlib.suppress(OSError):
                    os.dup2(orig, fd)
            self._drain_all(final=True)
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(2.0)

    def _run(self) -> None:
        poller = select.poll()
        for r in [*self._readers, self._stop_r]:
            poller.register(r, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            if any(fd == self._stop_r for fd, _ in events):
                return
            with self._lock:
                for fd, _ in events:
                    if fd in self._readers:
                        self._drain(fd, final=False)

    def _drain_all(self, *, final: bool) -> None:
        for r in self._readers:
            self._drain(r, final=final)

    def _drain(self, r: int, *, final: bool) -> None:
        """Read what the pipe holds; hand on each complete line (and, ``final``, the rest)."""
        data = self._partial[r]
        while True:
            try:
                chunk = os.read(r, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        *complete, rest = data.split(b"\n")
        if final and rest:
            complete.append(rest)
            rest = b""
        while len(rest) > MAX_LINE:
            complete.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[r] = rest
        stream = _NAMES.get(self._readers[r], str(self._readers[r]))
        for raw in complete:
            line = raw.decode("utf-8", "backslashreplace").rstrip("\r")
            if not line.strip():
                continue
            if self._input is not None:
                self.lines.append(line)
            with contextlib.suppress(Exception):
                self._on_line(stream, line, self._input)
