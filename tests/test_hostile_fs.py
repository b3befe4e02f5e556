"""A hostile inbox: folders swapped for links mid-flight, hard links to files elsewhere, names of
255 bytes, trees deeper than PATH_MAX. First safefs itself, then the real daemon (a subprocess,
``tests.test_watch.Daemon``), watched from outside by strace where it is installed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image, wait_until
from tests.test_watch import Daemon, assert_no_temps, files
from watcher.errors import RejectedInput
from watcher.fs import safefs
from watcher.fs.files import HOST, NAME_MAX, PATH_MAX, remove_output
from watcher.imaging.inputfile import open_regular
from watcher.watch import claiming, lifecycle, moves, sources

FOLDERS = ("inbox", "processed", "archive", "quarantine", "work")
DEPTH, WIDTH = 50, 100  # 50 nested folders of 100-byte names: a 5,000-byte path


def deep_rel(depth: int = DEPTH) -> str:
    return "/".join(f"{i:02d}" + "d" * (WIDTH - 2) for i in range(depth))


def write_at(dirfd: int, rel: str, data: bytes) -> None:
    with safefs.parent(dirfd, rel, create=True) as (fd, name):
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(out, data)
        finally:
            os.close(out)


def image_bytes(tmp: Path, name: str = "img.jpg", seed: int = 0) -> bytes:
    return make_image(tmp / name, seed=seed).read_bytes()


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each safefs test runs with openat2 (where the kernel has it) and with the plain walk."""
    if request.param == "walk":
        monkeypatch.setattr(safefs, "_openat2_ok", False)
    elif not safefs._openat2_ok:
        pytest.skip("no openat2 on this kernel")
    return str(request.param)


# --- safefs ------------------------------------------------------------------------------------

def test_a_link_at_any_component_is_refused(tmp_path: Path, resolver: str) -> None:
    base = tmp_path / "root"
    (base / "a/b/c").mkdir(parents=True)
    (base / "a/b/c/f.txt").write_text("inside")
    outside = tmp_path / "outside"
    (outside / "b/c").mkdir(parents=True)
    (outside / "b/c/f.txt").write_text("outside")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert safefs.lstat(fd, "a/b/c/f.txt").st_size == len("inside")
        for comp in ("a", "a/b", "a/b/c"):
            moved = base / comp
            moved.rename(tmp_path / "aside")
            target = outside / comp.split("/", 1)[1] if "/" in comp else outside
            os.symlink(target, moved)
            try:
                for call in (lambda: safefs.lstat(fd, "a/b/c/f.txt"),
                             lambda: safefs.open_file(fd, "a/b/c/f.txt"),
                             lambda: safefs.open_dir(fd, "a/b/c"),
                             lambda: safefs.rename(fd, "a/b/c/f.txt", fd, "g.txt")):
                    with pytest.raises(OSError) as info:
                        call()
                    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR), comp
                assert (outside / "b/c/f.txt").read_text() == "outside"
            finally:
                moved.unlink()
                (tmp_path / "aside").rename(moved)
        # the last component: lstat sees the link itself, an open refuses it
        os.symlink(outside / "b/c/f.txt", base / "a/b/c/link")
        assert stat.S_ISLNK(safefs.lstat(fd, "a/b/c/link").st_mode)
        with pytest.raises(OSError) as info:
            safefs.open_file(fd, "a/b/c/link")
        assert info.value.errno == errno.ELOOP
        with pytest.raises(OSError) as info:
            safefs.open_dir(fd, "a/../..")
        assert info.value.errno == errno.EXDEV
    finally:
        os.close(fd)


def test_paths_beyond_path_max_work(tmp_path: Path, resolver: str) -> None:
    rel = deep_rel()
    assert len((str(tmp_path) + "/" + rel).encode()) > PATH_MAX
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_at(fd, rel + "/f.bin", b"deep")
        assert safefs.lstat(fd, rel + "/f.bin").st_size == 4
        f = safefs.open_file(fd, rel + "/f.bin")
        try:
            assert os.read(f, 10) == b"deep"
        finally:
            os.close(f)
        safefs.rename(fd, rel + "/f.bin", fd, rel + "/g.bin")
        walked = [e.rel for e in safefs.walk(fd) if not e.is_dir]
        assert walked == [rel + "/g.bin"]
        safefs.rename(fd, rel + "/g.bin", fd, "top.bin")
        assert (tmp_path / "top.bin").read_bytes() == b"deep"
    finally:
        os.close(fd)


def test_a_root_made_again_is_opened_again(tmp_path: Path) -> None:
    r = tmp_path / "r"
    r.mkdir()
    first = safefs.root(str(r))
    assert safefs.root(str(r)) == first
    r.rename(tmp_path / "old")
    r.mkdir()
    (r / "f").write_bytes(b"")
    again = safefs.root(str(r))
    assert again != first and safefs.exists(again, "f")
    assert not safefs.exists(first, "f")  # the old one still names the old folder
    assert safefs.locate(str(r / "f")) == (again, "f")


def test_walk_never_enters_a_link_and_never_raises(tmp_path: Path, resolver: str) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "real").mkdir(parents=True)
    (inbox / "real/a.jpg").write_bytes(b"a")
    (tmp_path / "private").mkdir()
    (tmp_path / "private/secret.jpg").write_bytes(b"s")
    os.symlink(tmp_path / "private", inbox / "link")
    (inbox / ".hidden").mkdir()
    (inbox / ".hidden/x.jpg").write_bytes(b"x")
    names = list(sources.scan(str(inbox), recursive=True, patterns=()))
    assert names == ["link", "real/a.jpg"]  # the link is an entry (quarantined), not a folder
    assert list(sources.scan(str(inbox), recursive=True, patterns=(), under="link")) == []
    assert list(sources.scan(str(inbox), recursive=True, patterns=(), under="gone")) == []
    assert list(sources.scan(str(tmp_path / "no-inbox"), recursive=True, patterns=())) == []


def test_scan_survives_folders_vanishing_swapped_or_replaced_mid_scan(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for d in ("a", "b", "c", "d"):
        (inbox / d / "sub").mkdir(parents=True)
        (inbox / d / "sub/f.jpg").write_bytes(b"f")
    (inbox / "0.jpg").write_bytes(b"0")
    (tmp_path / "private").mkdir()
    (tmp_path / "private/sub").mkdir()
    (tmp_path / "private/sub/secret.jpg").write_bytes(b"s")
    it = sources.scan(str(inbox), recursive=True, patterns=())
    assert next(it) == "0.jpg"
    shutil.rmtree(inbox / "b")  # vanished
    shutil.rmtree(inbox / "c")
    (inbox / "c").write_bytes(b"now a file")  # a folder replaced by a file
    (inbox / "d").rename(tmp_path / "d-aside")
    os.symlink(tmp_path / "private", inbox / "d")  # a folder swapped for a link
    rest = list(it)
    assert "a/sub/f.jpg" in rest
    assert not any("secret" in r for r in rest)
    assert not any(r.startswith(("b/", "c/", "d/")) for r in rest)


def test_scan_skips_an_unreadable_folder(tmp_path: Path) -> None:
    """A 000 folder (checked as an unprivileged user: root reads anything)."""
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"watcher-000-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    (base / "inbox/locked").mkdir(parents=True)
    (base / "inbox/open").mkdir()
    (base / "inbox/locked/a.jpg").write_bytes(b"a")
    (base / "inbox/open/b.jpg").write_bytes(b"b")
    os.chmod(base, 0o755)
    os.chmod(base / "inbox/locked", 0)
    code = ("import sys, json; from watcher.watch import sources; "
            "print(json.dumps(list(sources.scan("
            f"{str(base / 'inbox')!r}, recursive=True, patterns=()))))")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.geteuid() == 0 else []
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's privileges")
    try:
        out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             cwd="/", check=True, timeout=60)
    finally:
        os.chmod(base / "inbox/locked", 0o755)
        shutil.rmtree(base, ignore_errors=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["open/b.jpg"]
    assert "scan.folder_skipped" in out.stdout + out.stderr


# --- claims ------------------------------------------------------------------------------------

def _folders(root: Path) -> lifecycle.Folders:
    for d in FOLDERS:
        (root / d).mkdir(exist_ok=True)
    return lifecycle.Folders({"inbox": str(root / "inbox"), "output": str(root / "processed"),
                              "archive": str(root / "archive"),
                              "quarantine": str(root / "quarantine"),
                              "work": str(root / "work")})


def test_a_claim_through_a_swapped_folder_is_refused(tmp_path: Path) -> None:
    folders = _folders(tmp_path)
    (tmp_path / "inbox/sw").mkdir()
    (tmp_path / "inbox/sw/a.jpg").write_bytes(b"a")
    private = tmp_path / "private"
    private.mkdir()
    (private / "a.jpg").write_bytes(b"private")
    (tmp_path / "inbox/sw").rename(tmp_path / "elsewhere")
    os.symlink(private, tmp_path / "inbox/sw")
    with pytest.raises(claiming.NotClaimed, match="symbolic link"):
        claiming.claim(folders, "sw/a.jpg", 1, 0.0)
    assert (private / "a.jpg").read_bytes() == b"private"
    assert os.listdir(tmp_path / "work") == []  # no record left either
    # a file that became a folder is not claimed: its files are
    (tmp_path / "inbox/x.jpg").mkdir()
    with pytest.raises(claiming.NotClaimed, match="folder"):
        claiming.claim(folders, "x.jpg", 2, 0.0)
    # deep: claimed into a short token name
    fd = safefs.root(str(tmp_path / "inbox"))
    write_at(fd, deep_rel() + "/d.jpg", b"deep")
    c = claiming.claim(folders, deep_rel() + "/d.jpg", 3, 0.0)
    assert Path(c.work_path).read_bytes() == b"deep"
    assert len(c.work_path) < 400


def test_moves_fit_names_and_reach_any_depth(tmp_path: Path) -> None:
    folders = _folders(tmp_path)
    long = "n" * 251 + ".txt"
    for i in range(3):
        (tmp_path / "work" / f"w{i}").write_bytes(b"%d" % i)
        c = claiming.Claim(i, long, str(tmp_path / "work" / f"w{i}"))
        dest = moves.quarantine(folders, c, {"reason": "not-an-image"})
        assert len(os.path.basename(dest + moves.SIDECAR).encode()) <= NAME_MAX
        assert json.loads(Path(dest + moves.SIDECAR).read_text())["input"] == long
    assert len(files(tmp_path / "quarantine")) == 6  # three inputs, three sidecars, distinct
    safefs.root(str(tmp_path / "archive"))
    (tmp_path / "work/deep").write_bytes(b"deep")
    dest = moves.move_no_clobber(str(tmp_path / "work/deep"),
                                     str(tmp_path / "archive" / deep_rel()), "deep.jpg")
    assert len(dest.encode()) > PATH_MAX
    assert safefs.lstat(safefs.root(str(tmp_path / "archive")), deep_rel() + "/deep.jpg")


# --- the real daemon --------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() else b"",
                                           st.st_mtime_ns, st.st_mode)
    return out


def private_folder(root: Path) -> Path:
    private = root / "private"
    private.mkdir()
    make_image(private / "secret.jpg", size=(40, 30), seed=7)  # bytes unlike any dropped
    os.chmod(private / "secret.jpg", 0o600)
    (private / "note.txt").write_text("private words\n")
    (private / "sub").mkdir()
    make_image(private / "sub/deeper.png", size=(40, 30), seed=8)
    return private


def swap_attack(root: Path, private: Path, rounds: int, seed: int = 0) -> None:
    """Drop inbox/swN/a.jpg, then at once move swN away and put a link to ``private`` in its
    place; the pause between the two varies, to land at every step of the daemon's intake."""
    rnd = random.Random(seed)
    aside = root / "elsewhere"
    aside.mkdir(exist_ok=True)
    for i in range(rounds):
        sw = root / "inbox" / f"sw{i}"
        make_image(sw / ("a.jpg" if i % 2 == 0 else "in/a.jpg"), seed=i)
        pause = rnd.choice([0, 0, 0.001, 0.005, 0.02, 0.05, 0.2, 0.4])
        if pause:  # varies the race only: nothing waits on it
            time.sleep(pause)
        os.rename(sw, aside / f"sw{i}")
        os.symlink(private, sw)


def assert_untouched(root: Path, private: Path, before: dict[str, tuple[bytes, int, int]]) \
        -> None:
    assert snapshot(private) == before
    secrets = {v[0] for v in before.values() if v[0]}
    for d in ("processed", "archive", "quarantine", "work"):
        for p in (root / d).rglob("*"):
            assert not any(n in p.name for n in ("secret", "note", "deeper")), p
            if p.is_file() and not p.is_symlink():
                assert p.read_bytes() not in secrets, p


@pytest.mark.timeout(180)
@pytest.mark.parametrize("settle", ["0", "0.3"])
def test_a_folder_swapped_for_a_link_never_leads_outside(tmp_path: Path, settle: str) -> None:
    """settle 0: what a scan finds through the link is due at once, before the link itself."""
    root = tmp_path
    private = private_folder(root)
    before = snapshot(private)
    d = Daemon(root, "--settle", settle)
    rounds = 40
    try:
        swap_attack(root, private, rounds)
        # every link is itself quarantined (moved as a link, its target not read)
        d.wait_for("file.quarantined", count=rounds, timeout=120, reason="symlink")
    finally:
        d.stop()
    assert_untouched(root, private, before)
    q = root / "quarantine"
    links = [p for p in q.iterdir() if p.is_symlink()]
    assert len(links) == rounds
    assert all(os.readlink(p) == str(private) for p in links)
    # each dropped file was either moved away before its claim (and is still there), or
    # claimed first (processed, or left claimed in the work folder by the stop)
    for i in range(rounds):
        rel = f"sw{i}/a.jpg" if i % 2 == 0 else f"sw{i}/in/a.jpg"
        left = (root / "elsewhere" / rel).exists()
        taken = d.seen("file.processed", input=rel) + d.seen("file.left", input=rel)
        assert left != bool(taken), i


def test_a_hard_link_to_a_file_elsewhere_is_quarantined_unread(tmp_path: Path) -> None:
    root = tmp_path
    outside = make_image(root / "outside.jpg", seed=3)
    os.chmod(outside, 0o600)
    st0 = outside.stat()
    data = outside.read_bytes()
    d = Daemon(root)
    try:
        os.link(outside, root / "inbox" / "h.jpg")
        (ev,) = d.wait_for("file.quarantined", reason="hard-link")
        assert ev["input"] == "h.jpg"
        drop(root, "plain.jpg")
        d.wait_for("file.processed", input="plain.jpg")
    finally:
        d.stop()
    st1 = outside.stat()
    assert outside.read_bytes() == data
    assert (st1.st_mode, st1.st_mtime_ns, st1.st_ino) == (st0.st_mode, st0.st_mtime_ns,
                                                          st0.st_ino)
    q = root / "quarantine" / "h.jpg"
    assert q.stat().st_ino == st0.st_ino and st1.st_nlink == 2  # only that name was moved
    assert json.loads((root / "quarantine/h.jpg.error.json").read_text())["reason"] == \
        "hard-link"
    assert not any(p.name.startswith("h_") for p in (root / "processed").rglob("*"))


def test_hard_links_can_be_processed_when_asked(tmp_path: Path) -> None:
    root = tmp_path
    outside = make_image(root / "mine.jpg", seed=4)
    d = Daemon(root, env={"WATCHER_HARD_LINKS": "process"})
    try:
        os.link(outside, root / "inbox" / "h.jpg")
        d.wait_for("file.processed", input="h.jpg")
    finally:
        d.stop()
    assert files(root / "archive") == ["h.jpg"] and outside.stat().st_nlink == 2


@pytest.mark.timeout(120)
def test_folders_churning_vanishing_and_turning_into_files_do_not_stop_intake(
        tmp_path: Path) -> None:
    root = tmp_path
    d = Daemon(root)
    try:
        for i in range(30):
            top = root / "inbox" / f"churn{i}"
            make_image(top / "x" / "y.jpg", seed=i)
            if i % 3 == 0:
                shutil.rmtree(top)  # vanished, maybe mid-scan
            elif i % 3 == 1:
                shutil.rmtree(top)
                top.write_bytes(b"a file where a folder was")  # folder replaced by a file
            else:
                (top / "x").rename(root / f"gone{i}")  # a sub-folder leaves the inbox
                (top / "x").write_bytes(b"")
        drop(root, "after.jpg")
        d.wait_for("file.processed", input="after.jpg")
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0
    assert d.seen("watcher.internal_error") == []
    assert files(root / "work") == []


def test_an_inbox_configured_through_a_link_works(tmp_path: Path) -> None:
    """The inbox's own path may be a link (the operator's choice): it is followed, once."""
    real = tmp_path / "real-inbox"
    real.mkdir()
    os.symlink(real, tmp_path / "inbox")
    d = Daemon(tmp_path)
    try:
        drop(tmp_path, "a.jpg")
        make_image(real / "sub" / "b.jpg")
        d.wait_for("file.processed", input="a.jpg")
        d.wait_for("file.processed", input="sub/b.jpg")
    finally:
        d.stop()
    assert files(tmp_path / "archive") == ["a.jpg", "sub/b.jpg"]


def drop(root: Path, name: str, seed: int = 0) -> Path:
    return make_image(root / "inbox" / name, seed=seed)


def test_names_of_230_and_255_bytes(tmp_path: Path) -> None:
    root = tmp_path
    image = "i" * 226 + ".jpg"  # 230 bytes: its temp names would be longer than NAME_MAX
    text = "t" * 251 + ".jpg"  # 255 bytes, not an image: its sidecar name would be too long
    d = Daemon(root)
    try:
        drop(root, image)
        (root / "inbox" / text).write_bytes(b"not an image at all")
        d.wait_for("file.processed", input=image)
        (q,) = d.wait_for("file.quarantined", input=text)
    finally:
        d.stop()
    assert files(root / "archive") == [image]
    outputs = files(root / "processed")
    assert outputs and all(o.startswith("i" * 150) and len(o) <= 255 for o in outputs)
    sidecar = Path(q["quarantined_as"] + moves.SIDECAR)
    assert json.loads(sidecar.read_text())["input"] == text
    assert d.seen("file.vanished") == []
    assert files(root / "work") == [] and files(root / "inbox") == []
    assert_no_temps(root)


def test_an_image_with_a_255_byte_name_is_processed(tmp_path: Path) -> None:
    root = tmp_path
    name = "m" * 251 + ".jpg"
    d = Daemon(root)
    try:
        drop(root, name)
        wait_until(lambda: d.fates().get(name), 30, f"a fate for {name}")
    finally:
        d.stop()
    assert d.seen("file.processed", input=name), d.seen("file.quarantined")
    # archived under its readable start and a hash: the name and a sidecar fit NAME_MAX
    (archived,) = files(root / "archive")
    assert archived.startswith("m" * 200) and len(archived) + len(moves.SIDECAR) <= NAME_MAX
    assert_no_temps(root)


def test_a_tree_deeper_than_path_max_does_not_stop_the_daemon(tmp_path: Path) -> None:
    root = tmp_path
    for f in FOLDERS:
        (root / f).mkdir()
    inbox_fd = os.open(root / "inbox", os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_at(inbox_fd, deep_rel() + "/deep.jpg", image_bytes(tmp_path))
    finally:
        os.close(inbox_fd)
    rel = deep_rel() + "/deep.jpg"
    events = []
    for run in range(2):  # it starts, keeps running, and starts again
        d = Daemon(root)
        try:
            if run == 0:
                d.wait_for("file.quarantined", reason="path-too-long")
            drop(root, f"next{run}.jpg")
            d.wait_for("file.processed", input=f"next{run}.jpg")
            assert d.proc.poll() is None
        finally:
            assert d.stop() == 0
        events += d.events
    (q,) = [e for e in events if e["event"] == "file.quarantined"]
    assert q["reason"] == "path-too-long"
    sidecar = json.loads(Path(q["quarantined_as"] + moves.SIDECAR).read_text())
    assert rel in sidecar["error"]
    assert Path(q["quarantined_as"]).parent == root / "quarantine"  # flat, at the top
    assert files(root / "archive") == ["next0.jpg", "next1.jpg"]


# --- observed from outside: strace ------------------------------------------------------------

TRACED = "openat,open,openat2,rename,renameat,renameat2,link,linkat,unlink,unlinkat,mkdir,mkdirat"
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<(.*?)>)?")
_ARG = re.compile(r'(?:(AT_FDCWD|\d+)<(.*?)>,\s*)?"((?:[^"\\]|\\.)*)"')


def traced_paths(prefix: Path) -> Iterator[tuple[str, str]]:
    """(syscall, absolute path) for every path the traced processes named or opened.

    A name relative to a directory descriptor is judged by where that folder was when it was
    opened (strace -yy prints where it is now: a folder the attacker moves out of the inbox
    while the daemon holds it would otherwise show the daemon "renaming outside", when every
    lookup it made was inside)."""
    for log_file in prefix.parent.glob(prefix.name + ".*"):
        opened_at: dict[str, str] = {}  # fd -> its path when this thread opened it
        for line in log_file.read_text(errors="replace").splitlines():
            m = _CALL.match(line)
            if not m:
                continue
            call, args, ret, opened = m.groups()
            named = []
            for dirfd, dirpath, raw in _ARG.findall(args):
                name = raw.encode().decode("unicode_escape").encode("latin-1").decode(
                    "utf-8", "replace")
                if name.startswith("/") or not dirpath:
                    named.append((name, name))
                else:
                    named.append((name, os.path.normpath(opened_at.get(dirfd, dirpath) + "/"
                                                         + name)))
            for _, path in named:
                yield call, path
            if opened and int(ret) >= 0:
                # an open that can follow no link opened exactly the name it looked up (what
                # strace prints is where that is now); any other: what it really opened
                exact = named and "O_NOFOLLOW" in args and (
                    "RESOLVE_NO_SYMLINKS" in args or "/" not in named[0][0])
                opened_at[ret] = named[0][1] if exact else opened
                yield call, opened_at[ret]


def _interpreters_own(path: str) -> bool:
    """What Python, its libraries and multiprocessing open outside the daemon's folders."""
    if not path.startswith("/"):
        return True  # pipe:[...], socket:[...], anon_inode:...
    if path in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers"):
        return False
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(ROOT), tempfile.gettempdir(),
                "/usr", "/lib", "/lib64", "/etc", "/proc", "/dev", "/sys", "/run", "/opt"}
    prefixes |= {p for p in sys.path if p.startswith("/")}  # the venv's .pth entries too
    prefixes |= {os.path.dirname(sys.prefix)}  # the venv looks for pyvenv.cfg beside it
    prefixes |= {os.path.realpath(p) for p in list(prefixes)}
    prefixes |= {os.path.dirname(os.path.realpath(sys.executable))}
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def stop_traced(d: Daemon) -> None:
    """SIGTERM to the daemon itself (strace, the process started, does not pass it on)."""
    with open(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children") as f:
        for pid in f.read().split():
            os.kill(int(pid), signal.SIGTERM)
    assert d.exit_code(120) == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_strace_sees_nothing_outside_the_five_folders(tmp_path: Path, observer: str) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (scripts/test installs it: apt-get install strace)")
    root = tmp_path
    private = private_folder(root)
    before = snapshot(private)
    outside = make_image(root / "outside.jpg", seed=3)
    os.chmod(outside, 0o600)
    trace = root / "trace" / "t"
    trace.parent.mkdir()
    d = Daemon(root, "--observer", observer, "--poll-interval", "0.2", "--settle", "0",
               prefix=[strace, "-ff", "-yy", "-s", "65535", "-e", f"trace={TRACED}",
                             "-o", str(trace)])
    try:
        swap_attack(root, private, 12, seed=1)
        os.link(outside, root / "inbox" / "h.jpg")
        os.symlink(outside, root / "inbox" / "s.jpg")
        drop(root, "k" * 226 + ".jpg")
        d.wait_for("file.quarantined", input="h.jpg", timeout=120)
        d.wait_for("file.quarantined", input="s.jpg", timeout=120)
        d.wait_for("file.processed", input="k" * 226 + ".jpg", timeout=120)
        d.wait_for("file.quarantined", count=13, timeout=120, reason="symlink")
    finally:
        stop_traced(d)
    assert_untouched(root, private, before)
    allowed_in_root = [str(root / f) for f in FOLDERS]
    seen = list(traced_paths(trace))
    assert len(seen) > 100  # the trace is real
    bad = []
    for call, path in seen:
        if path.startswith(str(root)):
            if path == str(root) or any(path == a or path.startswith(a + "/")
                                        for a in allowed_in_root):
                continue
            bad.append((call, path))  # private/, outside.jpg, elsewhere/: never
        elif not _interpreters_own(path):
            bad.append((call, path))
    assert bad == []
    # the hard link's data was never opened, under any of its names
    quarantined_as = Path(d.seen("file.quarantined", input="h.jpg")[0]["quarantined_as"])
    token_opens = [p for c, p in seen if c.startswith("open") and
                   (p.endswith(("-h.jpg", "/h.jpg")) or p == str(quarantined_as))]
    assert token_opens == []


def test_open_regular_judges_the_open_file(tmp_path: Path) -> None:
    f = tmp_path / "f.jpg"
    f.write_bytes(b"data")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.symlink(f, tmp_path / "link")
    os.symlink(fifo, tmp_path / "to-fifo")
    fp, n = open_regular(str(f), nofollow=True, max_links=1)
    fp.close()
    assert n == 4
    os.link(f, tmp_path / "second")
    for path, kw, reason in ((f, {"max_links": 1}, "hard-link"),
                             (tmp_path / "link", {}, "symlink"),
                             (fifo, {}, "not-a-file"),
                             (tmp_path / "missing", {}, "missing")):
        with pytest.raises(RejectedInput) as info:
            open_regular(str(path), nofollow=True, **kw)  # type: ignore[arg-type]
        assert info.value.reason == reason, path
    with pytest.raises(RejectedInput) as info:  # followed (batch), a FIFO is still refused
        open_regular(str(tmp_path / "to-fifo"), nofollow=False)
    assert info.value.reason == "not-a-file"
    fp, _ = open_regular(str(f), nofollow=True)  # max_links 0: no check
    fp.close()


def test_links_planted_in_the_output_folder_never_lead_outside(tmp_path: Path) -> None:
    """A link (or a file) where an output's folder should be: the input is quarantined as
    ``unsafe-output`` and nothing is written, or removed, through the link."""
    root = tmp_path
    private = private_folder(root)
    before = snapshot(private)
    d = Daemon(root)
    out = root / "processed"
    try:
        os.symlink(private, out / "sub")  # the output's own folder
        (out / "deep").mkdir()
        os.symlink(private, out / "deep" / "er")  # a folder further down
        (out / "filed").write_text("a file where a folder should be\n")
        for rel in ("sub/good.jpg", "deep/er/good.jpg", "filed/good.jpg"):
            stage = root / "stage" / rel
            make_image(stage, seed=5)
            top = rel.split("/")[0]
            os.rename(root / "stage" / top, root / "inbox" / top)
            (ev,) = d.wait_for("file.quarantined", input=rel, timeout=60)
            assert ev["reason"] == "unsafe-output", ev
            assert "link" in ev["error"], ev
        drop(root, "plain.jpg")
        d.wait_for("file.processed", input="plain.jpg")
    finally:
        d.stop()
    assert_untouched(root, private, before)
    assert sorted(d.fates().values()) == [1, 1, 1, 1]
    assert (out / "filed").read_text() == "a file where a folder should be\n"
    assert_no_temps(root)
    assert_no_temps(private)


@pytest.mark.timeout(180)
def test_an_output_folder_swapped_for_a_link_mid_run_never_leads_outside(tmp_path: Path) -> None:
    """While files flow into inbox/sub, output/sub flips between a real folder and a link to a
    private folder: every input gets one fate and not one byte lands in (or leaves) the
    private folder."""
    root = tmp_path
    private = private_folder(root)
    before = snapshot(private)
    d = Daemon(root, "-j", "2")
    out, rounds = root / "processed", 60
    stop = False
    flips = 0

    def flip() -> None:
        nonlocal flips
        rnd = random.Random(1)
        while not stop:
            real = out / "sub"
            with contextlib.suppress(OSError):
                if real.is_symlink():
                    real.unlink()
                    real.mkdir()
                elif real.is_dir():
                    real.rename(out / f"aside{flips}")
                    os.symlink(private, real)
                flips += 1
            time.sleep(rnd.choice([0, 0.001, 0.005, 0.02]))

    t = threading.Thread(target=flip)
    t.start()
    try:
        for i in range(rounds):
            stage = root / "stage" / f"s{i}"
            make_image(stage / "sub" / f"f{i}.jpg", size=(200, 150), seed=i)
            (root / "inbox" / "sub").mkdir(exist_ok=True)
            os.rename(stage / "sub" / f"f{i}.jpg", root / "inbox" / "sub" / f"f{i}.jpg")
            time.sleep(0.02)
        wait_until(lambda: len(d.fates()) >= rounds or None, 120, f"{rounds} fates")
    finally:
        stop = True
        t.join()
        d.stop()
    assert flips > 10
    assert_untouched(root, private, before)
    fates = d.fates()
    assert set(fates) == {f"sub/f{i}.jpg" for i in range(rounds)}
    assert set(fates.values()) == {1}
    for e in d.seen("file.quarantined"):
        assert e["reason"] == "unsafe-output", e
    assert_no_temps(root)


def test_the_temp_sweep_never_follows_a_folder_swapped_for_a_link(tmp_path: Path) -> None:
    """The start-up sweep of stale temp files, 5,000 of them in output/sub: the moment it starts
    removing them, output/sub is swapped for a link to a private folder of like-named files.
    Not one of those is removed; the ones left in the real folder are for the next sweep."""
    folders = _folders(tmp_path)
    sub, private = tmp_path / "processed" / "sub", tmp_path / "private"
    sub.mkdir()
    private.mkdir()
    n = 5000
    names = [f".v{i}.jpg.{HOST}.{os.getpid()}.watcher-tmp" for i in range(n)]
    for name in names:
        (sub / name).write_bytes(b"stale")
        (private / name).write_bytes(b"precious, outside the folders")
    swapped = threading.Event()

    def swap() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(os.listdir(sub)) < n:
                os.rename(sub, tmp_path / "processed" / "sub_real")
                os.symlink(private, sub)
                swapped.set()
                return

    t = threading.Thread(target=swap)
    t.start()
    removed = lifecycle.remove_stale_temps(folders, stale_mine=lambda pid, path: True)
    t.join()
    assert swapped.is_set()
    assert sorted(os.listdir(private)) == sorted(names)
    assert all((private / x).read_bytes() == b"precious, outside the folders" for x in names)
    assert 0 < len(removed) < n
    left = os.listdir(tmp_path / "processed" / "sub_real")
    assert len(left) == n - len(removed)


def test_removing_a_failed_inputs_outputs_never_follows_a_link(tmp_path: Path) -> None:
    """The outputs of an input quarantined after some were written are removed by descriptor:
    through output/sub swapped for a link, the like-named file elsewhere stays."""
    out, private = tmp_path / "out", tmp_path / "private"
    (out / "real").mkdir(parents=True)
    private.mkdir()
    (out / "real" / "x_web.jpg").write_bytes(b"ours")
    (private / "x_web.jpg").write_bytes(b"not ours")
    os.symlink(private, out / "sub")
    assert remove_output(str(out / "real" / "x_web.jpg"), str(out))
    assert not (out / "real" / "x_web.jpg").exists()
    assert not remove_output(str(out / "sub" / "x_web.jpg"), str(out))
    assert not remove_output(str(tmp_path / "private" / "x_web.jpg"), str(out))  # outside
    assert (private / "x_web.jpg").read_bytes() == b"not ours"
