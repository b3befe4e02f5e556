"""Atomic writes, no-clobber publishing, collision-free names; a kill -9 mid-write for real."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from watcher.errors import RejectedInput
from watcher.fs import durable, files, staging


def test_atomic_write_publishes_complete_file(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "out.bin"
    n = staging.atomic_write(str(final), lambda f: f.write(b"x" * 1000), overwrite=False)
    assert n == 1000 and final.read_bytes() == b"x" * 1000
    assert [p.name for p in final.parent.iterdir()] == ["out.bin"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"

    def boom(f):  # type: ignore[no-untyped-def]
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        staging.atomic_write(str(final), boom, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_no_clobber_refuses_different_content(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    final.write_bytes(b"theirs")
    with pytest.raises(RejectedInput) as e:
        staging.atomic_write(str(final), lambda f: f.write(b"mine"), overwrite=False)
    assert e.value.reason == "output-conflict"
    assert final.read_bytes() == b"theirs"
    assert list(tmp_path.iterdir()) == [final]


def test_no_clobber_accepts_identical_content(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    final.write_bytes(b"same")
    staging.atomic_write(str(final), lambda f: f.write(b"same"), overwrite=False)
    assert final.read_bytes() == b"same"


def test_overwrite_replaces(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    staging.atomic_write(str(final), lambda f: f.write(b"new"), overwrite=True)
    assert final.read_bytes() == b"new"


KILLER = """
import os, signal, sys
from watcher.fs import staging
def write(f):
    f.write(b"a" * int(sys.argv[2]))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
staging.atomic_write(sys.argv[1], write, overwrite=True)
"""


def kill_mid_write(final: Path, size: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, str(final), str(size)], check=False,
                          timeout=30,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_mid_write_leaves_no_visible_output(tmp_path: Path) -> None:
    # Past the in-memory limit the output is being written to its temp file when killed.
    final = tmp_path / "out.jpg"
    final.write_bytes(b"previous good result")
    kill_mid_write(final, staging.SPOOL_LIMIT + 100_000)
    assert final.read_bytes() == b"previous good result"  # never a partial file under the name
    leftovers = [p.name for p in tmp_path.iterdir() if p != final]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.jpg.")  # hidden temp only
    owner = files.temp_owner(leftovers[0])
    assert owner is not None and owner[0] == files.HOST
    pid = owner[1]
    assert files.remove_temps([str(final)], pid) == [str(tmp_path / leftovers[0])]
    assert list(tmp_path.iterdir()) == [final]


def test_kill_9_while_encoding_in_memory_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "out.jpg"
    final.write_bytes(b"previous good result")
    kill_mid_write(final, 100_000)
    assert list(tmp_path.iterdir()) == [final]
    assert final.read_bytes() == b"previous good result"


def test_output_is_encoded_in_memory_and_spills_past_the_limit(tmp_path: Path) -> None:
    seen: list[bool] = []

    def write(f: object) -> None:
        f.write(b"x" * 1000)  # type: ignore[attr-defined]
        seen.append(any(tmp_path.iterdir()))  # no file yet: the committer creates it
        f.write(b"y" * staging.SPOOL_LIMIT)  # type: ignore[attr-defined]
        seen.append(any(p.name.endswith(files.TEMP_SUFFIX) for p in tmp_path.iterdir()))
        f.seek(0)  # type: ignore[attr-defined]
        f.write(b"z")  # type: ignore[attr-defined]

    st = staging.Staged(str(tmp_path / "big.bin"), write)
    assert seen == [False, True] and st.size == 1000 + staging.SPOOL_LIMIT
    assert st.commit(overwrite=False) == st.size
    data = (tmp_path / "big.bin").read_bytes()
    assert len(data) == st.size and data[:2] == b"zx" and data[-1:] == b"y"
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_walk_skips_dot_files_and_symlinked_dirs(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "1.jpg").write_bytes(b"")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "2.png").write_bytes(b"")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    found = [os.path.relpath(p, tmp_path) for p in files.walk_images(str(tmp_path))]
    assert found == ["2.png", "a/b/1.jpg"]


# --- a task's commit when the disk says no ------------------------------------------------------

def _noise_task(tmp_path: Path, out_dir: Path) -> tuple[Any, Any]:
    from PIL import Image

    from watcher import config
    from watcher.imaging.processor import Processor
    from watcher.settings.schema import DecodeLimits
    from watcher.tasks import OutputPlan, Task

    src = tmp_path / "noise.png"
    Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3)).save(src)  # ~800 kB as PNG
    p = config.pipeline_from(["grayscale"], "p", "p")
    proc = Processor({"p": p}, DecodeLimits())
    return proc, Task(seq=1, path=str(src),
                      outputs=(OutputPlan(pipeline="p", path=str(out_dir / "noise_p.png")),))


@pytest.fixture
def small(tmpfs) -> Path:
    """A real 64 kB file system (tmpfs) that fills up."""
    return tmpfs("small", "64k")


def test_disk_full_fails_the_task_and_leaves_nothing(tmp_path: Path, small: Path) -> None:
    proc, task = _noise_task(tmp_path, small)
    r = proc.run(task)
    assert not r.ok and r.reason == "write-failed" and "No space left" in r.error
    assert os.listdir(small) == []  # no output, no temp file


def test_a_failed_fsync_fails_the_task_and_leaves_nothing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc, task = _noise_task(tmp_path, out)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    # An fsync that fails (EIO: the disk lost the data) cannot be made on demand: a fake one.
    monkeypatch.setattr(os, "fsync", fsync)
    r = proc.run(task)
    assert not r.ok and r.reason == "write-failed" and "Input/output error" in r.error
    assert os.listdir(out) == []


# --- committing several tasks together -----------------------------------------------------------

def _group(tmp_path: Path, out_dir: Path, names: list[str], *, overwrite: bool = False,
           big: set[str] = frozenset()) -> tuple[Any, list[Any]]:
    """A Processor and the prepared tasks for ``names`` (``big`` ones: ~800 kB noise PNGs)."""
    from PIL import Image

    from tests.conftest import make_image
    from watcher import config
    from watcher.imaging.processor import Processor
    from watcher.settings.schema import DecodeLimits
    from watcher.tasks import OutputPlan, Task

    proc = Processor({"p": config.pipeline_from(["grayscale"], "p", "p")}, DecodeLimits())
    preps = []
    for seq, name in enumerate(names):
        src = tmp_path / "in" / f"{name}.png"
        if name in big:
            src.parent.mkdir(parents=True, exist_ok=True)
            Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3)).save(src)
        else:
            make_image(src, seed=seq)
        task = Task(seq=seq, path=str(src),
                    outputs=(OutputPlan(pipeline="p", path=str(out_dir / f"{name}_p.png")),),
                    overwrite=overwrite, sync_dir=False)
        preps.append(proc.prepare(task))
    return proc, preps


def test_a_group_is_made_durable_with_one_syncfs_and_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if durable._SYNCFS is None:
        pytest.skip("no syncfs here: each output gets its own fsync")
    out = tmp_path / "out"
    out.mkdir()
    proc, preps = _group(tmp_path, out, ["a", "b", "c", "d"])
    calls = {"syncfs": 0, "fsync": 0}
    real_syncfs, real_fsync = durable._SYNCFS, os.fsync

    def syncfs(fd: int) -> int:  # the real call, counted
        calls["syncfs"] += 1
        return real_syncfs(fd)

    def fsync(fd: int) -> None:
        calls["fsync"] += 1
        real_fsync(fd)

    monkeypatch.setattr(durable, "_SYNCFS", syncfs)
    monkeypatch.setattr(os, "fsync", fsync)
    # however much other programs have left unwritten on this machine just now
    monkeypatch.setattr(durable, "OTHERS_DIRTY_LIMIT", 1 << 62)
    results = proc.commit_many(preps)
    assert [r.ok for r in results] == [True] * 4
    assert [r.seq for r in results] == [0, 1, 2, 3]
    assert calls == {"syncfs": 1, "fsync": 0}
    assert sorted(os.listdir(out)) == ["a_p.png", "b_p.png", "c_p.png", "d_p.png"]
    from PIL import Image

    for r in results:
        with Image.open(r.outputs[0]) as im:
            assert im.mode == "L" and im.size == (64, 48)


def test_a_group_fails_only_its_tasks_that_conflict(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_p.png").write_bytes(b"someone else's file")
    proc, preps = _group(tmp_path, out, ["a", "b", "c"])
    results = proc.commit_many(preps)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "output-conflict"
    assert (out / "b_p.png").read_bytes() == b"someone else's file"
    assert sorted(os.listdir(out)) == ["a_p.png", "b_p.png", "c_p.png"]  # no temp file left


def test_a_group_on_a_full_disk_fails_only_the_task_that_does_not_fit(tmp_path: Path,
                                                                     small: Path) -> None:
    proc, preps = _group(tmp_path, small, ["a", "noise", "c"], big={"noise"})
    results = proc.commit_many(preps)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "write-failed" and "No space left" in results[1].error
    assert sorted(os.listdir(small)) == ["a_p.png", "c_p.png"]  # no temp file left


def test_when_the_group_sync_fails_each_file_is_fsynced_to_find_the_bad_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc, preps = _group(tmp_path, out, ["a", "bad", "c"])
    real_fsync = os.fsync

    # A disk that loses one file's data cannot be made on demand: syncfs reports the error
    # (faked), and the fsync of the file it hit says which one (faked for that file only).
    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".bad_p.png"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(durable, "_SYNCFS", lambda fd: -1)
    monkeypatch.setattr(os, "fsync", fsync)
    results = proc.commit_many(preps)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "write-failed" and "Input/output error" in results[1].error
    assert sorted(os.listdir(out)) == ["a_p.png", "c_p.png"]


def test_sync_files_without_syncfs_fsyncs_each_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_SYNCFS", None)
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    fds = [os.open(tmp_path / f"{i}", os.O_CREAT | os.O_WRONLY) for i in range(3)]
    try:
        assert durable.sync_files(fds) == [None, None, None]
        assert synced == fds
    finally:
        for fd in fds:
            os.close(fd)


def test_with_much_else_unwritten_a_group_gets_an_fsync_per_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc, preps = _group(tmp_path, out, ["a", "b", "c"])
    calls = {"syncfs": 0, "fsync": 0}
    real_fsync = os.fsync

    def syncfs(fd: int) -> int:
        calls["syncfs"] += 1
        return 0

    def fsync(fd: int) -> None:
        calls["fsync"] += 1
        real_fsync(fd)

    # 1 GiB of other programs' data waiting to be written (read from /proc/meminfo, faked):
    # syncfs would write it all before returning
    monkeypatch.setattr(durable, "unwritten_bytes", lambda: 1 << 30)
    monkeypatch.setattr(durable, "_SYNCFS", syncfs)
    monkeypatch.setattr(os, "fsync", fsync)
    results = proc.commit_many(preps)
    assert [r.ok for r in results] == [True] * 3
    assert calls == {"syncfs": 0, "fsync": 3}


def test_unwritten_bytes_reads_the_page_cache_figures() -> None:
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo")
    text = Path("/proc/meminfo").read_text()
    fields = dict(line.split(":", 1) for line in text.splitlines())
    expected = sum(int(fields[k].split()[0]) * 1024 for k in ("Dirty", "Writeback"))
    # both are read at about the same moment; the kernel's figures move a little meanwhile
    assert abs(durable.unwritten_bytes() - expected) <= 64 * 1024 * 1024


@pytest.mark.parametrize("name", ["a.jpg", "i" * 226 + ".jpg", "t" * 251 + ".jpg",
                                  "é" * 125 + ".png", "x" * 255])
def test_temp_names_fit_name_max_and_keep_host_and_pid(tmp_path: Path, name: str) -> None:
    final = str(tmp_path / name)
    tmp = os.path.basename(files.temp_name(final, 4194304))
    assert len(os.fsencode(tmp)) <= files.NAME_MAX
    assert tmp.startswith(".") and tmp.endswith(files.TEMP_SUFFIX)
    assert files.temp_owner(tmp) == (files.HOST, 4194304)
    assert files.temp_owner(os.path.basename(files.temp_name(final, 7, "other-host"))) == \
        ("other-host", 7)
    if len(os.fsencode(name)) < 200:
        assert tmp == f".{name}.{files.HOST}.4194304{files.TEMP_SUFFIX}"  # unchanged
    # a real file under that name, and distinct long names keep distinct temp names
    Path(tmp_path / tmp).write_bytes(b"")
    other = os.path.basename(files.temp_name(final[:-5] + "Z" + final[-4:], 4194304))
    assert other != tmp


def test_a_long_name_is_written_atomically_and_no_temp_is_left(tmp_path: Path) -> None:
    final = tmp_path / ("o" * 251 + ".bin")
    staging.atomic_write(str(final), lambda f: f.write(b"data"), overwrite=False)
    assert final.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    assert files.remove_temps([str(final)], os.getpid()) == []
