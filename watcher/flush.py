"""Background fsync: an output's data goes to the disk while the worker decodes the next image.

``start(fd)`` asks for an fsync of ``fd`` and returns at once; ``Flush.done`` says whether it has
finished and ``Flush.wait`` waits for it (raising its ``OSError``). On Linux with glibc the fsync
runs on one of glibc's own POSIX AIO threads (``aio_fsync``): C threads that never take the GIL,
so the worker's single Python thread neither blocks on the disk nor trades the GIL with a second
Python thread. (A Python committer thread did this before: its GIL hand-offs and wake-ups cost
the worker about 1 ms of CPU per small image, more than the image's own share of the fsync.)

Elsewhere (musl, macOS, 32-bit builds), or when glibc refuses a request, ``start`` fsyncs at
once: the same guarantee, without the overlap.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from typing import Any

_SIGEV_NONE = 1


class _Aiocb(ctypes.Structure):
    """glibc's ``struct aiocb`` on 64-bit Linux (168 bytes): the fields ``aio_fsync`` reads, the
    rest kept as glibc's own."""

    _fields_ = [("aio_fildes", ctypes.c_int), ("aio_lio_opcode", ctypes.c_int),
                ("aio_reqprio", ctypes.c_int), ("aio_buf", ctypes.c_void_p),
                ("aio_nbytes", ctypes.c_size_t), ("sigev_value", ctypes.c_void_p),
                ("sigev_signo", ctypes.c_int), ("sigev_notify", ctypes.c_int),
                ("_glibc", ctypes.c_char * 120)]


def _load_aio() -> Any:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" \
            or ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(_Aiocb) != 168:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ptr = ctypes.POINTER(_Aiocb)
        for name, args, res in (("aio_fsync", [ctypes.c_int, ptr], ctypes.c_int),
                                ("aio_error", [ptr], ctypes.c_int),
                                ("aio_return", [ptr], ctypes.c_ssize_t),
                                ("aio_suspend", [ctypes.POINTER(ptr), ctypes.c_int,
                                                 ctypes.c_void_p], ctypes.c_int)):
            fn = getattr(libc, name)
            fn.argtypes, fn.restype = args, res
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_aio()


class Flush:
    """One fsync, in flight or finished."""

    __slots__ = ("_cb", "_error")

    def __init__(self, cb: _Aiocb | None, error: OSError | None = None) -> None:
        self._cb = cb  # kept alive (glibc writes into it) until the request has finished
        self._error = error

    def done(self) -> bool:
        if self._cb is None:
            return True
        code = _libc.aio_error(ctypes.byref(self._cb))
        if code == errno.EINPROGRESS:
            return False
        self._finish(code)
        return True

    def wait(self) -> None:
        """Return once the data is on disk; raise the fsync's OSError if it failed."""
        while self._cb is not None:
            code = _libc.aio_error(ctypes.byref(self._cb))
            if code != errno.EINPROGRESS:
                self._finish(code)
                break
            one = (ctypes.POINTER(_Aiocb) * 1)(ctypes.pointer(self._cb))
            _libc.aio_suspend(one, 1, None)  # EINTR (a signal): look again
        if self._error is not None:
            raise self._error

    def _finish(self, code: int) -> None:
        cb, self._cb = self._cb, None
        assert cb is not None
        _libc.aio_return(ctypes.byref(cb))  # frees glibc's record of the request
        if code:
            self._error = OSError(code, f"fsync: {os.strerror(code)}")


def start(fd: int) -> Flush:
    """fsync ``fd`` in the background where the platform allows, else now. Keep ``fd`` open
    until the flush is done."""
    if _libc is not None:
        cb = _Aiocb(aio_fildes=fd, sigev_notify=_SIGEV_NONE)
        if _libc.aio_fsync(os.O_SYNC, ctypes.byref(cb)) == 0:
            return Flush(cb)
        # EAGAIN (out of request slots) and the like: do it here instead
    try:
        os.fsync(fd)
    except OSError as exc:
        return Flush(None, exc)
    return Flush(None)


def background() -> bool:
    """Whether fsyncs run in the background here (glibc's AIO threads)."""
    return _libc is not None
