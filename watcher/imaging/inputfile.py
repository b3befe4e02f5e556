"""The input file as the decoder reads it: only regular files are opened, and every failure of
the operating system's reads is kept as evidence of whose fault a failed decode is.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable
from typing import IO, Any

from watcher.errors import RejectedInput

# A read larger than this is clamped to what the file holds (a size from the data must not
# make the reader allocate it).
_BIG_READ = 1 << 24


class InputFile:
    """The input file as the decoder sees it: the evidence of whose fault a failure is.

    Every ``OSError`` raised by the operating system's read, seek or tell of the file is kept in
    ``failure`` (and re-raised). A position the data asks for never reaches the system unless
    the file has it: a negative one is refused (``ValueError``, as ``io.BytesIO`` does), one
    past the end is kept here and reads nothing, as a file would (``lseek`` refuses offsets
    past the file system's largest file with ``EINVAL``, which is then the data's doing, not
    the disk's). ``fileno`` is withheld: a decoder (libtiff) that would read the descriptor
    itself reads through here instead.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.failure: OSError | None = None
        self._beyond: int | None = None  # a position past the end of the file
        self._known = 0  # a size the file had: positions up to it exist (fstat when past it)

    def _system(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            if self.failure is None:
                self.failure = exc
            raise

    def read(self, n: int | None = -1) -> bytes:
        if self._beyond is not None:
            return b""
        n = -1 if n is None else n
        if n > _BIG_READ:
            n = min(n, max(self._size() - self.tell(), 0))
        return self._system(self._raw.read, n)  # type: ignore[no-any-return]

    def readinto(self, buffer: Any) -> int:
        if self._beyond is not None:
            return 0
        return self._system(self._raw.readinto, buffer)  # type: ignore[attr-defined,no-any-return]

    def readline(self, limit: int | None = -1) -> bytes:
        if self._beyond is not None:
            return b""
        return self._system(self._raw.readline, -1 if limit is None else limit)  # type: ignore[no-any-return]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            target = offset
        elif whence == os.SEEK_CUR:
            target = self.tell() + offset
        elif whence == os.SEEK_END:
            target = self._size() + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target > self._known:
            self._known = self._size()
        if target > self._known:
            self._system(self._raw.seek, self._known)
            self._beyond = target
            return target
        self._beyond = None
        return self._system(self._raw.seek, target)  # type: ignore[no-any-return]

    def tell(self) -> int:
        if self._beyond is not None:
            return self._beyond
        return self._system(self._raw.tell)  # type: ignore[no-any-return]

    def _size(self) -> int:
        return self._system(os.fstat, self._raw.fileno()).st_size  # type: ignore[no-any-return]

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno: the input is read through watcher.imaging.inputfile")

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        self._raw.close()


def open_regular(path: str, *, nofollow: bool, max_size: int = 0,
                 max_links: int = 0) -> tuple[IO[bytes], int]:
    """Open ``path`` for reading only if it is a regular file: opened first (``O_NONBLOCK``:
    never block on a FIFO; ``O_NOFOLLOW`` with ``nofollow``), then judged by ``fstat`` of the
    descriptor, so what is checked is what is read. ``max_links`` (0: no check) refuses a file
    with more hard links than that (its data may belong to a file elsewhere)."""
    try:
        pre = os.lstat(path)
    except FileNotFoundError as exc:
        raise RejectedInput("missing", f"{path}: no such file") from exc
    except OSError:
        pre = None  # (ENAMETOOLONG, EACCES...) the open below says what it is
    if pre is not None and stat.S_ISLNK(pre.st_mode) and not nofollow:
        try:
            pre = os.stat(path)
        except OSError:
            pre = None  # dangling, or worse: the open below says what it is
    if pre is not None and not stat.S_ISREG(pre.st_mode) and not stat.S_ISLNK(pre.st_mode):
        # a device or FIFO is never opened: opening some devices acts (a tape rewinds)
        raise RejectedInput("not-a-file", f"{path} is not a regular file ({_kind(pre.st_mode)})")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | \
        (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        if os.path.lexists(path):
            raise RejectedInput("missing", f"{path}: dangling symbolic link") from exc
        raise RejectedInput("missing", f"{path}: no such file") from exc
    except PermissionError as exc:
        raise RejectedInput("permission-denied", f"{path}: {exc.strerror}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise RejectedInput("symlink",
                                f"{path} is a symbolic link; links are not followed") from exc
        if exc.errno == errno.ENAMETOOLONG:
            raise RejectedInput("path-too-long", f"{path}: {exc.strerror}") from exc
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # a socket, a device without a driver
            raise RejectedInput("not-a-file", f"{path} is not a regular file") from exc
        raise RejectedInput("permission-denied", f"{path}: {exc.strerror}") from exc
    st = os.fstat(fd)  # the file we opened, not the name we looked at
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = RejectedInput("not-a-file",
                                f"{path} is not a regular file ({_kind(st.st_mode)})")
    elif max_links and st.st_nlink > max_links:
        problem = RejectedInput("hard-link", f"{path} has {st.st_nlink} hard links; its data "
                                             "may belong to a file elsewhere")
    elif max_size and st.st_size > max_size:
        problem = RejectedInput("too-large", f"{path} is {st.st_size} bytes; max_file_size is "
                                             f"{max_size}")
    if problem is not None:
        os.close(fd)
        raise problem
    return os.fdopen(fd, "rb"), st.st_size


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"

