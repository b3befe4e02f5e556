"""An input's life in watch mode: claimed out of the inbox, then archived, deleted, kept, or
quarantined with a sidecar saying why, exactly once.

``claiming`` takes files out of the inbox and keeps each claim's record, ``moves`` carries out
their fates, ``layout`` says which folder layouts are safe. Here: the daemon's ``Folders``
(checked once at start), and the moves between folders an operator or another instance asks
for: ``requeue`` (quarantine to inbox), ``recover_claims`` and ``adopt_claims`` (the claims of an
instance that is gone), ``remove_stale_temps`` (what killed processes left half-written).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping

from watcher.errors import ConfigError
from watcher.fs import safefs
from watcher.fs.durable import fsync_dir
from watcher.fs.files import HOST, TEMP_SUFFIX, pid_alive, temp_owner
from watcher.fs.folders import ensure_folder
from watcher.ops.health import HEARTBEAT
from watcher.watch.claiming import Claim, drop_record, leftover, new_token, save_record
from watcher.watch.layout import check_layout
from watcher.watch.moves import SIDECAR, move_no_clobber
from watcher.watch.quarantine import is_sidecar, quarantined_names

# A temp file from another host (a shared folder) untouched this long is abandoned.
STALE_TEMP_AGE = 3600.0


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
                ensure_folder(path, f"watch.{key}")
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


def requeue(inbox: str, quarantine: str, paths: list[str] | None = None,
            errors: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Move quarantined files back into the inbox (all of them when ``paths`` is None), removing
    their sidecars. Returns (from, to) pairs.

    Both folders are walked and written by descriptor (``safefs`` roots): a link anywhere below
    them (a sub-folder of the inbox swapped for one) is never followed, and a quarantined link
    moves back as the link it is. A file that cannot be moved raises ``ConfigError``; with
    ``errors``, it is recorded there instead and the others are moved."""
    inbox, quarantine = os.path.abspath(inbox), os.path.abspath(quarantine)
    safefs.root(inbox)
    qfd = safefs.root(quarantine)
    if paths is None:
        paths = [os.path.join(quarantine, n) for n in quarantined_names(qfd)]
    moved = []
    for given in paths:
        path = os.path.abspath(given)
        try:
            moved.append((path, _requeue_one(path, inbox, quarantine)))
        except (ConfigError, OSError) as exc:
            if errors is None:
                raise
            errors.append((path, exc.strerror if isinstance(exc, OSError) and exc.strerror
                           else str(exc)))
    return moved


def _requeue_one(path: str, inbox: str, quarantine: str) -> str:
    # the folder resolved, not the name: a quarantined link is itself the file
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    rel = os.path.relpath(real, os.path.realpath(quarantine))
    if rel.startswith("..") or rel == "." or is_sidecar(real):
        raise ConfigError(path, f"not a quarantined file (below {quarantine})")
    if not os.path.lexists(path):
        raise ConfigError(path, "no such file")
    rel_dir, name = os.path.split(rel)
    same_fs = os.lstat(os.path.dirname(real)).st_dev == os.stat(inbox).st_dev
    dest = move_no_clobber(os.path.join(quarantine, rel), os.path.join(inbox, rel_dir), name,
                           rename=same_fs)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(quarantine, rel) + SIDECAR)
    return dest


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
