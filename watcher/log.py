"""structlog set-up for one process role (main, worker).

Logs go to stderr: JSON when stderr is not a terminal (or when asked), key=value on a terminal.
Configure in every process at its start; bound loggers are never passed between processes.
While a progress bar is on screen, lines are written around it so the two don't interleave.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


class _BarAwareStream:
    """A text stream that clears any tqdm bar before writing a line, then redraws it."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        from tqdm import tqdm  # noqa: PLC0415 - only needed where a bar may be drawn

        with tqdm.external_write_mode(file=self._stream):
            n = self._stream.write(text)
            self._stream.flush()
        return n

    def flush(self) -> None:
        self._stream.flush()


def resolve_format(fmt: LogFormat, stream: IO[str] | None = None) -> Literal["json", "console"]:
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    return "console" if stream.isatty() else "json"


def configure(role: str, fmt: LogFormat = "auto", level: str = "info",
              stream: IO[str] | None = None) -> None:
    """Configure structlog for this process. ``role`` is bound into every line."""
    stream = stream or sys.stderr
    kind = resolve_format(fmt, stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if kind == "json":
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.JSONRenderer(sort_keys=False)]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    out: Any = _BarAwareStream(stream) if stream.isatty() else stream
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role)


def get(name: str = "watcher") -> Any:
    return structlog.get_logger(name)
