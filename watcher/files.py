"""File safety: atomic writes, no-clobber publishing, and collision-free output names.

An output is written to a hidden temp name in its destination folder, flushed and fsynced, then
published under its final name in one step (``os.replace`` to overwrite, ``os.link`` to refuse a
different existing file), and the folder is fsynced. A reader never sees a partial file, and a
kill -9 leaves at most a hidden temp file that ``temp_name`` lets its owner find and remove.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import io
import os
import re
import socket
from collections.abc import Callable, Iterator
from typing import IO, Any

from .errors import RejectedInput

TEMP_SUFFIX = ".watcher-tmp"
# This machine, as temp names carry it: folders may be shared by several machines, and a pid
# means something only on the host it came from.
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def temp_name(final: str, pid: int, host: str = HOST) -> str:
    """The temp file process ``pid`` of ``host`` writes before publishing ``final``:
    ``.{name}.{host}.{pid}.watcher-tmp``."""
    head, tail = os.path.split(final)
    return os.path.join(head, f".{tail}.{host}.{pid}{TEMP_SUFFIX}")


def temp_owner(name: str) -> tuple[str, int] | None:
    """The (host, pid) a temp file name carries, or None when it is not one of ours."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (the owner of a temp file, a parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SPOOL_LIMIT = 16 * 1024 * 1024  # bytes of an encoded output kept in memory before its temp file


class _Spool:
    """Where an output is encoded: memory, until it grows past SPOOL_LIMIT, then its temp file.

    Encoding into memory keeps the file system out of the worker's main thread: creating a file
    waits on the journal while another thread's fsync commits it (ext4, XFS), so the fsync
    that should overlap the next image's decode would stall it instead. The committer thread
    creates the temp file, writes, fsyncs and publishes it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._mem: io.BytesIO | None = io.BytesIO()
        self._file: IO[bytes] | None = None

    @property
    def _fp(self) -> IO[bytes]:
        fp = self._mem if self._mem is not None else self._file
        if fp is None:
            raise ValueError("I/O on a closed output")
        return fp

    def write(self, data: Any) -> int:
        n = self._fp.write(data)
        if self._mem is not None and self._mem.tell() > SPOOL_LIMIT:
            self._spill()
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    def read(self, n: int = -1) -> bytes:
        return self._fp.read(n)

    def flush(self) -> None:
        self._fp.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")  # Pillow then encodes in chunks through write()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        fp = self._fp
        pos = fp.tell()
        end = fp.seek(0, os.SEEK_END)
        fp.seek(pos)
        return end

    def _create(self) -> IO[bytes]:
        try:
            return open(self.path, "xb")
        except FileExistsError:  # left by an earlier process with a recycled pid
            os.unlink(self.path)
        except FileNotFoundError:  # the output folder does not exist yet
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        return open(self.path, "xb")

    def _spill(self) -> None:
        assert self._mem is not None
        pos = self._mem.tell()
        f = self._create()
        try:
            f.write(self._mem.getbuffer())
            f.seek(pos)
        except BaseException:
            f.close()
            raise
        self._file, self._mem = f, None

    def persist(self) -> None:
        """The whole output in its temp file, fsynced and closed."""
        if self._mem is not None:
            self._spill()
        f = self._fp
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None

    def close(self) -> None:
        self._mem = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class Staged:
    """An output encoded in full, not yet durable nor published.

    ``commit`` writes it to its temp name, fsyncs it and publishes it under its final name;
    ``discard`` drops it (and any temp file). The two halves of ``atomic_write``, so that a
    worker can hand the commit (which waits on the disk) to a thread while it decodes the next
    image.
    """

    def __init__(self, final: str, write: Callable[[IO[bytes]], None]) -> None:
        self.final = final
        self.tmp = temp_name(final, os.getpid())
        self._out: _Spool | None = _Spool(self.tmp)
        try:
            write(self._out)  # type: ignore[arg-type]
            self.size = self._out.size
        except BaseException:
            self.discard()
            raise

    def commit(self, *, overwrite: bool, sync_dir: bool = True) -> int:
        """Write, fsync, publish, remove the temp name; returns the bytes written. On failure
        the temp file is removed and the error raised (``output-conflict``, or the OSError)."""
        try:
            assert self._out is not None, "committed or discarded twice"
            self._out.persist()
            self._out = None
            publish(self.tmp, self.final, overwrite=overwrite)
        except BaseException:
            self.discard()
            raise
        if not overwrite:
            self.discard()  # published as a second name (a link): the temp name goes
        # (overwrite: os.replace moved the temp name itself; nothing is left to remove)
        if sync_dir:
            fsync_dir(os.path.dirname(self.final) or ".")
        return self.size

    def sync(self) -> str:
        """Write and fsync to the temp name, leaving it for someone else to publish; its name."""
        assert self._out is not None, "committed or discarded twice"
        try:
            self._out.persist()
        except BaseException:
            self.discard()
            raise
        self._out = None
        return self.tmp

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def atomic_write(final: str, write: Callable[[IO[bytes]], None], *, overwrite: bool,
                 sync_dir: bool = True) -> int:
    """Write ``final`` atomically through ``write(fileobj)``; returns the bytes written.

    With ``overwrite`` False an existing file is never replaced: if it holds the very same bytes
    (a task that ran twice), that is success; otherwise ``output-conflict``. The data is always
    fsynced before the rename; ``sync_dir`` False leaves the folder's fsync (which makes the new
    name durable) to the caller, who may do it once for many files.
    """
    return Staged(final, write).commit(overwrite=overwrite, sync_dir=sync_dir)


def publish(tmp: str, final: str, *, overwrite: bool) -> None:
    """Give ``tmp`` the name ``final`` in one step; ``tmp`` is left for the caller to remove."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # fails with EEXIST instead of replacing
    except FileExistsError:
        if filecmp.cmp(tmp, final, shallow=False):
            return
        raise RejectedInput("output-conflict",
                            f"{final} exists with different content; not overwritten") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # File systems without hard links (FAT, some FUSE): check, then rename over nothing.
        if os.path.lexists(final):
            if filecmp.cmp(tmp, final, shallow=False):
                return
            raise RejectedInput("output-conflict",
                                f"{final} exists with different content; not overwritten") from None
        os.replace(tmp, final)


def remove_temps(paths: list[str], pid: int) -> list[str]:
    """Remove the temp files process ``pid`` may have left for these final paths."""
    removed = []
    for final in paths:
        tmp = temp_name(final, pid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
            removed.append(tmp)
    return removed


def output_name(stem: str, suffix: str, ext: str, counter: int = 0) -> str:
    """``{stem}_{suffix}{ext}``, with ``_{counter}`` before the extension when counter > 1."""
    base = f"{stem}_{suffix}" if suffix else stem
    return f"{base}_{counter}{ext}" if counter > 1 else f"{base}{ext}"


class NameAllocator:
    """Hands out output paths so that no two inputs of one run share one; with
    ``avoid_existing`` (the ``rename`` policy) a path taken on disk is skipped too."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def claim(self, folder: str, stem: str, suffix: str, ext: str, *,
              avoid_existing: bool) -> str:
        counter = 1
        while True:
            path = os.path.normpath(os.path.join(folder, output_name(stem, suffix, ext, counter)))
            key = os.path.normcase(path)
            if key not in self._taken and not (avoid_existing and os.path.lexists(path)):
                self._taken.add(key)
                return path
            counter += 1


def walk_images(root: str) -> Iterator[str]:
    """Every regular file under ``root``, sorted, skipping dot-files and not following links."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(TEMP_SUFFIX):
                continue
            yield os.path.join(dirpath, name)
