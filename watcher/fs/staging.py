"""Staging and publishing an output: atomic writes, no-clobber publishing.

An output is encoded into memory (or its hidden temp file in its destination folder, once it is
large), written, flushed and made durable (``durable``), then published under its final name in
one step (``os.replace`` to overwrite, ``os.link`` to refuse a different existing file), and the
folder is fsynced. A reader never sees a partial file, and a kill -9 leaves at most a hidden temp
file that ``files.temp_name`` lets its owner find and remove.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from collections.abc import Callable
from typing import IO, Any

from watcher.errors import RejectedInput
from watcher.fs import safefs
from watcher.fs.durable import sync_files
from watcher.fs.files import temp_name

SPOOL_LIMIT = 16 * 1024 * 1024  # bytes of an encoded output kept in memory before its temp file


class _Spool:
    """Where an output is encoded: memory, until it grows past SPOOL_LIMIT, then its temp file.

    Encoding into memory keeps the file system out of the worker's main thread: creating a file
    waits on the journal while another thread's fsync commits it (ext4, XFS), so the fsync
    that should overlap the next image's decode would stall it instead. The committer thread
    creates the temp file, writes, fsyncs and publishes it.
    """

    def __init__(self, folder: Callable[[], int], name: str, final: str = "") -> None:
        self._folder = folder  # the descriptor of the folder the temp file goes in
        self.name = name
        self.final = final  # the output it becomes: what an error names
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
        dirfd = self._folder()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.name, flags, 0o666, dir_fd=dirfd)
            except FileExistsError:  # left by an earlier process with a recycled pid
                os.unlink(self.name, dir_fd=dirfd)
                fd = os.open(self.name, flags, 0o666, dir_fd=dirfd)
        except OSError as exc:  # name the output, not its hidden temp file (same errno, type)
            if not self.final:
                raise
            raise OSError(exc.errno, exc.strerror, self.final) from exc
        return os.fdopen(fd, "wb")

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

    def stage(self) -> int:
        """The whole output in its temp file, flushed, still open; its descriptor."""
        if self._mem is not None:
            self._spill()
        f = self._fp
        f.flush()
        return f.fileno()

    def persist(self) -> None:
        """The whole output in its temp file, fsynced and closed."""
        os.fsync(self.stage())
        self.finish()

    def finish(self) -> None:
        """Close the temp file (its data already durable)."""
        f = self._fp
        self._file = None
        f.close()

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
    image. ``write_temp``, ``sync_files`` and ``publish`` are ``commit`` in three steps, for
    committing many outputs together.

    Every step is relative to a descriptor of the output's folder, opened once. With ``root``
    (the output folder the run owns) that folder is reached from ``root`` without following a
    link (``safefs``), so a link planted below it never leads an output outside.
    """

    def __init__(self, final: str, write: Callable[[IO[bytes]], None], root: str = "") -> None:
        self.final = final
        self.tmp = temp_name(final, os.getpid())
        self.root = root
        self._dirfd = -1
        self._out: _Spool | None = _Spool(self._folder, os.path.basename(self.tmp), final)
        try:
            write(self._out)  # type: ignore[arg-type]
            self.size = self._out.size
        except BaseException:
            self.discard()
            raise

    def _folder(self) -> int:
        if self._dirfd < 0:
            self._dirfd = output_folder(self.final, self.root)
        return self._dirfd

    def _close_folder(self) -> None:
        if self._dirfd >= 0:
            fd, self._dirfd = self._dirfd, -1
            os.close(fd)

    def commit(self, *, overwrite: bool, sync_dir: bool = True) -> int:
        """Write, fsync, publish, remove the temp name; returns the bytes written. On failure
        the temp file is removed and the error raised (``output-conflict``, or the OSError)."""
        fd = self.write_temp()
        error = sync_files([fd])[0]
        if error is not None:
            self.discard()
            raise error
        self.publish(overwrite=overwrite, sync_dir=sync_dir)
        return self.size

    def write_temp(self) -> int:
        """Write the whole output to its temp file and leave it open, not yet durable; its
        descriptor. On failure the temp file is removed and the OSError raised."""
        assert self._out is not None, "committed or discarded twice"
        try:
            return self._out.stage()
        except BaseException:
            self.discard()
            raise

    def publish(self, *, overwrite: bool, sync_dir: bool = False) -> int:
        """Publish the written temp file, whose data the caller made durable; returns the bytes
        written. On failure the temp file is removed and the error raised. ``sync_dir``: fsync
        the folder too (the new name durable)."""
        try:
            assert self._out is not None, "committed or discarded twice"
            self._out.finish()
            self._out = None
            dirfd = self._folder()
            tmp = os.path.basename(self.tmp)
            publish_at(dirfd, tmp, os.path.basename(self.final), overwrite=overwrite,
                       shown=self.final)
            if not overwrite:  # published as a second name (a link): the temp name goes
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dirfd)
            # (overwrite: os.replace moved the temp name itself; nothing is left to remove)
            if sync_dir:
                os.fsync(dirfd)
        except BaseException:
            self.discard()
            raise
        self._close_folder()
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
        self._close_folder()
        return self.tmp

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._dirfd >= 0:
            # Cleanup never raises: on a read-only file system unlink says EROFS even for a
            # temp file that could not be created; one that could not be removed is a dead
            # writer's temp for the next run (remove_dead_temps).
            with contextlib.suppress(OSError):
                os.unlink(os.path.basename(self.tmp), dir_fd=self._dirfd)
            self._close_folder()


def output_folder(final: str, root: str = "") -> int:
    """A new descriptor of the folder ``final`` goes in, made if missing. Below ``root`` no
    link is followed: a link (or a file) where a folder of the path should be is
    ``unsafe-output``, and so is a ``final`` outside ``root``."""
    head = os.path.dirname(final) or "."
    if not root:
        try:
            return os.open(head, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:  # the output folder does not exist yet
            os.makedirs(head, exist_ok=True)
            return os.open(head, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    rel = os.path.relpath(head, root)
    try:
        try:
            top = safefs.root(root)
        except FileNotFoundError:
            os.makedirs(root, exist_ok=True)
            top = safefs.root(root)
        return safefs.makedirs(top, rel)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise RejectedInput("unsafe-output", f"{head}: a link or a file stands where "
                                f"this output's folder should be below {root} (or the "
                                "folder is outside it); outputs are never written through a "
                                "link") from None
        raise


def atomic_write(final: str, write: Callable[[IO[bytes]], None], *, overwrite: bool,
                 sync_dir: bool = True, root: str = "") -> int:
    """Write ``final`` atomically through ``write(fileobj)``; returns the bytes written.

    With ``overwrite`` False an existing file is never replaced: if it holds the very same bytes
    (a task that ran twice), that is success; otherwise ``output-conflict``. The data is always
    fsynced before the rename; ``sync_dir`` False leaves the folder's fsync (which makes the new
    name durable) to the caller, who may do it once for many files. ``root``: see ``Staged``.
    """
    return Staged(final, write, root).commit(overwrite=overwrite, sync_dir=sync_dir)


def _same_at(dirfd: int, a: str, b: str) -> bool:
    """Whether the entries ``a`` and ``b`` of one folder are regular files with equal bytes
    (neither followed if it is a link)."""
    fds: list[int] = []
    try:
        for name in (a, b):
            fds.append(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                               dir_fd=dirfd))
        sa, sb = os.fstat(fds[0]), os.fstat(fds[1])
        if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or \
                sa.st_size != sb.st_size:
            return False
        while True:
            x, y = os.read(fds[0], 1 << 20), os.read(fds[1], 1 << 20)
            if x != y:
                return False
            if not x:
                return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)


def publish_at(dirfd: int, tmp: str, final: str, *, overwrite: bool, shown: str = "") -> None:
    """Give the entry ``tmp`` of folder ``dirfd`` the name ``final`` in one step; ``tmp`` is left
    for the caller to remove. Without ``overwrite`` an existing ``final`` is never replaced
    (nor followed, if it is a link): the same bytes are success, else ``output-conflict``."""
    shown = shown or final
    if overwrite:
        os.replace(tmp, final, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        return
    try:
        os.link(tmp, final, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
    except FileExistsError:
        if _same_at(dirfd, tmp, final):
            return
        raise RejectedInput("output-conflict",
                            f"{shown} exists with different content; not overwritten") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # File systems without hard links (FAT, some FUSE): check, then rename over nothing.
        try:
            os.stat(final, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            os.replace(tmp, final, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            return
        if _same_at(dirfd, tmp, final):
            return
        raise RejectedInput("output-conflict",
                            f"{shown} exists with different content; not overwritten") from None


def publish(tmp: str, final: str, *, overwrite: bool, root: str = "") -> None:
    """Give ``tmp`` the name ``final`` (its folder's) in one step; ``tmp`` is left for the
    caller to remove. ``root``: see ``Staged``."""
    if os.path.dirname(os.path.abspath(tmp)) != os.path.dirname(os.path.abspath(final)):
        raise ValueError(f"{tmp} and {final} are not in one folder")
    dirfd = output_folder(final, root)
    try:
        publish_at(dirfd, os.path.basename(tmp), os.path.basename(final), overwrite=overwrite,
                   shown=final)
    finally:
        os.close(dirfd)
