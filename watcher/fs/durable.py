"""Durability: making what was written to files, and new names in folders, survive a crash.

Several outputs written together are made durable together (``sync_files``): on Linux one
``syncfs`` per file system instead of one fsync each, which writes the shared metadata blocks once
and flushes the disk's cache once for the lot.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Callable, Sequence


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
