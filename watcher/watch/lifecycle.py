"""An input's life in watch mode: claimed out of the inbox, then archived, deleted, kept, or
quarantined with a sidecar saying why, exactly once.

Claiming is one ``rename`` into the work folder (same file system), so it is atomic: it dedupes
events, leaves a crashed daemon's files in one known place, and lets several daemons share an
inbox (only one rename of a name succeeds). Moves out of the work folder never overwrite: a name
taken in the archive or quarantine gets a counter (``photo_2.jpg``). Moves work across file
systems (copy, fsync, publish, then unlink). Folders are fsynced so a fate survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from watcher.errors import ConfigError
from watcher.fs import safefs
from watcher.fs.durable import fsync_dir
from watcher.fs.files import (
    HOST,
    NAME_MAX,
    TEMP_SUFFIX,
    pid_alive,
    short_name,
    temp_name,
    temp_owner,
)
from watcher.fs.staging import atomic_write
from watcher.ops.health import HEARTBEAT

SIDECAR = ".error.json"
RECORD_SUFFIX = ".claim"  # a claim's record, beside it in the work folder
# A temp file from another host (a shared folder) untouched this long is abandoned.
STALE_TEMP_AGE = 3600.0


@dataclass
class Claim:
    """A file this daemon took out of the inbox; ``rel`` is where it was, below the inbox.

    In the work folder the file has a short name of its own (``token``), whatever the length
    of ``rel``, and a record beside it (``<token>.claim``, see ``save_record``) saying where it
    came from and which outputs it may write: a restart knows both.
    """

    seq: int
    rel: str
    work_path: str
    detected_at: float = field(default_factory=time.time)
    claimed_at: float = field(default_factory=time.time)
    transient_failures: int = 0
    retry_at: float = 0.0  # monotonic time of the next try after a transient failure
    first_failure_at: float = 0.0  # wall time of the first transient failure (0: none)
    last_error: str = ""  # the last transient failure's reason and error
    # failures after which other inputs succeeded: evidence that the fault is this input's
    isolated_failures: int = 0
    successes_seen: int = 0  # the daemon's success count at its last failure
    # (pipeline, path) of the outputs planned for it, recorded: after a crash, re-processing
    # may replace these and no others
    outputs: tuple[tuple[str, str], ...] = ()
    token: str = ""  # its name in the work folder ("" for a claim of the old layout)
    submitted_at: float = 0.0  # monotonic time it was last handed to the engine
    adopted: bool = False  # taken over from a stale instance: its outputs are not surely ours
    seen: tuple[int, int, int] | None = None  # (size, mtime, ctime) when last handed over

    @property
    def record(self) -> str:
        return self.work_path + RECORD_SUFFIX


class Folders:
    """The daemon's folders, checked once at start."""

    def __init__(self, folders: Mapping[str, str], work_root: str | None = None) -> None:
        self.inbox = os.path.abspath(folders["inbox"])
        self.output = os.path.abspath(folders["output"])
        self.archive = os.path.abspath(folders["archive"])
        self.quarantine = os.path.abspath(folders["quarantine"])
        self.work = os.path.abspath(folders["work"])
        # With several instances on one inbox: the folder holding each one's work folder.
        self.work_root = os.path.abspath(work_root) if work_root else None

    def named(self) -> dict[str, str]:
        return {"inbox": self.inbox, "output": self.output, "archive": self.archive,
                "quarantine": self.quarantine, "work": self.work}

    def check(self, *, create: bool = True) -> None:
        """Refuse folders inside the inbox (an endless loop) and a work folder on another file
        system than the inbox (a claim must be one atomic rename)."""
        named = self.named()
        check_layout(named, self.work_root)
        for key, path in named.items():
            if create:
                try:
                    os.makedirs(path, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(f"watch.{key}", f"cannot create {path}: {exc.strerror}") \
                        from exc
            if not os.path.isdir(path):
                raise ConfigError(f"watch.{key}", f"{path} is not a folder")
        if os.stat(self.work).st_dev != os.stat(self.inbox).st_dev:
            raise ConfigError("watch.work", f"{self.work} is on another file system than the "
                              f"inbox {self.inbox}; claims must be atomic renames")
        self._probe_rename()

    def _probe_rename(self) -> None:
        """Claims are renames from inbox to work: try one. Two bind mounts of one file system
        (a container volume each, or systemd ReadWritePaths= listing them separately) share
        st_dev, yet rename(2) between them fails with EXDEV."""
        probe = os.path.join(self.inbox, f".watcher-probe-{os.getpid()}")
        dest = os.path.join(self.work, os.path.basename(probe))
        try:
            with open(probe, "w"):
                pass
        except OSError as exc:
            raise ConfigError("watch.inbox", f"cannot write in {self.inbox}: {exc.strerror}") \
                from exc
        try:
            os.rename(probe, dest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(probe)
            if exc.errno == errno.EXDEV:
                raise ConfigError("watch.work", f"{self.work} and the inbox {self.inbox} are "
                                  "different mounts (bind mounts or volumes), so a file cannot "
                                  "be renamed from one to the other; put both under one mount "
                                  "(one volume, or one ReadWritePaths= entry)") from exc
            raise ConfigError("watch.work", f"cannot move a file from {self.inbox} to "
                              f"{self.work}: {exc.strerror}") from exc
        os.unlink(dest)


# What goes wrong when two folders overlap, by pair (either order).
_OVERLAP = {
    frozenset(("inbox", "output")): "outputs would be picked up as new inputs, endlessly",
    frozenset(("inbox", "archive")): "archived files would be picked up again, endlessly",
    frozenset(("inbox", "quarantine")): "quarantined files would be picked up again",
    frozenset(("inbox", "work")): "claimed files would be seen as new arrivals",
    frozenset(("output", "archive")): "an archived original could replace an output of the "
                                      "same name, or the other way round",
    frozenset(("output", "work")): "outputs would be taken for claims at the next start",
    frozenset(("output", "quarantine")): "a quarantined file could take an output's name",
    frozenset(("archive", "quarantine")): "requeue --all would push archived files back",
    frozenset(("archive", "work")): "archived files would be taken for claims at the next "
                                    "start",
    frozenset(("quarantine", "work")): "quarantined files would be taken for claims at the "
                                       "next start",
}


def check_layout(named: Mapping[str, str], work_root: str | None = None) -> None:
    """Refuse a folder layout that loses data: the five folders must be pairwise distinct and
    none inside another (compared after resolving links). With instances, the folder holding
    every instance's work folder obeys the same rule towards the other four."""
    items = list(named.items())
    if work_root is not None:
        items.append(("work", work_root))  # the instances' parent: one more "work" folder
    for i, (k1, p1) in enumerate(items):
        for k2, p2 in items[i + 1:]:
            if k1 == k2:
                continue
            if _within(p1, p2) or _within(p2, p1):
                how = "the same folder" if os.path.realpath(p1) == os.path.realpath(p2) else (
                    f"{p1} is inside the {k2} {p2}" if _within(p1, p2)
                    else f"{p2} is inside the {k1} {p1}")
                key = k2 if k1 == "inbox" else k1
                raise ConfigError(f"watch.{key}", f"watch.{k1} ({p1}) and watch.{k2} ({p2}) "
                                  f"overlap ({how}): {_OVERLAP[frozenset((k1, k2))]}; give "
                                  "each its own folder")


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# --- claiming ------------------------------------------------------------------------------------

class NotClaimed(Exception):  # noqa: N818 - not an error: someone else has it, or it is gone
    """The file could not be claimed: gone (another daemon took it) or its name is busy."""


_TOKENS = itertools.count(1)


def new_token(rel: str) -> str:
    """A claim's name in the work folder: unique (time, pid, counter), short (the readable
    start of the input's name), so work paths never approach NAME_MAX or PATH_MAX."""
    base = os.path.basename(rel)
    head = f"{time.time_ns():x}-{os.getpid()}-{next(_TOKENS)}-"
    return head + short_name(base, NAME_MAX - len(head) - len(RECORD_SUFFIX) - 60)


def claim(folders: Folders, path: str, seq: int, detected_at: float) -> Claim:
    """Rename ``path`` (below the inbox) into the work folder under a token name (links and
    special files included: rename never follows or opens them). Its record is written, and
    made durable, before the rename: a crash leaves either the input in the inbox (and a
    stale record, removed at the next start) or the claim with its record.

    The rename is relative to directory descriptors (``safefs``): every folder on the way from
    the inbox is opened with O_NOFOLLOW, so a folder swapped for a link (its contents are
    outside the inbox) is NotClaimed, never touched; any path length works."""
    rel = os.path.relpath(path, folders.inbox) if os.path.isabs(path) else path
    for folder in folders.named().values():
        safefs.root(folder)  # registered: moves below these roots never follow a link
    inbox_fd, work_fd = safefs.root(folders.inbox), safefs.root(folders.work)
    token = new_token(rel)
    c = Claim(seq, rel, os.path.join(folders.work, token), detected_at=detected_at,
              token=token)
    try:
        parent = safefs.open_dir(inbox_fd, os.path.dirname(rel))
    except FileNotFoundError as exc:
        raise NotClaimed(f"{rel}: its folder is gone") from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise NotClaimed(f"{rel}: a folder on its path is now a symbolic link or not a "
                             "folder; what it leads to is outside the inbox and was not "
                             "touched") from exc
        raise
    try:
        name = os.path.basename(rel)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise NotClaimed(f"{rel} is gone (claimed elsewhere)") from exc
        if stat.S_ISDIR(st.st_mode):  # a file replaced by a folder: scans walk into it
            raise NotClaimed(f"{rel} is now a folder; its files are taken one by one")
        save_record(c)
        try:
            os.rename(name, token, src_dir_fd=parent, dst_dir_fd=work_fd)
        except FileNotFoundError as exc:
            drop_record(c)
            raise NotClaimed(f"{rel} is gone (claimed elsewhere)") from exc
        except BaseException:
            drop_record(c)
            raise
        os.fsync(work_fd)
        os.fsync(parent)
    finally:
        os.close(parent)
    return c


def save_record(c: Claim) -> None:
    """Write (or rewrite) the claim's record durably: where it came from, when, which outputs
    it may write, how often it failed for reasons not its own."""
    if not c.token:
        return  # a claim left by an older version: no record, nothing to update
    doc = {"rel": c.rel, "detected_at": c.detected_at, "claimed_at": c.claimed_at,
           "outputs": [list(o) for o in c.outputs],
           "transient_failures": c.transient_failures,
           "first_failure_at": c.first_failure_at, "last_error": c.last_error}
    atomic_write(c.record, lambda f: f.write(json.dumps(doc).encode()), overwrite=True,
                 sync_dir=False)


def drop_record(c: Claim) -> None:
    """The claim is settled and its fate logged: remove its record.

    The fate's move (``archive``, ``keep``, ``delete``, ``quarantine``) leaves the record; the
    daemon removes it after the fate's log line. A daemon killed between the two leaves a
    record without its file, which the next start reads (``settled``) to write the line that
    was never written."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(c.record)


def _read_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("rel"), str) else None


def leftover(folders: Folders, seq: Callable[[], int], *,
             keep_settled: bool = False) -> Iterator[Claim]:
    """The claims an earlier run left in the work folder, with what their records say. A
    record whose file is gone (a claim settled, or never made) is removed, or with
    ``keep_settled`` left for ``settled``."""
    work = folders.work
    try:
        names = sorted(os.listdir(work))
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(work, name)
        if name.endswith(RECORD_SUFFIX):
            if not keep_settled and not os.path.lexists(path[: -len(RECORD_SUFFIX)]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            continue
        if name.endswith(TEMP_SUFFIX) or name.startswith("."):
            continue
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except FileNotFoundError:
            continue
        if is_dir:  # the layout of older versions: work/<rel>, no records
            for rel, p in _legacy_claims(path, work):
                yield Claim(seq(), rel, p)
            continue
        doc = _read_record(path + RECORD_SUFFIX)
        if doc is None:  # an older version's claim at the top, or a record lost
            yield Claim(seq(), name, path)
            continue
        yield Claim(seq(), doc["rel"], path, detected_at=float(doc.get("detected_at", 0)),
                    claimed_at=float(doc.get("claimed_at", 0)),
                    transient_failures=int(doc.get("transient_failures", 0)),
                    first_failure_at=float(doc.get("first_failure_at", 0)),
                    last_error=str(doc.get("last_error", "")),
                    outputs=_pairs(doc.get("outputs")), token=name)


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        return ()
    return tuple((str(v[0]), str(v[1])) for v in value
                 if isinstance(v, list) and len(v) == 2)


def _legacy_claims(folder: str, work: str) -> Iterator[tuple[str, str]]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            if name.endswith((TEMP_SUFFIX, RECORD_SUFFIX)) or name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            yield os.path.relpath(path, work), path


def settled(folders: Folders) -> Iterator[Claim]:
    """Claims whose file is gone from the work folder but whose record is still there: a
    daemon killed after carrying out the fate and before logging it (or before the file was
    renamed in, when the claim was being made). The caller logs what happened and drops the
    record (see ``fate_of``)."""
    try:
        names = sorted(os.listdir(folders.work))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(RECORD_SUFFIX):
            continue
        path = os.path.join(folders.work, name)
        work_path = path[: -len(RECORD_SUFFIX)]
        if os.path.lexists(work_path):
            continue
        doc = _read_record(path)
        if doc is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        yield Claim(0, doc["rel"], work_path, detected_at=float(doc.get("detected_at", 0)),
                    claimed_at=float(doc.get("claimed_at", 0)),
                    outputs=_pairs(doc.get("outputs")), token=os.path.basename(work_path))


def fate_of(folders: Folders, c: Claim) -> tuple[str, dict[str, Any]]:
    """What became of a ``settled`` claim, from what is on disk: ("quarantined", its sidecar)
    when a sidecar in the quarantine names this claim; ("processed", {}) when every output its
    record planned exists; ("unclaimed", {}) when it never got as far as planning outputs (the
    claim was being made: the file is still in the inbox, or was never claimed); else
    ("vanished", {})."""
    rel_dir, name = os.path.split(c.rel)
    stem = os.path.splitext(name)[0]
    try:
        qfd = safefs.open_dir(safefs.root(folders.quarantine), rel_dir)
    except OSError:
        qfd = -1
    try:
        for entry in sorted(os.listdir(qfd)) if qfd >= 0 else []:
            if not (entry.endswith(SIDECAR) and entry.startswith(stem[:40])):
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=qfd)
                with os.fdopen(fd, "rb") as f:
                    doc = json.loads(f.read(1 << 20))
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and doc.get("input") == c.rel and \
                    doc.get("claimed_at") == _iso(c.claimed_at):
                return "quarantined", doc
    finally:
        if qfd >= 0:
            os.close(qfd)
    if not c.outputs:
        return "unclaimed", {}
    if all(os.path.lexists(path) for _, path in c.outputs):
        return "processed", {}
    return "vanished", {}


def leftover_claims(folders: Folders) -> Iterator[tuple[str, str]]:
    """(rel, work path) of files left in the work folder by an earlier run."""
    for c in leftover(folders, lambda: 0):
        yield c.rel, c.work_path


# --- moving out -----------------------------------------------------------------------------

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
                   **info, "detected_at": _iso(c.detected_at),
                   "claimed_at": _iso(c.claimed_at), "quarantined_at": _iso(time.time()),
                   "host": socket.gethostname(), "daemon_pid": os.getpid(),
                   "retry": f"move it back into the inbox, or: watcher requeue {dest}"}
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


def requeue(folders: Folders, paths: list[str] | None = None) -> list[tuple[str, str]]:
    """Move quarantined files back into the inbox (all of them when ``paths`` is None), removing
    their sidecars. Returns (from, to) pairs."""
    if paths is None:
        paths = [os.path.join(d, n) for d, _, names in os.walk(folders.quarantine)
                 for n in sorted(names) if not n.endswith(SIDECAR) and not n.endswith(TEMP_SUFFIX)]
    moved = []
    for given in paths:
        path = os.path.abspath(given)
        if not _within(path, folders.quarantine) or path.endswith(SIDECAR):
            raise ConfigError(path, f"not a quarantined file (below {folders.quarantine})")
        if not os.path.lexists(path):
            raise ConfigError(path, "no such file")
        rel_dir, name = os.path.split(os.path.relpath(path, folders.quarantine))
        same_fs = os.stat(os.path.dirname(path)).st_dev == os.stat(folders.inbox).st_dev
        dest = move_no_clobber(path, os.path.join(folders.inbox, rel_dir), name,
                               rename=same_fs)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + SIDECAR)
        moved.append((path, dest))
    return moved


def _stale_instances(folders: Folders, max_age: float, only: list[str] | None,
                     now: float) -> Iterator[Folders]:
    """The other instances' folders whose claims may be taken: named in ``only``, else those
    whose heartbeat (or, without one, work folder) is older than ``max_age`` seconds."""
    if folders.work_root is None or not os.path.isdir(folders.work_root):
        return
    for entry in sorted(os.scandir(folders.work_root), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False) or entry.path == folders.work:
            continue
        if only is not None:
            if entry.name not in only:
                continue
        else:
            beat = os.path.join(entry.path, HEARTBEAT)
            try:
                last = os.lstat(beat).st_mtime
            except FileNotFoundError:
                last = entry.stat(follow_symlinks=False).st_mtime
            if now - last < max_age:
                continue
        yield Folders({**folders.named(), "work": entry.path})


def recover_claims(folders: Folders, max_age: float, only: list[str] | None = None,
                   now: float | None = None) -> list[tuple[str, str]]:
    """Move the claims of other daemon instances back into the inbox (see
    ``_stale_instances``). Never this instance's own. Returns (from, to) pairs."""
    now = time.time() if now is None else now
    moved = []
    for other in _stale_instances(folders, max_age, only, now):
        for c in leftover(other, lambda: 0):
            rel_dir, name = os.path.split(c.rel)
            try:
                dest = move_no_clobber(c.work_path, os.path.join(folders.inbox, rel_dir), name,
                                       rename=True)
            except FileNotFoundError:
                continue  # another instance recovered it first
            drop_record(c)
            moved.append((c.work_path, dest))
    return moved


def adopt_claims(folders: Folders, max_age: float, seq: Callable[[], int],
                 now: float | None = None) -> list[tuple[str, Claim]]:
    """Take the claims of stale instances into this instance's work folder, records and all
    (their planned outputs too: re-processed, an input publishes the same names again, and an
    identical output already there counts as written). Returns (from, claim) pairs.

    Order: the record is copied first, then the file renamed, then the old record removed; a
    crash between leaves a record without its file (dropped at start) or the claim still in
    the other folder (taken again)."""
    now = time.time() if now is None else now
    taken = []
    for other in _stale_instances(folders, max_age, None, now):
        for old in leftover(other, lambda: 0):
            token = old.token or new_token(old.rel)
            c = Claim(seq(), old.rel, os.path.join(folders.work, token),
                      detected_at=old.detected_at, claimed_at=old.claimed_at,
                      outputs=old.outputs, token=token, adopted=True)
            save_record(c)
            try:
                os.rename(old.work_path, c.work_path)
            except FileNotFoundError:
                drop_record(c)  # another instance took it first
                continue
            drop_record(old)
            fsync_dir(folders.work)
            fsync_dir(other.work)
            taken.append((old.work_path, c))
        # what its dead processes left half-written there (a claim record, say)
        remove_stale_temps(other, roots=(other.work,))
    return taken


def remove_stale_temps(folders: Folders, max_age: float = STALE_TEMP_AGE,
                       roots: tuple[str, ...] | None = None,
                       stale_mine: Callable[[int, str], bool] | None = None) -> list[str]:
    """Temp files nobody will finish: written by a process of this host that no longer runs (a
    killed daemon's workers), or, from any host (another daemon or a cluster worker on a shared
    folder), untouched for ``max_age`` seconds. ``roots``: where to look (default: the output,
    archive, quarantine and work folders). ``stale_mine(pid, path)``: the rule for this host's
    temp files instead of "its pid is not alive" (the daemon's run lock, ``runlock.stale``)."""
    removed = []
    now = time.time()
    if roots is None:
        roots = (folders.output, folders.archive, folders.quarantine, folders.work)
    if stale_mine is None:
        def stale_mine(pid: int, path: str) -> bool:
            return pid != os.getpid() and not pid_alive(pid)
    for root in roots:
        try:
            top = safefs.root(root)
        except OSError:
            continue
        # Walked and removed by descriptor, never through a link: a folder swapped for a link
        # in the middle of the sweep fails its open (ELOOP) and is skipped.
        for e in safefs.walk(top):
            if e.is_dir:
                continue
            owner = temp_owner(e.name)
            if owner is None and not (e.name.startswith(".") and e.name.endswith(TEMP_SUFFIX)):
                continue
            path = os.path.join(root, e.rel)
            try:
                with safefs.parent(top, e.rel) as (fd, name):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        continue  # ours are regular files: a link or a FIFO so named is not
                    if owner is not None and owner[0] == HOST:
                        if not stale_mine(owner[1], path):
                            continue
                    elif now - st.st_mtime < max_age:
                        continue  # another host's (or no owner named): judged by its age
                    os.unlink(name, dir_fd=fd)
            except OSError:
                continue  # gone, or its folder is now a link: not ours to touch
            removed.append(path)
    return removed


def _iso(t: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-12-03T06:12:12.504Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
