"""Claims: taking a file out of the inbox, and what a claim's record says about it.

Claiming is one ``rename`` into the work folder (same file system), so it is atomic: it dedupes
events, leaves a crashed daemon's files in one known place, and lets several daemons share an
inbox (only one rename of a name succeeds). Each claim has a short name of its own in the work
folder and a record beside it (where it came from, which outputs it may write, how often it
failed for reasons not its own): a restart finds what an earlier run left (``leftover``) and
what it settled without saying so (``settled``, ``fate_of``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watcher.fs import safefs
from watcher.fs.files import NAME_MAX, TEMP_SUFFIX, short_name
from watcher.fs.staging import atomic_write
from watcher.watch.moves import SIDECAR, iso

if TYPE_CHECKING:
    from watcher.watch.lifecycle import Folders

RECORD_SUFFIX = ".claim"  # a claim's record, beside it in the work folder


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
    digest: str = ""  # SHA-256 of its bytes when it was submitted ("" not known: duplicates)
    config: str = ""  # the hash of the pipeline configuration it was submitted under
    seen: tuple[int, int, int] | None = None  # (size, mtime, ctime) when last handed over

    @property
    def record(self) -> str:
        return self.work_path + RECORD_SUFFIX


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
                    doc.get("claimed_at") == iso(c.claimed_at):
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


def identity(path: str) -> tuple[int, int, int] | None:
    """(size, mtime, ctime) of a claimed file, to tell whether it changed while processed."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns
