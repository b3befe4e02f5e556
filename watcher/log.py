"""structlog set-up for one process role (main, daemon, worker), applied on the first line.

Logs go to stderr: JSON when stderr is not a terminal (or when asked), key=value on a terminal.
Configure in every process at its start; bound loggers are never passed between processes.
While a progress bar is on screen, lines are written around it so the two don't interleave.

``configure`` only records the choice, and ``get`` returns a small logger that drops lines below
the level at once: structlog (and the asyncio and ssl modules it imports, about 0.1 s) is loaded
and configured when the first line at or above the level is written. A batch run at level
"warning" with nothing to warn about never loads it; a worker process starts that much sooner.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import IO, Any, Literal

LogFormat = Literal["auto", "json", "console"]
LEVELS = logging.getLevelNamesMapping()


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


@dataclass(frozen=True)
class _Setup:
    role: str
    kind: Literal["json", "console"]
    level: int
    stream: IO[str]


_setup: _Setup | None = None  # what configure() asked for; None: structlog's own configuration
_applied = False  # structlog has been configured with _setup


def resolve_format(fmt: LogFormat, stream: IO[str] | None = None) -> Literal["json", "console"]:
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    return "console" if stream.isatty() else "json"


def configure(role: str, fmt: LogFormat = "auto", level: str = "info",
              stream: IO[str] | None = None) -> None:
    """Log as ``role`` (bound into every line) in ``fmt`` at ``level`` and above."""
    global _setup, _applied
    stream = stream or sys.stderr
    _setup = _Setup(role, resolve_format(fmt, stream), LEVELS[level.upper()], stream)
    _applied = False


def is_configured() -> bool:
    """Whether this process chose a logging set-up: ours, or the embedding program's own."""
    if _setup is not None:
        return True
    structlog = sys.modules.get("structlog")
    return structlog is not None and structlog.is_configured()


def _apply(setup: _Setup) -> None:
    import structlog  # noqa: PLC0415 - loaded with the first line written (see above)

    def add_role(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("role", setup.role)
        return event

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_role,  # a processor, not a context variable: any thread may write the first line
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if setup.kind == "json":
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.JSONRenderer(sort_keys=False)]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=setup.stream.isatty()))
    out: Any = _BarAwareStream(setup.stream) if setup.stream.isatty() else setup.stream
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(setup.level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class Logger:
    """A named logger with bound context; a line at or above the level goes to structlog."""

    __slots__ = ("_context", "_name", "_real")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}
        self._real: Any = None  # structlog's logger, once a line was written

    def bind(self, **kw: Any) -> Logger:
        return Logger(self._name, {**self._context, **kw})

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(logging.ERROR, "error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """An error line with the traceback of the exception being handled."""
        self._emit(logging.ERROR, "exception", event, kw)

    def _emit(self, level: int, method: str, event: str, kw: dict[str, Any]) -> None:
        global _applied
        setup = _setup
        if setup is not None and level < setup.level:
            return
        if setup is not None and not _applied:
            _apply(setup)
            _applied = True
        if self._real is None:
            import structlog  # noqa: PLC0415 - loaded with the first line written (see above)

            # a lazy proxy with the bound context: it follows a later configure() (structlog
            # caches no logger), where .bind() would fix the configuration of the first line
            self._real = structlog.get_logger(self._name, **self._context)
        getattr(self._real, method)(event, **kw)


def get(name: str = "watcher") -> Logger:
    return Logger(name)
