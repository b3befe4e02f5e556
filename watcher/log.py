"""structlog set-up for one process role (main, daemon, worker), applied on the first line.

Logs go to stderr: JSON when stderr is not a terminal (or when asked), one short line per event
on a terminal (``watcher.console``: what a person scans for; colour unless ``NO_COLOR``).
Configure in every process at its start; bound loggers are never passed between processes.
While a progress bar is on screen, lines are written around it so the two don't interleave.

``configure`` only records the choice, and ``get`` returns a small logger that drops lines below
the level at once: structlog (and the asyncio and ssl modules it imports, about 0.1 s) is loaded
and configured when the first line at or above the level is written. A batch run at level
"warning" with nothing to warn about never loads it; a worker process starts that much sooner.

Every line is one object in JSON mode, whoever logs it, and reaches the file in one piece:

- each line is written with its newline in one ``os.write`` on the stream's descriptor, so the
  lines of several processes sharing a file (stdout and stderr on one journal or container log)
  never interleave, nor does other text get glued into one;
- stdlib ``logging`` (watchdog, PIL, distributed) and ``warnings`` go through the same
  processors and renderer (``_StdlibHandler``, installed on the root logger when the program has
  configured no handler of its own), and so do exceptions that end a thread;
- a worker's native libraries, which write to descriptor 2 themselves, are captured by the
  worker (``watcher.engine.capture``) and logged here as events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any, Literal

from watcher import console

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


class _LineLogger:
    """structlog's logger: each rendered line goes out with its newline in one ``os.write`` on
    the descriptor (a stream without one gets one ``write`` call), or around a progress bar on
    a terminal."""

    def __init__(self, stream: IO[str], fd: int) -> None:
        self._stream = stream
        self._fd = fd  # given by the caller (a worker's original stderr); else the stream's
        # around a progress bar only when writing to the stream itself (a worker writes to a
        # descriptor of its own: its stream is read back by watcher.engine.capture, see worker.py)
        same = fd < 0 or _fileno(stream) == fd
        self._bar = _BarAwareStream(stream) if same and stream.isatty() else None

    def msg(self, message: str) -> None:
        line = message + "\n"
        if self._bar is not None:
            self._bar.write(line)
            return
        # the stream's descriptor now, not when configured: a stream replaced or closed since
        # (a test's capture) must not leave a number that may belong to another file by now
        fd = self._fd if self._fd >= 0 else _fileno(self._stream)
        if fd < 0:
            with contextlib.suppress(Exception):
                self._stream.write(line)
                self._stream.flush()
            return
        with contextlib.suppress(Exception):
            self._stream.flush()  # text written by other code before this line stays before it
        write_all(fd, line.encode("utf-8", "backslashreplace"))

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _fileno(stream: IO[str]) -> int:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return -1


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd``: one ``write(2)`` unless the kernel takes less (a pipe past
    PIPE_BUF, a signal); errors (a closed stream) are dropped: logging must not fail."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return
        view = view[n:]


class _LoggerFactory:
    def __init__(self, stream: IO[str], fd: int) -> None:
        self._logger = _LineLogger(stream, fd)

    def __call__(self, *args: Any) -> _LineLogger:
        return self._logger


@dataclass(frozen=True)
class _Setup:
    role: str
    kind: Literal["json", "console"]
    level: int
    stream: IO[str]
    fd: int  # the descriptor lines are written to (-1: the stream's, looked up at each line)


_setup: _Setup | None = None  # what configure() asked for; None: structlog's own configuration
_applied = False  # structlog has been configured with _setup


def resolve_format(fmt: LogFormat, stream: IO[str] | None = None) -> Literal["json", "console"]:
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    return "console" if stream.isatty() else "json"


def configure(role: str, fmt: LogFormat = "auto", level: str = "info",
              stream: IO[str] | None = None, fd: int | None = None) -> None:
    """Log as ``role`` (bound into every line) in ``fmt`` at ``level`` and above, to ``fd``
    (default: ``stream``'s descriptor, ``stream`` defaulting to stderr). Stdlib logging and
    warnings follow, unless the program has a logging handler of its own."""
    global _setup, _applied
    stream = stream or sys.stderr
    _setup = _Setup(role, resolve_format(fmt, stream), LEVELS[level.upper()], stream,
                    -1 if fd is None else fd)
    _applied = False
    capture_stdlib(_setup.level)


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
    processors.append(structlog.processors.format_exc_info)
    if setup.kind == "json":
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        fd = setup.fd if setup.fd >= 0 else _fileno(setup.stream)
        processors.append(console.Renderer(colour=console.colour_wanted(fd), fd=fd))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(setup.level),
        logger_factory=_LoggerFactory(setup.stream, setup.fd),
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


# --- stdlib logging, warnings, thread exceptions -------------------------------------------------

_METHODS = ((logging.ERROR, "error"), (logging.WARNING, "warning"), (logging.INFO, "info"))
_inside = threading.local()  # a line being written: logging from within it is dropped


def _method(levelno: int) -> str:
    return next((name for lv, name in _METHODS if levelno >= lv), "debug")


class _StdlibHandler(logging.Handler):
    """Renders stdlib log records (and captured warnings) through this module's processors:
    the message is the event, the logger's name is ``logger``."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(_inside, "busy", False):
            return
        _inside.busy = True
        try:
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                kw["exc_info"] = record.exc_info
            method = _method(record.levelno)
            Logger(record.name)._emit(record.levelno, method, record.getMessage(), kw)
        except Exception:  # noqa: BLE001 - logging must never raise into its caller
            self.handleError(record)
        finally:
            _inside.busy = False


def capture_stdlib(level: int) -> bool:
    """Send stdlib logging (at WARNING and above, or ``level`` if higher: dependencies' own info
    lines stay out), ``warnings`` and exceptions that end a thread to this module's output; not
    where the program installed a root handler of its own. True if installed (now or before)."""
    root = logging.getLogger()
    if any(isinstance(h, _StdlibHandler) for h in root.handlers):
        root.setLevel(max(level, logging.WARNING))
        return True
    if root.handlers:
        return False
    root.addHandler(_StdlibHandler())
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    threading.excepthook = _thread_failed
    return True


def adopt_stream_handlers() -> int:
    """Replace the handlers that write plain text to stdout or stderr on named loggers (a
    library's own set-up, e.g. distributed's) by this module's; how many were replaced."""
    if not capture_stdlib(_setup.level if _setup else logging.WARNING):
        return 0
    ours = next(h for h in logging.getLogger().handlers if isinstance(h, _StdlibHandler))
    replaced = 0
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler and \
                    getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__,
                                                   sys.__stdout__):
                logger.removeHandler(h)
                if ours not in logger.handlers:
                    logger.addHandler(ours)
                replaced += 1
    return replaced


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a thread ended by an exception is one error line."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    get("watcher.thread").error(
        "thread.failed", thread=name, error=f"{args.exc_type.__name__}: {args.exc_value}",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
