"""The folders watcher writes into, checked once before any work starts: each is created if
missing, must be a folder, and must take a new file (a real probe file is created and removed:
permission bits alone say nothing about a read-only mount, nor about root).

A folder that fails is a configuration error naming the setting or flag at fault (``--out:
cannot write in out: Read-only file system``), so a batch stops at once with one line and exit
2, instead of failing every input with ``write-failed``. The daemon creates its folders with
``ensure_folder`` but does not refuse an unwritable output: it keeps the inputs and retries, as
on a full disk, until the retry bound (a mount that comes back needs no restart).
"""

from __future__ import annotations

import contextlib
import os

from watcher.errors import ConfigError
from watcher.fs.files import temp_name


def ensure_folder(path: str, where: str) -> None:
    """Create ``path`` (and its parents) if missing; refuse a file or link to a file there."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(where, f"{path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        # a parent that is a file, a read-only parent, a parent not searchable
        raise ConfigError(where, f"cannot create {path}: {exc.strerror or exc}") from exc
    if not os.path.isdir(path):
        raise ConfigError(where, f"{path} is not a folder")


def check_writable(path: str, where: str) -> None:
    """Create and remove a hidden probe file in ``path``; refuse the folder if that fails."""
    probe = temp_name(os.path.join(path, "watcher-probe"), os.getpid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)  # left by a killed process that had this pid
        os.close(os.open(probe, flags, 0o600))
    except OSError as exc:
        raise ConfigError(where, f"cannot write in {path}: {exc.strerror or exc}") from exc
    try:
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(where, f"cannot remove a file from {path}: {exc.strerror or exc}") \
            from exc


def writable_folder(path: str, where: str) -> None:
    """``ensure_folder`` then ``check_writable``: a folder outputs can be written into."""
    ensure_folder(path, where)
    check_writable(path, where)
