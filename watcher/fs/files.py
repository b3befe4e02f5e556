"""File safety: atomic writes, no-clobber publishing, and collision-free output names.

An output is written to a hidden temp name in its destination folder, flushed and made durable,
then published under its final name in one step (``os.replace`` to overwrite, ``os.link`` to
refuse a different existing file), and the folder is fsynced. A reader never sees a partial file,
and a kill -9 leaves at most a hidden temp file that ``temp_name`` lets its owner find and remove.

Several outputs written together are made durable together (``sync_files``): on Linux one
``syncfs`` per file system instead of one fsync each, which writes the shared metadata blocks once
and flushes the disk's cache once for the lot.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from watcher.errors import RejectedInput
from watcher.fs import safefs

TEMP_SUFFIX = ".watcher-tmp"
NAME_MAX = 255  # bytes in one file name (Linux file systems, most others)
PATH_MAX = 4096  # bytes in a path handed to the kernel (Linux)


def short_name(name: str, limit: int = NAME_MAX) -> str:
    """``name`` if it fits in ``limit`` bytes (UTF-8, as the file system counts), else its
    readable start, a hash of the whole name and its extension: stable, so the same long
    name always shortens the same way, and distinct names stay distinct."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    stem, ext = os.path.splitext(name)
    ext_b = os.fsencode(ext)
    if len(ext_b) > 16:
        stem, ext_b = name, b""
    digest = hashlib.sha256(raw).hexdigest()[:12]
    keep = max(0, limit - len(ext_b) - len(digest) - 1)
    head = os.fsencode(stem)[:keep]
    head = head.decode("utf-8", "ignore").encode()  # never cut a character in half
    return os.fsdecode(head + b"~" + digest.encode() + ext_b)
# This machine, as temp names carry it: folders may be shared by several machines, and a pid
# means something only on the host it came from.
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def temp_name(final: str, pid: int, host: str = HOST) -> str:
    """The temp file process ``pid`` of ``host`` writes before publishing ``final``:
    ``.{name}.{host}.{pid}.watcher-tmp``, within NAME_MAX: a long ``name`` is shortened
    (``short_name``), the host and pid are always kept whole (``temp_owner`` reads them)."""
    head, tail = os.path.split(final)
    owner = f".{host}.{pid}{TEMP_SUFFIX}"
    tail = short_name(tail, max(16, NAME_MAX - 1 - len(os.fsencode(owner))))
    return os.path.join(head, f".{tail}{owner}")


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


def running(pid: int) -> bool:
    """Whether process ``pid`` of this host runs and is not a zombie (a dead worker whose
    parent has not reaped it writes nothing more)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc: alive, as far as anyone can tell


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs`` where it reports write-back errors (Linux 5.8 and later), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError, ValueError):
        return None
    if release < (5, 8):  # older kernels' syncfs did not return write-back errors
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


# syncfs writes back every dirty page of the file system, other programs' too: with more than
# this much unwritten data in the page cache besides the group's own, each file gets its fsync.
OTHERS_DIRTY_LIMIT = 64 * 1024 * 1024


def unwritten_bytes() -> int:
    """Dirty and under-write-back page-cache bytes of the whole machine (Linux), else 0."""
    try:
        with open("/proc/meminfo", "rb") as f:
            text = f.read()
    except OSError:
        return 0
    total = 0
    for key in (b"\nDirty:", b"\nWriteback:"):
        at = text.find(key)
        if at >= 0:
            total += int(text[at + len(key):].split(None, 1)[0]) * 1024
    return total


def sync_files(fds: Sequence[int], size: int = 0) -> list[OSError | None]:
    """Make what was written to these open files (``size`` bytes in all) durable; per file,
    None or the error that kept it from being.

    Two or more files on one file system get one ``syncfs`` (called on the file opened first,
    so that it reports any write-back error since then), unless other programs have more than
    OTHERS_DIRTY_LIMIT unwritten (syncfs would write theirs too); where it fails, or where there
    is no ``syncfs``, each file gets its own fsync, which tells which of them failed.
    """
    errors: list[OSError | None] = [None] * len(fds)
    group = _SYNCFS is not None and len(fds) > 1 and \
        unwritten_bytes() <= size + OTHERS_DIRTY_LIMIT
    by_dev: dict[int, list[int]] = {}
    for i, fd in enumerate(fds):
        by_dev.setdefault(os.fstat(fd).st_dev if group else i, []).append(i)
    for idx in by_dev.values():
        if len(idx) > 1 and _SYNCFS is not None and _SYNCFS(fds[idx[0]]) == 0:
            continue
        for i in idx:
            try:
                os.fsync(fds[i])
            except OSError as exc:
                errors[i] = exc
    return errors


SPOOL_LIMIT = 16 * 1024 * 1024  # bytes of an encoded output kept in memory before its temp file


class _Spool:
    """Where an output is encoded: memory, until it grows past SPOOL_LIMIT, then its temp file.

    Encoding into memory keeps the file system out of the worker's main thread: creating a file
    waits on the journal while another thread's fsync commits it (ext4, XFS), so the fsync
    that should overlap the next image's decode would stall it instead. The committer thread
    creates the temp file, writes, fsyncs and publishes it.
    """

    def __init__(self, folder: Callable[[], int], name: str) -> None:
        self._folder = folder  # the descriptor of the folder the temp file goes in
        self.name = name
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
            fd = os.open(self.name, flags, 0o666, dir_fd=dirfd)
        except FileExistsError:  # left by an earlier process with a recycled pid
            os.unlink(self.name, dir_fd=dirfd)
            fd = os.open(self.name, flags, 0o666, dir_fd=dirfd)
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
        self._out: _Spool | None = _Spool(self._folder, os.path.basename(self.tmp))
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
            with contextlib.suppress(FileNotFoundError):
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


def remove_temps(paths: Sequence[str], pid: int, root: str = "") -> list[str]:
    """Remove the temp files process ``pid`` may have left for these final paths (below
    ``root`` reached without following a link: see ``Staged``)."""
    removed = []
    for final in paths:
        tmp = temp_name(final, pid)
        head = os.path.dirname(final) or "."
        try:
            if root:
                dirfd = safefs.open_dir(safefs.root(root), os.path.relpath(head, root))
            else:
                dirfd = os.open(head, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # no folder (or a link where it was): no temp file of ours in it
        try:
            os.unlink(os.path.basename(tmp), dir_fd=dirfd)
            removed.append(tmp)
        except FileNotFoundError:
            pass
        finally:
            os.close(dirfd)
    return removed


def remove_dead_temps(finals: Sequence[str], root: str = "",
                      gone: Callable[[str, int], bool] | None = None) -> list[str]:
    """Remove the temp files that processes no longer running left for these outputs (the
    workers of a killed daemon whose claims another instance adopted, a killed batch's); one
    listing per folder, by descriptor below ``root``. ``gone(host, pid)`` says whether that
    writer is gone (default: a process of this host that no longer runs; another host's is
    never judged gone). A live process's temp file is never touched."""
    if gone is None:
        def gone(host: str, pid: int) -> bool:
            return host == HOST and not running(pid)
    by_folder: dict[str, set[str]] = {}
    for final in finals:
        by_folder.setdefault(os.path.dirname(final) or ".", set()).add(final)
    removed = []
    for head, wanted in by_folder.items():
        try:
            if root:
                dirfd = safefs.open_dir(safefs.root(root), os.path.relpath(head, root))
            else:
                dirfd = os.open(head, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in os.listdir(dirfd):
                owner = temp_owner(name)
                if owner is None or not gone(*owner):
                    continue
                for final in wanted:
                    if name == os.path.basename(temp_name(final, owner[1], owner[0])):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=dirfd)
                            removed.append(os.path.join(head, name))
                        break
        finally:
            os.close(dirfd)
    return removed


def remove_output(final: str, root: str) -> bool:
    """Remove a published output below ``root``, reached without following a link (a folder
    of its path swapped for a link leaves it alone); True if it was removed."""
    head = os.path.dirname(final) or "."
    try:
        dirfd = safefs.open_dir(safefs.root(root), os.path.relpath(head, root))
    except OSError:
        return False
    try:
        os.unlink(os.path.basename(final), dir_fd=dirfd)
    except OSError:
        return False
    finally:
        os.close(dirfd)
    return True


def walk_images(root: str) -> Iterator[str]:
    """Every regular file under ``root``, sorted, skipping dot-files and not following links."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(TEMP_SUFFIX):
                continue
            yield os.path.join(dirpath, name)
