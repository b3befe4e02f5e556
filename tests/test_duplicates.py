"""Duplicates: the SQLite record of processed inputs (real database files, real processes
writing at once, a real kill -9), the daemon archiving a second copy with a line naming the
first (across a restart; ``duplicates = "process"``), and a batch rerun saying "up to date"."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import json_lines, make_image, run_cli, wait_until
from tests.test_watch import Daemon, files
from watcher import config
from watcher.settings.schema import DecodeLimits
from watcher.watch import duplicates
from watcher.watch.duplicates import Seen

SKIP = {"WATCHER_DUPLICATES": "skip"}  # (the Daemon helper's default is "process")


def test_records_are_found_by_content_and_configuration(tmp_path: Path) -> None:
    seen = Seen(str(tmp_path), max_age=3600)
    assert seen.lookup("c1", "k1") is None
    seen.record("c1", "k1", "a.jpg", ["/out/a_t.jpg"])
    earlier = seen.lookup("c1", "k1")
    assert earlier is not None and earlier.input == "a.jpg" and earlier.outputs == ["/out/a_t.jpg"]
    assert seen.lookup("c1", "k2") is None and seen.lookup("c2", "k1") is None
    seen.record("c1", "k1", "b.jpg", [])  # the first record stays
    assert seen.lookup("c1", "k1").input == "a.jpg"  # type: ignore[union-attr]
    mode = sqlite3.connect(seen.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    seen.close()


def test_old_records_are_pruned(tmp_path: Path) -> None:
    seen = Seen(str(tmp_path), max_age=100)
    for i in range(50):
        seen.record(f"c{i}", "k", f"{i}.jpg", [])
    assert seen.count() == 50
    assert seen.prune(now=time.time() + 50) == 0
    assert seen.prune(now=time.time() + 200) == 50
    assert seen.count() == 0
    seen.close()


def test_hashes_of_content_and_configuration(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.png")
    b = tmp_path / "b.png"
    shutil.copy(a, b)
    assert duplicates.content_hash(str(a)) == duplicates.content_hash(str(b))
    os.symlink(a, tmp_path / "link.png")
    assert duplicates.content_hash(str(tmp_path / "link.png")) is None  # never followed
    os.mkfifo(tmp_path / "fifo")
    assert duplicates.content_hash(str(tmp_path / "fifo")) is None  # never blocks
    one = config.pipeline_from(["thumbnail(64, 64)"], "t")
    two = config.pipeline_from(["thumbnail(65, 64)"], "t")
    limits = DecodeLimits()
    assert duplicates.config_hash([one], limits) == duplicates.config_hash(
        [config.pipeline_from(["thumbnail(64, 64)"], "t")], limits)
    assert duplicates.config_hash([one], limits) != duplicates.config_hash([two], limits)
    assert duplicates.config_hash([one], limits) != duplicates.config_hash(
        [one], DecodeLimits(pixel_limit=5))


def _writer(folder: str, who: int, n: int) -> None:
    seen = Seen(folder, max_age=3600)
    for i in range(n):
        seen.record(f"{who}-{i}", "k", f"{who}/{i}.jpg", [])
        if i % 7 == 0:
            seen.lookup(f"{(who + 1) % 4}-{i}", "k")
    seen.close()


def test_several_processes_write_one_database_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), who, 150)) for who in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, "a writer failed (database locked?) or hung"
    seen = Seen(str(tmp_path), max_age=3600)
    assert seen.count() == 600
    seen.close()


def _record_then_wait(folder: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    seen = Seen(folder, max_age=3600)
    seen.record("kept", "k", "kept.jpg", ["/o/kept.jpg"])
    ready.set()
    time.sleep(60)  # killed here, its connection open


def test_a_record_survives_kill_9_of_its_writer(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_record_then_wait, args=(str(tmp_path), ready))
    p.start()
    assert ready.wait(60)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    seen = Seen(str(tmp_path), max_age=3600)
    earlier = seen.lookup("kept", "k")
    assert earlier is not None and earlier.outputs == ["/o/kept.jpg"]
    seen.close()


@pytest.mark.integration
def test_the_daemon_archives_a_duplicate_naming_the_first_across_a_restart(
        tmp_path: Path) -> None:
    root = tmp_path
    d = Daemon(root, "--pipeline", "thumbnail", env=SKIP)
    try:
        make_image(root / "inbox" / "first.jpg", size=(80, 60))
        d.wait_for("file.processed", input="first.jpg")
        shutil.copy(root / "archive" / "first.jpg", root / "inbox" / "again.jpg.part")
        os.rename(root / "inbox" / "again.jpg.part", root / "inbox" / "again.jpg")
        (dup,) = d.wait_for("file.duplicate", input="again.jpg")
        assert dup["earlier_input"] == "first.jpg"
        assert dup["earlier_outputs"] == [str(root / "processed" / "first_thumbnail.jpg")]
        assert not d.seen("file.processed", input="again.jpg")
        wait_until((root / "archive" / "again.jpg").exists, 10, "archived")
    finally:
        assert d.stop() == 0
    assert files(root / "processed") == ["first_thumbnail.jpg"]
    # a restart remembers; a different configuration is a new one
    d = Daemon(root, "--pipeline", "thumbnail", env=SKIP)
    try:
        shutil.copy(root / "archive" / "first.jpg", root / "inbox" / "third.jpg")
        d.wait_for("file.duplicate", input="third.jpg", earlier_input="first.jpg")
    finally:
        assert d.stop() == 0
    d = Daemon(root, "--pipeline", "web", env=SKIP)
    try:
        shutil.copy(root / "archive" / "first.jpg", root / "inbox" / "fourth.jpg")
        d.wait_for("file.processed", input="fourth.jpg")
    finally:
        assert d.stop() == 0
    assert (root / "work" / ".watcher-seen.sqlite3").exists()


@pytest.mark.integration
def test_duplicates_process_processes_them_again(tmp_path: Path) -> None:
    root = tmp_path
    d = Daemon(root, "--pipeline", "thumbnail", "--duplicates", "process")
    try:
        make_image(root / "inbox" / "a.jpg", size=(80, 60))
        d.wait_for("file.processed", input="a.jpg")
        shutil.copy(root / "archive" / "a.jpg", root / "inbox" / "b.jpg")
        d.wait_for("file.processed", input="b.jpg")
        assert not d.seen("file.duplicate")
    finally:
        assert d.stop() == 0


@pytest.mark.integration
def test_a_batch_rerun_over_complete_outputs_says_up_to_date(tmp_path: Path) -> None:
    src = [make_image(tmp_path / f"in{i}.png", size=(40 + i, 30)) for i in range(3)]
    out = tmp_path / "out"
    first = run_cli("batch", "-o", str(out), "-j", "1", "--no-progress", *map(str, src),
                    timeout=120)
    assert first.returncode == 0, first.stderr
    again = run_cli("batch", "-o", str(out), "-j", "1", "--no-progress", *map(str, src),
                    timeout=120)
    assert again.returncode == 0, again.stderr
    (done,) = [e for e in json_lines(again.stdout + again.stderr)
               if e["event"] == "batch.finished"]
    assert done["skipped"] == 3 and done["succeeded"] == 0
    assert done["why"].startswith("3 up to date: their outputs exist")
    assert not any(e["event"] == "worker.started"
                   for e in json_lines(again.stdout + again.stderr))
