"""Unit tests for watch-mode intake and lifecycle: the stability tracker (fake clock and stat),
ignore rules, mountinfo, folder checks, claims, moves, quarantine sidecars, requeue."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import make_image
from watcher import config
from watcher.errors import ConfigError
from watcher.fs import files, safefs
from watcher.watch import claiming, lifecycle, moves, observer, sources


class FakeFS:
    def __init__(self) -> None:
        self.now = 100.0
        self.files: dict[str, tuple[int, int, int]] = {}  # path -> (mode, size, mtime)

    def clock(self) -> float:
        return self.now

    def stat(self, path: str) -> os.stat_result:
        if path not in self.files:
            raise FileNotFoundError(path)
        mode, size, mtime = self.files[path]
        return os.stat_result((mode, 0, 0, 1, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, 0, 0, mtime, 0))

    def write(self, path: str, size: int) -> None:
        self.files[path] = (stat.S_IFREG | 0o644, size, int(self.now * 1e9))


@pytest.fixture
def fs() -> FakeFS:
    return FakeFS()


def tracker(fs: FakeFS, settle: float = 1.0, close_events: bool = True) -> sources.Stability:
    return sources.Stability(settle, fs.clock, fs.stat, close_events=close_events)


def test_closed_file_is_ready_at_once(fs: FakeFS) -> None:
    t = tracker(fs)
    fs.write("/in/a.jpg", 10)
    t.hint("/in/a.jpg", sources.CREATED)
    assert t.due() == []
    t.hint("/in/a.jpg", sources.CLOSED)
    assert t.due() == ["/in/a.jpg"]


def test_moved_in_file_is_ready_at_once(fs: FakeFS) -> None:
    t = tracker(fs)
    fs.write("/in/a.jpg", 10)
    t.hint("/in/a.jpg", sources.MOVED)
    assert t.due() == ["/in/a.jpg"]


def test_file_being_written_waits_for_close_through_long_pauses(fs: FakeFS) -> None:
    t = tracker(fs, settle=1.0)
    fs.write("/in/a.jpg", 100)
    t.hint("/in/a.jpg", sources.CREATED)
    t.hint("/in/a.jpg", sources.MODIFIED)
    for _ in range(5):  # the writer pauses 5 s between chunks, far past the settle time
        fs.now += 5
        assert t.due() == []
    fs.write("/in/a.jpg", 200)
    t.hint("/in/a.jpg", sources.CLOSED)
    assert t.due() == ["/in/a.jpg"]


def test_writing_file_taken_without_close_only_when_stale(fs: FakeFS) -> None:
    t = tracker(fs, settle=1.0)
    fs.write("/in/a.jpg", 100)
    t.hint("/in/a.jpg", sources.MODIFIED)  # a writer that never closes (crashed, say)
    t.due()
    fs.now += t.stale - 1
    assert t.due() == []
    fs.now += 2
    assert t.due() == ["/in/a.jpg"]


def test_created_without_a_write_settles(fs: FakeFS) -> None:
    t = tracker(fs, settle=1.0)
    fs.write("/in/link.jpg", 100)
    t.hint("/in/link.jpg", sources.CREATED)  # a hard link made in place: no write, no close
    t.due()
    fs.now += 1.1
    assert t.due() == ["/in/link.jpg"]


def test_scanned_file_ready_after_settle_unchanged(fs: FakeFS) -> None:
    t = tracker(fs, settle=1.0)
    fs.write("/in/a.jpg", 10)
    t.hint("/in/a.jpg", sources.SCAN)
    assert t.due() == []
    fs.now += 0.6
    fs.write("/in/a.jpg", 20)  # still growing
    assert t.due() == []
    fs.now += 0.6
    assert t.due() == []  # 0.6 s since the change
    fs.now += 0.5
    assert t.due() == ["/in/a.jpg"]


def test_polling_has_no_close_events_settle_decides(fs: FakeFS) -> None:
    t = tracker(fs, settle=1.0, close_events=False)
    fs.write("/in/a.jpg", 10)
    t.hint("/in/a.jpg", sources.CREATED)
    t.due()
    fs.now += 1.1
    assert t.due() == ["/in/a.jpg"]


def test_empty_scanned_file_waits_long(fs: FakeFS) -> None:
    t = tracker(fs, settle=1.0)
    fs.write("/in/empty.jpg", 0)
    t.hint("/in/empty.jpg", sources.SCAN)
    t.due()
    fs.now += 5
    assert t.due() == []


def test_an_empty_file_closed_still_waits_long_and_its_refill_is_taken(fs: FakeFS) -> None:
    t = tracker(fs, settle=1.0)
    fs.write("/in/e.jpg", 0)
    t.hint("/in/e.jpg", sources.CLOSED)  # closed empty: a writer may come back to append
    assert t.due() == []
    fs.now += 0.3
    fs.write("/in/e.jpg", 500)
    t.hint("/in/e.jpg", sources.MODIFIED)
    t.hint("/in/e.jpg", sources.CLOSED)
    assert t.due() == ["/in/e.jpg"]  # filled and closed: taken at once
    t.forget("/in/e.jpg")
    fs.write("/in/f.jpg", 0)
    t.hint("/in/f.jpg", sources.CLOSED)
    t.due()
    fs.now += t.stale + 0.1
    assert t.due() == ["/in/f.jpg"]  # left empty: taken (and quarantined) after the long wait


def test_vanished_file_is_forgotten_and_special_files_are_ready(fs: FakeFS) -> None:
    t = tracker(fs)
    t.hint("/in/gone.jpg", sources.SCAN)
    assert t.due() == [] and "/in/gone.jpg" not in t
    fs.files["/in/link.jpg"] = (stat.S_IFLNK | 0o777, 11, 0)
    t.hint("/in/link.jpg", sources.CREATED)
    assert t.due() == ["/in/link.jpg"]


def test_due_is_oldest_first(fs: FakeFS) -> None:
    t = tracker(fs)
    for i, name in enumerate(["c", "a", "b"]):
        fs.now += 1
        fs.write(f"/in/{name}", 1 + i)
        t.hint(f"/in/{name}", sources.MOVED)
    assert t.due() == ["/in/c", "/in/a", "/in/b"]


@pytest.mark.parametrize(("rel", "skip"), [
    ("a.jpg", False), ("sub/a.jpg", False), (".hidden.jpg", True), ("sub/.git/x.jpg", True),
    ("a.jpg.part", True), ("a.tmp", True), ("x.crdownload", True), ("a.swp", True),
    ("~$doc.jpg", True), (".~lock.a.jpg#", True), ("a.jpg~", True), ("partial.jpg", False),
])
def test_ignored_names(rel: str, skip: bool) -> None:
    assert sources.ignored(rel, config.DEFAULT_IGNORE) is skip


MOUNTINFO = """22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/share rw,relatime shared:5 - nfs4 server:/export rw,vers=4.2
31 22 0:41 / /mnt/smb\\040drive rw - cifs //srv/x rw
32 22 0:42 / /mnt/fuse rw - fuse.sshfs user@h: rw
33 30 0:43 / /mnt/share/local rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(("path", "kind", "poll"), [
    ("/home/me/inbox", "ext4", False), ("/mnt/share/inbox", "nfs4", True),
    ("/mnt/smb drive/in", "cifs", True), ("/mnt/fuse/in", "fuse.sshfs", True),
    ("/mnt/share/local/in", "tmpfs", False), ("/mnt/shared", "ext4", False),
])
def test_fs_type_from_mountinfo(path: str, kind: str, poll: bool) -> None:
    got = observer.fs_type(path, MOUNTINFO)
    assert got == kind and observer.wants_polling(got) is poll


def test_fs_type_of_a_real_folder(tmp_path: Path) -> None:
    assert observer.fs_type(str(tmp_path)) not in ("", "unknown")


def folders(tmp_path: Path, **over: str) -> lifecycle.Folders:
    names = {k: str(tmp_path / k) for k in ("inbox", "output", "archive", "quarantine", "work")}
    names.update({k: str(tmp_path / v) for k, v in over.items()})
    return lifecycle.Folders(names)


@pytest.mark.parametrize("key", ["output", "archive", "quarantine", "work"])
def test_folders_inside_the_inbox_are_refused(tmp_path: Path, key: str) -> None:
    f = folders(tmp_path, **{key: f"inbox/{key}"})
    with pytest.raises(ConfigError) as e:
        f.check()
    assert e.value.where == f"watch.{key}" and "inside the inbox" in e.value.message


def test_work_on_another_file_system_is_refused(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test folder")
    work = other / f"watcher-test-work-{os.getpid()}"
    try:
        f = lifecycle.Folders({**folders(tmp_path).named(), "work": str(work)})
        with pytest.raises(ConfigError, match="another file system"):
            f.check()
    finally:
        if work.exists():
            work.rmdir()


def test_claim_archive_and_name_collisions(tmp_path: Path) -> None:
    f = folders(tmp_path)
    f.check()
    src = make_image(Path(f.inbox) / "sub" / "a.png")
    c = claiming.claim(f, str(src), 1, 0.0)
    assert c.rel == "sub/a.png" and Path(c.work_path).parent == Path(f.work)
    assert Path(c.work_path).name.endswith("-a.png") and Path(c.record).is_file()
    assert not src.exists()
    assert [(x.rel, x.work_path) for x in claiming.leftover(f, lambda: 9)] == [
        ("sub/a.png", c.work_path)]
    with pytest.raises(claiming.NotClaimed):
        claiming.claim(f, str(src), 2, 0.0)  # gone: someone else has it
    (Path(f.archive) / "sub").mkdir(parents=True)
    (Path(f.archive) / "sub" / "a.png").write_bytes(b"an older one")
    dest = moves.archive(f, c)
    assert Path(c.record).exists()  # until the fate's line is written (the daemon drops it)
    assert [x.rel for x in claiming.settled(f)] == ["sub/a.png"]
    claiming.drop_record(c)
    assert not Path(c.record).exists()
    assert Path(dest) == Path(f.archive) / "sub" / "a_2.png"
    assert (Path(f.archive) / "sub" / "a.png").read_bytes() == b"an older one"


def test_quarantine_writes_sidecar_and_requeue_undoes_it(tmp_path: Path) -> None:
    f = folders(tmp_path)
    f.check()
    (Path(f.inbox) / "bad.jpg").write_text("nope")
    c = claiming.claim(f, str(Path(f.inbox) / "bad.jpg"), 1, 0.0)
    dest = moves.quarantine(f, c, {"reason": "not-an-image", "error": "x", "attempts": 1})
    side = json.loads(Path(dest + moves.SIDECAR).read_text())
    assert side["reason"] == "not-an-image" and side["input"] == "bad.jpg"
    assert {"detected_at", "claimed_at", "quarantined_at", "host", "attempts"} <= set(side)
    moved = lifecycle.requeue(f.inbox, f.quarantine)
    assert moved == [(dest, str(Path(f.inbox) / "bad.jpg"))]
    assert not Path(dest + moves.SIDECAR).exists()
    with pytest.raises(ConfigError, match="not a quarantined file"):
        lifecycle.requeue(f.inbox, f.quarantine, [str(Path(f.inbox) / "bad.jpg")])


def test_stale_temps_of_dead_processes_are_removed(tmp_path: Path) -> None:
    f = folders(tmp_path)
    f.check()
    host = files.HOST
    dead = Path(f.output) / f".x.jpg.{host}.999999999.watcher-tmp"
    live = Path(f.output) / f".y.jpg.{host}.{os.getppid()}.watcher-tmp"
    # Another machine's temps (a shared folder): its pids mean nothing here; only age counts.
    other_new = Path(f.output) / ".z.jpg.otherhost.999999999.watcher-tmp"
    other_old = Path(f.output) / ".w.jpg.otherhost.999999999.watcher-tmp"
    for p in (dead, live, other_new, other_old):
        p.write_bytes(b"partial")
    old = time.time() - lifecycle.STALE_TEMP_AGE - 10
    os.utime(other_old, (old, old))
    assert sorted(lifecycle.remove_stale_temps(f)) == sorted([str(dead), str(other_old)])
    assert live.exists() and other_new.exists()


def test_watch_table_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "watcher.toml"
    cfg.parent.mkdir()
    cfg.write_text("[watch]\ninbox = 'in'\noutput = '/abs/out'\nsettle = 0.5\n"
                   "on_success = 'delete'\nignore = ['*.x']\n")
    w = config.load(cfg).watch
    assert w.inbox == str(tmp_path / "etc" / "in") and w.output == "/abs/out"
    assert (w.settle, w.on_success, w.ignore) == (0.5, "delete", ("*.x",))


@pytest.mark.parametrize(("snippet", "where"), [
    ("[watch]\nsettle = 'soon'", "watch.settle"),
    ("[watch]\non_success = 'shred'", "watch.on_success"),
    ("[watch]\nobserver = 'fanotify'", "watch.observer"),
    ("[watch]\ninbx = 'x'", "watch.inbx"),
])
def test_bad_watch_settings_name_the_key(tmp_path: Path, snippet: str, where: str) -> None:
    (tmp_path / "w.toml").write_text(snippet)
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "w.toml")
    assert e.value.where.endswith(where)


def test_environment_overrides_file() -> None:
    s = config.from_environment(config.load(None), {
        "WATCHER_INBOX": "/data/in", "WATCHER_SETTLE": "0.5", "WATCHER_WORKERS": "3",
        "WATCHER_RECURSIVE": "false", "WATCHER_PIPELINES": "web, thumbnail",
        "WATCHER_MAX_FILE_SIZE": "10 MB", "WATCHER_IGNORE": "*.a,*.b"})
    assert (s.watch.inbox, s.watch.settle, s.watch.recursive) == ("/data/in", 0.5, False)
    assert s.engine.workers == 3 and s.use == ("web", "thumbnail")
    assert s.limits.max_file_size == 10_000_000 and s.watch.ignore == ("*.a", "*.b")


@pytest.mark.parametrize(("env", "where"), [
    ({"WATCHER_SETTLE": "soon"}, "WATCHER_SETTLE"), ({"WATCHER_WORKERS": "0"}, "WATCHER_WORKERS"),
    ({"WATCHER_WORKERS": "many"}, "WATCHER_WORKERS"),
    ({"WATCHER_ON_SUCCESS": "shred"}, "WATCHER_ON_SUCCESS"),
    ({"WATCHER_PIPELINES": "nope"}, "WATCHER_PIPELINES"),
    ({"WATCHER_RECURSIVE": "maybe"}, "WATCHER_RECURSIVE"),
])
def test_bad_environment_names_the_variable(env: dict[str, str], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_environment(config.load(None), env)
    assert e.value.where == where


# --- the observer, for real -----------------------------------------------------------------

def test_observer_reports_close_and_move_and_restarts_after_its_thread_dies(
        tmp_path: Path) -> None:
    import threading
    import time

    woke = threading.Event()
    obs = observer.InboxObserver(str(tmp_path), kind="inotify", recursive=True,
                                poll_interval=0.1, wake=woke.set)
    obs.start()
    try:
        def events_for(name: str) -> set[str]:
            deadline = time.monotonic() + 10
            seen: set[str] = set()
            while time.monotonic() < deadline:
                seen |= {k for k, p in obs.drain() if p.endswith(name)}
                if sources.CLOSED in seen or sources.MOVED in seen:
                    return seen
                time.sleep(0.02)
            pytest.fail(f"no close/move event for {name}: {seen}")

        make_image(tmp_path / "a.png")
        assert sources.CLOSED in events_for("a.png") and woke.is_set()
        outside = make_image(tmp_path.parent / f"{tmp_path.name}-staging.png")
        os.rename(outside, tmp_path / "moved.png")
        assert sources.MOVED in events_for("moved.png")

        obs._observer.stop()  # the thread dies underneath us (a network share gone, a bug)
        obs._observer.join(5)
        assert not obs.healthy()
        obs.restart()
        assert obs.healthy() and obs.restarts == 1
        make_image(tmp_path / "b.png")
        assert sources.CLOSED in events_for("b.png")
    finally:
        obs.stop()


NO_INOTIFY = """
import json, sys
from watcher import log
from watcher.watch import observer
log.configure("test", "json", "info")
obs = observer.InboxObserver(sys.argv[1], kind="inotify", recursive=False, poll_interval=0.1,
                             wake=lambda: None)
obs.start()
print(json.dumps({"kind": obs.kind, "healthy": obs.healthy()}))
obs.stop()
"""


def test_no_inotify_left_falls_back_to_polling_with_the_sysctl_to_raise(tmp_path: Path) -> None:
    """Real exhaustion, isolated: in a new user namespace the inotify instance limit is its own
    (/proc/sys/user/max_inotify_instances); set to 0 there, inotify_init fails with EMFILE."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT, json_lines

    if not shutil.which("unshare"):
        pytest.skip("needs unshare (util-linux)")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                           capture_output=True, check=False, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces unavailable: {probe.stderr.decode()[:200]}")
    cmd = ("echo 0 > /proc/sys/user/max_inotify_instances && "
           f'exec "{sys.executable}" -c "$0" "$1"')
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", cmd, NO_INOTIFY,
                           str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"kind": "polling", "healthy": True}
    logged = [e for e in json_lines(proc.stderr) if e["event"] == "observer.inotify_unavailable"]
    assert logged and "max_user_instances" in logged[0]["fix"]
    assert logged[0]["fallback"] == "polling"


# --- hostile trees: scans by descriptor, moves that fit ------------------------------------------

def test_scan_yields_inbox_relative_names_at_any_depth(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "a" / "b").mkdir(parents=True)
    (inbox / "top.jpg").write_bytes(b"t")
    (inbox / "a" / "b" / "low.jpg").write_bytes(b"l")
    (inbox / "a" / ".dot.jpg").write_bytes(b"d")
    (inbox / "a" / "x.tmp").write_bytes(b"x")
    deep = "/".join(["n" * 200] * 22)  # a 4,400-byte path below the inbox
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with safefs.parent(fd, deep + "/deep.jpg", create=True) as (pfd, name):
            out = os.open(name, os.O_WRONLY | os.O_CREAT, dir_fd=pfd)
            os.write(out, b"deep")
            os.close(out)
    finally:
        os.close(fd)
    got = list(sources.scan(str(inbox), recursive=True, patterns=("*.tmp",)))
    assert sorted(got) == sorted(["top.jpg", "a/b/low.jpg", deep + "/deep.jpg"])
    assert list(sources.scan(str(inbox), recursive=False, patterns=())) == ["top.jpg"]
    assert sorted(sources.scan(str(inbox), recursive=True, patterns=(), under="a")) == \
        ["a/b/low.jpg", "a/x.tmp"]
    assert sorted(sources.scan(str(inbox), recursive=True, patterns=(), exclude=["a"])) == \
        sorted([deep + "/deep.jpg", "top.jpg"])
    # a tracker looking through the inbox descriptor sees the deep file
    root = safefs.root(str(inbox))
    t = sources.Stability(0.0)
    t.use_stat(lambda p: safefs.lstat(root, os.path.relpath(p, inbox)))
    t.hint(str(inbox / deep / "deep.jpg"), sources.SCAN)
    assert t.due() == []  # first look: size and mtime noted
    assert t.due() == [str(inbox / deep / "deep.jpg")]  # unchanged since: settled


def test_the_observer_walks_never_follow_a_folder_swapped_for_a_link(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "real" / "sub").mkdir(parents=True)
    (inbox / "real" / "sub" / "f.jpg").write_bytes(b"f")
    (tmp_path / "private" / "inner").mkdir(parents=True)
    (tmp_path / "private" / "secret.jpg").write_bytes(b"s")
    os.symlink(tmp_path / "private", inbox / "sw")
    safefs.root(str(inbox))
    real = [(r, sorted(d), sorted(f)) for r, d, f in os.walk(inbox / "real")]
    ours = [(r, sorted(d), sorted(f)) for r, d, f in observer._walk_no_links(str(inbox / "real"))]
    assert ours == [(str(r), d, f) for r, d, f in real]
    assert list(observer._walk_no_links(os.fsencode(inbox / "sw"))) == []
    assert list(os.walk(inbox / "sw"))  # what watchdog's own walk would have listed
    assert stat.S_ISLNK(observer._lstat_below(str(inbox / "sw")).st_mode)
    with pytest.raises(NotADirectoryError):
        observer._listdir_below(str(inbox / "sw"))
    assert [e.name for e in observer._listdir_below(str(inbox / "real"))] == ["sub"]


def test_counter_names_fit_with_their_sidecar_and_moves_cross_file_systems(
        tmp_path: Path) -> None:
    long = "q" * 251 + ".jpg"
    q = tmp_path / "q"
    q.mkdir()
    (q / long).write_bytes(b"taken")
    names = set()
    for i in range(3):
        src = tmp_path / f"src{i}"
        src.write_bytes(b"%d" % i)
        dest = moves.move_no_clobber(str(src), str(q), long)
        base = os.path.basename(dest)
        assert len(os.fsencode(base + moves.SIDECAR)) <= files.NAME_MAX
        names.add(base)
    assert len(names) == 3 and (q / long).read_bytes() == b"taken"
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to move across")
    across = Path(tempfile.mkdtemp(dir=other))
    try:
        src = tmp_path / "photo"
        src.write_bytes(b"bytes")
        os.chmod(src, 0o640)
        link = tmp_path / "link"
        os.symlink("/nowhere", link)
        dest = moves.move_no_clobber(str(src), str(across / "a" / "b"), "x" * 250 + ".jpg")
        assert Path(dest).read_bytes() == b"bytes" and not src.exists()
        assert stat.S_IMODE(os.stat(dest).st_mode) == 0o640
        dest = moves.move_no_clobber(str(link), str(across), "l")
        assert os.readlink(dest) == "/nowhere" and not os.path.lexists(link)
        hard = tmp_path / "hard"
        hard.write_bytes(b"someone else's")
        os.link(hard, tmp_path / "other-name")
        with pytest.raises(OSError, match="hard links"):
            moves.move_no_clobber(str(hard), str(across), "h")
        assert hard.exists() and not (across / "h").exists()
        assert not [p for p in across.rglob("*") if p.name.endswith(files.TEMP_SUFFIX)]
    finally:
        shutil.rmtree(across)


def test_a_tracked_file_whose_folder_became_a_link_is_forgotten(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sw").mkdir(parents=True)
    (inbox / "sw" / "a.jpg").write_bytes(b"a")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "a.jpg").write_bytes(b"p")
    fd = safefs.root(str(inbox))
    t = sources.Stability(0.0, stat_fn=lambda p: safefs.lstat(fd, os.path.relpath(p, inbox)))
    t.hint(str(inbox / "sw" / "a.jpg"), sources.CLOSED)
    (inbox / "sw").rename(tmp_path / "aside")
    os.symlink(tmp_path / "private", inbox / "sw")
    assert t.due() == [] and len(t) == 0
