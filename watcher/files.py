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
import os
import re
import socket
from collections.abc import Callable, Iterator
from typing import IO

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


class Staged:
    """An output written in full to its temp name, not yet durable nor published.

    ``commit`` fsyncs it and publishes it under its final name; ``discard`` removes it. The two
    halves of ``atomic_write``, so that a worker can hand the commit (which waits on the disk)
    to a thread while it decodes the next image.
    """

    def __init__(self, final: str, write: Callable[[IO[bytes]], None]) -> None:
        self.final = final
        folder = os.path.dirname(final) or "."
        os.makedirs(folder, exist_ok=True)
        self.tmp = temp_name(final, os.getpid())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)  # left by an earlier process with a recycled pid
        self._file: IO[bytes] | None = open(self.tmp, "xb")  # noqa: SIM115 - closed by commit
        try:
            write(self._file)
            self._file.flush()
            self.size = self._file.tell()
        except BaseException:
            self.discard()
            raise

    def commit(self, *, overwrite: bool, sync_dir: bool = True) -> int:
        """fsync, publish, remove the temp name; returns the bytes written. On failure the temp
        file is removed and the error raised (``output-conflict``, or the OSError)."""
        try:
            assert self._file is not None, "committed or discarded twice"
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            publish(self.tmp, self.final, overwrite=overwrite)
        finally:
            self.discard()
        if sync_dir:
            fsync_dir(os.path.dirname(self.final) or ".")
        return self.size

    def sync(self) -> str:
        """fsync and close, leaving the temp file for someone else to publish; its name."""
        assert self._file is not None, "committed or discarded twice"
        try:
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self.discard()
            raise
        self._file = None
        return self.tmp

    def discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
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
