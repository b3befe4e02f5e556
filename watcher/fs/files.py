"""Output files' names and leftovers: temp names and who owns one, name limits, sweeping.

An output is written under a hidden temp name in its destination folder before it is published
(``staging``): ``.{name}.{host}.{pid}.watcher-tmp``. The name tells which process of which host
wrote it, so that what a killed writer left can be found and removed (``remove_temps``,
``remove_dead_temps``) and a live writer's file is never touched. Also: the name and path length
limits outputs are planned within, removing a published output without following a link, and
walking an input folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence

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


def walk_images(root: str, on_error: Callable[[OSError], object] | None = None
                ) -> Iterator[str]:
    """Every regular file under ``root``, sorted, skipping dot-files and not following links.
    ``on_error(exc)``: a folder that cannot be listed (permission denied), ``exc.filename``
    naming it; without it such a folder is skipped."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(TEMP_SUFFIX):
                continue
            yield os.path.join(dirpath, name)
