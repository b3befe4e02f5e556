"""File access relative to directory descriptors, never following a symbolic link below a root.

A *root* (the inbox, the work folder, ...) is opened once (``root``), following whatever links
its configured path holds: that is the operator's choice. Below it every path component is
opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to its parent's descriptor (or, where the
kernel has it, in one ``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``), so a folder
swapped for a link at any moment fails with ELOOP/ENOTDIR instead of leading outside. Every
call is relative to a descriptor, so paths longer than PATH_MAX work (a name is at most
NAME_MAX: the kernel checks that).

Errors are plain ``OSError``: ELOOP or ENOTDIR for a link (or a file) where a folder was
expected, EXDEV for a path that would climb out (``..``), ENOENT for a vanished one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# For a look at a file without reading it: no controlling tty, never block on a FIFO.
O_PROBE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY

_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (5.6 and later)
_PATH_MAX = 4096


def parts(rel: str) -> list[str]:
    """The components of a relative path (empty and ``.`` ones dropped); ``..`` is refused."""
    out = [p for p in rel.split("/") if p and p != "."]
    if ".." in out or rel.startswith("/"):
        raise OSError(errno.EXDEV, f"{rel!r} would leave its root")
    return out


# --- openat2 where the kernel has it -------------------------------------------------------------

class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _load_syscall() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn  # type: ignore[no-any-return]


_syscall = _load_syscall()
_openat2_ok = _syscall is not None and os.uname().sysname == "Linux"


def _openat2(dirfd: int, rel: str, flags: int) -> int | None:
    """``openat2`` beneath ``dirfd`` without symlinks; None where it is not available."""
    global _openat2_ok  # learnt once: the kernel (or a seccomp filter) lacks it
    if not _openat2_ok or _syscall is None:
        return None
    raw = os.fsencode(rel)
    if len(raw) >= _PATH_MAX:
        return None  # the component walk has no length limit
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    for _ in range(3):
        fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(raw),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EAGAIN:  # a rename raced the lookup: try again, then walk
            continue
        if err in (errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EINVAL):
            _openat2_ok = False
            return None
        raise OSError(err, os.strerror(err), rel)
    return None


def _walk_open(dirfd: int, names: list[str], *, create: bool = False,
               mode: int = 0o777) -> int:
    """Open each of ``names`` in turn below ``dirfd`` (none may be a link), creating missing
    folders when asked; a new descriptor of the last."""
    fd = os.open(".", O_DIR, dir_fd=dirfd)
    try:
        for name in names:
            try:
                nfd = os.open(name, O_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=fd)
                nfd = os.open(name, O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(dirfd: int, rel: str) -> int:
    """A new descriptor of the folder ``rel`` below ``dirfd``, no component a link."""
    names = parts(rel)
    if names:
        fd = _openat2(dirfd, "/".join(names), O_DIR)
        if fd is not None:
            return fd
    return _walk_open(dirfd, names)


def makedirs(dirfd: int, rel: str, mode: int = 0o777) -> int:
    """Like ``open_dir``, creating missing folders (``mkdirat``); a new descriptor."""
    return _walk_open(dirfd, parts(rel), create=True, mode=mode)


@contextlib.contextmanager
def parent(dirfd: int, rel: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
    """(descriptor of the folder holding ``rel``, its last name), for ``*at`` calls."""
    names = parts(rel)
    if not names:
        raise OSError(errno.EINVAL, "an empty path names no entry")
    head = "/".join(names[:-1])
    if not head:
        yield dirfd, names[-1]
        return
    fd = makedirs(dirfd, head) if create else open_dir(dirfd, head)
    try:
        yield fd, names[-1]
    finally:
        os.close(fd)


def lstat(dirfd: int, rel: str) -> os.stat_result:
    """The entry ``rel`` itself (a link is not followed), reached without following links."""
    with parent(dirfd, rel) as (fd, name):
        return os.stat(name, dir_fd=fd, follow_symlinks=False)


def exists(dirfd: int, rel: str) -> bool:
    try:
        lstat(dirfd, rel)
    except OSError:
        return False
    return True


def open_file(dirfd: int, rel: str, flags: int = O_PROBE) -> int:
    """Open ``rel`` (``O_NOFOLLOW`` always: a link is ELOOP); a new descriptor."""
    with parent(dirfd, rel) as (fd, name):
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)


def rename(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """rename(2) from ``src`` below ``src_fd`` to ``dst`` below ``dst_fd``; the last
    components are renamed as they are (a link is moved, not followed)."""
    with parent(src_fd, src) as (sfd, sname), parent(dst_fd, dst) as (dfd, dname):
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)


# --- roots ---------------------------------------------------------------------------------------

_roots: dict[str, int] = {}
_stale: list[int] = []  # descriptors of roots made again since: kept open, never reused
_roots_lock = threading.Lock()


def root(path: str) -> int:
    """The descriptor of a root folder, opened (following its configured path) once per
    process and kept: below it nothing is followed. Raises OSError if it is not a folder.

    A root that an operator removed and made again is opened again (the old descriptor stays
    open: a caller may still hold its number); one that is just gone keeps its descriptor."""
    key = os.path.abspath(path)
    with _roots_lock:
        fd = _roots.get(key)
        if fd is not None:
            try:
                now, held = os.stat(key), os.fstat(fd)
            except OSError:
                return fd
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            _stale.append(fd)
        fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _roots[key] = fd
        return fd


def locate(path: str) -> tuple[int, str] | None:
    """(root descriptor, relative path) for an absolute ``path`` below a registered root (the
    deepest one), or None."""
    path = os.path.abspath(path)
    with _roots_lock:
        best = ""
        for key in _roots:
            if (path == key or path.startswith(key.rstrip("/") + "/")) and len(key) > len(best):
                best = key
        if not best:
            return None
        return _roots[best], os.path.relpath(path, best)


@contextlib.contextmanager
def parent_of(path: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
    """``parent`` for an absolute path: below a registered root no link is followed; elsewhere
    the path is walked from ``/`` a component at a time (links followed, as the kernel would),
    so that any length works."""
    found = locate(path)
    if found is not None and found[1] != ".":
        with parent(found[0], found[1], create=create) as pair:
            yield pair
        return
    head, name = os.path.split(os.path.abspath(path))
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for comp in [p for p in head.split("/") if p]:
            try:
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(comp, dir_fd=fd)
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd, name
    finally:
        os.close(fd)


# --- walking -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    rel: str  # below the walk's root
    name: str
    is_dir: bool


def walk(dirfd: int, under: str = "", *, recursive: bool = True,
         skip: Callable[[str], bool] = lambda rel: False,
         on_error: Callable[[str, OSError], None] = lambda rel, exc: None) -> Iterator[Entry]:
    """Every entry below ``under`` (itself below ``dirfd``), folders first reported then (with
    ``recursive``) entered, never through a link; a folder that cannot be opened or listed
    (vanished, EACCES, swapped for a link, out of descriptors) is reported to ``on_error``
    once and skipped. Never raises OSError. Holds one descriptor per level being walked."""
    base = "/".join(parts(under))
    try:
        top = open_dir(dirfd, base)
    except OSError as exc:
        on_error(base, exc)
        return
    # each level: its descriptor, its relative path, the sub-folders still to enter
    stack: list[tuple[int, str, list[str]]] = []
    try:
        stack.append((top, base, []))
        stack[-1] = (top, base, (yield from _list(top, base, skip, on_error)))
        while stack:
            fd, rel, pending = stack[-1]
            if not recursive or not pending:
                os.close(fd)
                stack.pop()
                continue
            name = pending.pop(0)
            child = f"{rel}/{name}" if rel else name
            try:
                cfd = os.open(name, O_DIR, dir_fd=fd)
            except OSError as exc:
                on_error(child, exc)
                continue
            stack.append((cfd, child, []))
            stack[-1] = (cfd, child, (yield from _list(cfd, child, skip, on_error)))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _list(fd: int, rel: str, skip: Callable[[str], bool],
          on_error: Callable[[str, OSError], None]) -> Generator[Entry, None, list[str]]:
    """Yield the entries of one open folder; return the names of its sub-folders to enter."""
    try:
        with os.scandir(fd) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        on_error(rel, exc)
        return []
    subs = []
    for e in found:
        child = f"{rel}/{e.name}" if rel else e.name
        if skip(child):
            continue
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            continue  # vanished between the listing and the look
        yield Entry(child, e.name, is_dir)
        if is_dir:
            subs.append(e.name)
    return subs


def kind(mode: int) -> str:
    """A word for the type of an entry, for messages."""
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "unknown"
