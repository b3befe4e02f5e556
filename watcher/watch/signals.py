"""The daemon's signals: the handlers only record them, and wake the loop (a wake-up pipe that
the engine's poll also waits on); the loop acts on them in order.

SIGTERM/SIGINT stop the daemon (a second one stops it at once); SIGHUP reloads the config.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOPS = (signal.SIGTERM, signal.SIGINT)


class Signals:
    def __init__(self) -> None:
        self.pending: list[int] = []  # recorded, not acted on yet
        self.wake_fd, self._wake_w = os.pipe()
        for fd in (self.wake_fd, self._wake_w):
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in HANDLED:
            self._old[sig] = signal.signal(sig, self._record)
        self._old[-1] = signal.set_wakeup_fd(self._wake_w)  # a signal also wakes the loop at once

    def _record(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def drain_wakes(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.wake_fd, 4096):
                pass

    def second_stop(self) -> bool:
        """Whether a stop signal is still pending (a second one, while stopping)."""
        return any(s in STOPS for s in self.pending)

    def restore_wakeup(self) -> None:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._old.pop(-1))

    def restore_handlers(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
