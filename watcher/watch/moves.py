"""Moves out of the work folder: archive, keep (back into the inbox), delete, quarantine with a
sidecar saying why; each carried out exactly once and durably.

Moves never overwrite: a name taken in the archive or quarantine gets a counter (``photo_2.jpg``).
Moves work across file systems (copy, fsync, publish, then unlink). Folders are fsynced so a fate
survives a power cut. Every move goes through directory descriptors (``safefs``): below the
daemon's folders no link is followed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shlex
import shutil
import socket
import stat
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from watcher.fs import safefs
from watcher.fs.durable import fsync_dir
from watcher.fs.files import NAME_MAX, short_name, temp_name

if TYPE_CHECKING:
    from watcher.watch.claiming import Claim
    from watcher.watch.lifecycle import Folders

SIDECAR = ".error.json"


def free_name(folder: str, name: str) -> str:
    """``folder/name``, or ``folder/name_N`` for the first N not taken (nor its sidecar); the
    name shortened (``short_name``) so that it and its sidecar fit in NAME_MAX."""
    try:
        with safefs.parent_of(os.path.join(folder, "x")) as (fd, _):
            return os.path.join(folder, _free_at(fd, name))
    except FileNotFoundError:  # no such folder yet: every name is free
        return os.path.join(folder, short_name(name, NAME_MAX - len(SIDECAR)))


def _free_at(fd: int, name: str) -> str:
    limit = NAME_MAX - len(SIDECAR)
    stem, ext = os.path.splitext(name)
    for n in itertools.count(1):
        candidate = short_name(name if n == 1 else f"{stem}_{n}{ext}", limit)
        if not _lexists_at(fd, candidate) and not _lexists_at(fd, candidate + SIDECAR):
            return candidate
    raise AssertionError("unreachable")


def _lexists_at(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def move_no_clobber(src: str, folder: str, name: str, *, rename: bool = False) -> str:
    """Move ``src`` into ``folder`` as ``name`` (or ``name_N``), never replacing a file; the
    name shortened to fit NAME_MAX with its sidecar.

    ``rename``: one rename(2) (same file system), for moves into a watched inbox: the observer
    then sees a move, complete at once, where a link would look like a file being created.

    Relative to directory descriptors (``safefs.parent_of``): below the daemon's folders no
    link is followed (a folder of the inbox swapped for a link is not written through), and
    paths longer than PATH_MAX work.
    """
    with safefs.parent_of(src) as (sfd, sname), \
            safefs.parent_of(os.path.join(folder, "x"), create=True) as (dfd, _):
        while True:
            dname = _free_at(dfd, name)
            try:
                if rename:
                    _rename_no_replace(sfd, sname, dfd, dname)
                else:
                    _move(sfd, sname, dfd, dname)
            except FileExistsError:
                continue  # taken between the check and the move: next counter
            os.fsync(dfd)
            os.fsync(sfd)
            return os.path.join(folder, dname)


def _rename_no_replace(sfd: int, sname: str, dfd: int, dname: str) -> None:
    if _lexists_at(dfd, dname):
        raise FileExistsError(errno.EEXIST, "taken", dname)
    os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)


def _move(sfd: int, sname: str, dfd: int, dname: str) -> None:
    """Link then unlink (never replaces); across file systems, copy then unlink."""
    try:
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            _copy_across(sfd, sname, dfd, dname)
        elif exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            _rename_no_replace(sfd, sname, dfd, dname)
            return
        else:
            raise
    os.unlink(sname, dir_fd=sfd)


def _copy_across(sfd: int, sname: str, dfd: int, dname: str) -> None:
    """Copy ``sname`` to ``dname`` on another file system: a temp name, fsync, publish
    without replacing. A link is copied as a link; a special file is refused."""
    tmp = os.path.basename(temp_name(dname, os.getpid()))
    st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(sname, dir_fd=sfd), tmp, dir_fd=dfd)
        elif not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{sname}: cannot copy a special file across file "
                                        "systems")
        elif st.st_nlink > 1:  # its data may be a file elsewhere (/etc/shadow): never read
            raise OSError(errno.EXDEV, f"{sname} has {st.st_nlink} hard links: its data is not "
                                       "copied across file systems; only a rename on one "
                                       "file system moves it")
        else:
            fin = os.open(sname, safefs.O_PROBE, dir_fd=sfd)
            try:
                fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                               os.O_CLOEXEC, 0o600, dir_fd=dfd)
                try:
                    with os.fdopen(fin, "rb", closefd=False) as r, \
                            os.fdopen(fout, "wb", closefd=False) as w:
                        shutil.copyfileobj(r, w, 1 << 20)
                    os.fchmod(fout, stat.S_IMODE(st.st_mode))
                    os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
                    os.fsync(fout)
                finally:
                    os.close(fout)
            finally:
                os.close(fin)
        os.link(tmp, dname, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)


def archive(folders: Folders, c: Claim) -> str:
    rel_dir, name = os.path.split(c.rel)
    return move_no_clobber(c.work_path, os.path.join(folders.archive, rel_dir), name)


def keep(folders: Folders, c: Claim) -> str:
    """Put a processed input back where it was (on_success = "keep")."""
    rel_dir, name = os.path.split(c.rel)
    return move_no_clobber(c.work_path, os.path.join(folders.inbox, rel_dir), name,
                           rename=True)


def delete(c: Claim) -> None:
    os.unlink(c.work_path)
    fsync_dir(os.path.dirname(c.work_path))


def quarantine(folders: Folders, c: Claim, info: Mapping[str, Any]) -> str:
    """Write ``<name>.error.json`` in the quarantine, durably, then move the input beside it.

    In that order: a crash or a full disk between the two leaves the input in the work folder
    (claimed again at the next start, or retried) and at worst a sidecar without its file,
    never a quarantined file without its reason. On failure nothing is left in the quarantine
    and the OSError is raised."""
    rel_dir, name = os.path.split(c.rel)
    folder = os.path.join(folders.quarantine, rel_dir)
    with safefs.parent_of(c.work_path) as (sfd, sname), \
            safefs.parent_of(os.path.join(folder, "x"), create=True) as (dfd, _):
        while True:
            dname = _free_at(dfd, name)
            dest = os.path.join(folder, dname)
            doc = {"input": c.rel, "quarantined_as": os.path.relpath(dest, folders.quarantine),
                   **info, "detected_at": iso(c.detected_at),
                   "claimed_at": iso(c.claimed_at), "quarantined_at": iso(time.time()),
                   "host": socket.gethostname(), "daemon_pid": os.getpid(),
                   "retry": "move it back into the inbox, or: " + requeue_command(folders, dest)}
            data = json.dumps(doc, indent=2).encode() + b"\n"
            try:
                _write_new_at(dfd, dname + SIDECAR, data)
            except FileExistsError:
                continue  # a sidecar of that name appeared meanwhile: the next counter
            try:
                _move(sfd, sname, dfd, dname)
            except FileExistsError:
                _unlink_at(dfd, dname + SIDECAR)
                continue  # taken between the check and the move: the next counter
            except BaseException:
                _unlink_at(dfd, dname + SIDECAR)
                raise
            os.fsync(dfd)
            os.fsync(sfd)
            return dest


def requeue_command(folders: Folders, path: str) -> str:
    """The command that puts ``path`` back into this daemon's inbox from any folder, whatever
    config the daemon was started with: its two folders are named."""
    return " ".join(["watcher requeue", "--inbox", shlex.quote(folders.inbox), "--quarantine",
                     shlex.quote(folders.quarantine), shlex.quote(path)])


def _write_new_at(dfd: int, name: str, data: bytes) -> None:
    """Create ``name`` in the folder ``dfd`` with ``data``, durably and atomically (a temp
    name, fsync, then a link that never replaces: FileExistsError if the name is taken)."""
    tmp = os.path.basename(temp_name(name, os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dfd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    finally:
        _unlink_at(dfd, tmp)


def _unlink_at(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def iso(t: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-12-03T06:12:12.504Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
