"""Every claim ends in exactly one fate, within a bounded time: a real daemon against hostile
conditions (colliding names, a write that keeps failing, full disks, an unwritable heartbeat)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import fill, make_image, run_cli, wait_until
from tests.test_watch import SLOW_TOML, Daemon, claimed, drop, files
from watcher.watch import claiming, lifecycle, moves

pytestmark = pytest.mark.integration

WEB = """
[pipelines.web]
steps = ["thumbnail(64, 64)"]
format = "jpeg"
suffix = "web"

[output]
pipelines = ["web"]
"""


def sidecar(path: Path) -> dict:
    return json.loads(Path(str(path) + ".error.json").read_text())


def test_two_inputs_one_fixed_format_never_share_an_output(tmp_path: Path) -> None:
    (tmp_path / "watcher.toml").write_text(WEB)
    d = Daemon(tmp_path, "--config", str(tmp_path / "watcher.toml"))
    try:
        make_image(tmp_path / "src" / "x.png", seed=1)
        make_image(tmp_path / "src" / "x.jpg", seed=2)
        os.rename(tmp_path / "src" / "x.png", tmp_path / "inbox" / "x.png")
        os.rename(tmp_path / "src" / "x.jpg", tmp_path / "inbox" / "x.jpg")
        done = d.wait_for("file.processed", count=2)
        outs = sorted(o for e in done for o in e["outputs"])
        assert [Path(o).name for o in outs] == ["x_web.jpg", "x_web_2.jpg"]
        first = {Path(o).name: Path(o).read_bytes() for o in outs}
        assert first["x_web.jpg"] != first["x_web_2.jpg"]  # two results, both kept
        drop(tmp_path, "x.png", seed=3)  # the same name again, a new picture
        d.wait_for("file.processed", count=3)
    finally:
        assert d.stop() == 0
    got = files(tmp_path / "processed")
    assert got == ["x_web.jpg", "x_web_2.jpg", "x_web_3.jpg"]
    for name, data in first.items():  # nothing replaced
        assert (tmp_path / "processed" / name).read_bytes() == data
    assert files(tmp_path / "archive") == ["x.jpg", "x.png", "x_2.png"]


def _unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root's permission override")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
            "-dac_override,-dac_read_search"]


def test_a_failure_not_the_inputs_fault_is_retried_a_bounded_number_of_times(
        tmp_path: Path) -> None:
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed").chmod(0o555)
    d = Daemon(tmp_path, "--retry-max", "3", prefix=_unprivileged(),
               env={"WATCHER_RETRY_BACKOFF": "0.3", "WATCHER_RETRY_BACKOFF_MAX": "0.6"})
    try:
        drop(tmp_path, "x.png")
        d.wait_for("file.retried", input="x.png")
        health = wait_until(lambda: (h := run_cli("health", "--work", str(tmp_path / "work")))
                            .returncode == 1 and h, 10, "health to say degraded")
        assert "1 file(s) waiting to retry" in health.stdout, health.stdout
        beat = json.loads((tmp_path / "work" / ".watcher-heartbeat.json").read_text())
        assert beat["retrying"] == 1 and beat["state"] == "degraded"
        live = run_cli("health", "--live", "--work", str(tmp_path / "work"))
        assert live.returncode == 0, live.stdout  # alive: a restart cures no such fault
        q = d.wait_for("file.quarantined", input="x.png", timeout=60)[0]
    finally:
        (tmp_path / "processed").chmod(0o755)
        assert d.stop() == 0
    assert q["reason"] == "gave-up" and "write-failed" in q["error"]
    assert len(d.seen("file.retried", input="x.png")) == 3
    assert d.fates()["x.png"] == 1
    doc = sidecar(tmp_path / "quarantine" / "x.png")
    assert doc["reason"] == "gave-up" and doc["transient_failures"] == 4
    assert claimed(tmp_path) == [] and files(tmp_path / "processed") == []


def _full_folder_daemon(root: Path, tmpfs, name: str) -> tuple[Path, Path, Daemon]:
    """A daemon whose ``name`` folder is a real tmpfs filled to the last byte: (the folder, the
    filler to remove for room, the daemon), retrying every fraction of a second."""
    folder = tmpfs(name, "256k")
    filler = fill(folder)
    d = Daemon(root, env={"WATCHER_RETRY_BACKOFF": "0.2", "WATCHER_RETRY_BACKOFF_MAX": "0.5"})
    return folder, filler, d


def test_a_full_quarantine_keeps_the_input_and_never_loses_its_reason(
        tmp_path: Path, tmpfs) -> None:
    quarantine, filler, d = _full_folder_daemon(tmp_path, tmpfs, "quarantine")
    try:
        (tmp_path / "inbox" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 100)
        d.wait_for("file.fate_deferred", input="bad.png")
        assert claimed(tmp_path) == ["bad.png"]  # still safe in the work folder
        assert [p.name for p in quarantine.iterdir()] == ["filler.bin"]  # no half fate
        wait_until(lambda: run_cli("health", "--work", str(tmp_path / "work")).returncode == 1,
                   10, "health to say degraded")
        drop(tmp_path, "good.png")  # the line keeps moving meanwhile
        d.wait_for("file.processed", input="good.png")
        filler.unlink()
        q = d.wait_for("file.quarantined", input="bad.png", timeout=30)[0]
    finally:
        assert d.stop() == 0
    assert q["reason"] in ("corrupt", "truncated", "not-an-image")
    assert sidecar(quarantine / "bad.png")["reason"] == q["reason"]
    assert d.fates()["bad.png"] == 1 and claimed(tmp_path) == []


def test_an_unwritable_heartbeat_does_not_make_a_live_daemon_look_dead(
        tmp_path: Path, tmpfs) -> None:
    root = tmpfs("root", "2m")  # inbox and work on one small file system
    d = Daemon(root)
    filler = None
    try:
        filler = fill(root / "work")
        d.wait_for("heartbeat.write_failed", timeout=30)
        beat = root / "work" / ".watcher-heartbeat.json"
        before = beat.stat().st_mtime
        wait_until(lambda: beat.stat().st_mtime > before, 10,
                   "the heartbeat's time to be refreshed")
        written = json.loads(beat.read_text())["time"]  # the last heartbeat that got written
        wait_until(lambda: time.time() - written > 3, 10, "the written heartbeat to be old")
        live = run_cli("health", "--live", "--work", str(root / "work"), "--max-age", "2")
        assert live.returncode == 0, live.stdout  # its refreshed time says the loop ticks
        # but what it last wrote is not its state now: the full question says so
        full = wait_until(lambda: (r := run_cli("health", "--work", str(root / "work"),
                                                "--max-age", "2")).returncode == 1 and r,
                          20, "health to say degraded")
        assert "not been able to write its heartbeat" in full.stdout, full.stdout
        filler.unlink()
        filler = None
        wait_until(lambda: run_cli("health", "--work", str(root / "work")).returncode == 0,
                   20, "health to be ok again once there is room")
    finally:
        if filler is not None:
            filler.unlink()
        assert d.stop() == 0


def test_sidecar_times_are_rfc_3339(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        (tmp_path / "inbox" / "notes.txt").write_text("not an image\n")
        d.wait_for("file.quarantined", input="notes.txt")
    finally:
        assert d.stop() == 0
    doc = sidecar(tmp_path / "quarantine" / "notes.txt")
    for key in ("detected_at", "claimed_at", "quarantined_at"):
        value = doc[key]
        assert value.endswith("Z") and "T" in value
        parsed = datetime.fromisoformat(value)
        assert parsed.tzinfo is not None and parsed.year >= 2024
    assert doc["reason"] == "not-an-image"


def test_restart_reuses_only_the_outputs_its_claim_recorded(tmp_path: Path) -> None:
    """A claim a killed daemon left (made here with the daemon's own claim code: the record,
    then the rename) is re-processed into the very outputs it recorded, replacing what the
    crashed run had published there; a new input whose name is taken by an unrelated file
    gets a counter and never replaces it."""
    for d in ("inbox", "processed", "archive", "quarantine", "work"):
        (tmp_path / d).mkdir()
    folders = lifecycle.Folders({k: str(tmp_path / v) for k, v in (
        ("inbox", "inbox"), ("output", "processed"), ("archive", "archive"),
        ("quarantine", "quarantine"), ("work", "work"))})
    make_image(tmp_path / "inbox" / "a.png", seed=4)
    c = claiming.claim(folders, str(tmp_path / "inbox" / "a.png"), 1, 0.0)
    own = tmp_path / "processed" / "a_thumbnail.png"
    c.outputs = (("thumbnail", str(own)),)
    claiming.save_record(c)
    own.write_bytes(b"what the crashed run had published")
    (tmp_path / "processed" / "b_thumbnail.png").write_bytes(b"someone else's file")
    d = Daemon(tmp_path)
    try:
        drop(tmp_path, "b.png")
        d.wait_for("file.processed", count=2)
    finally:
        assert d.stop() == 0
    assert (tmp_path / "processed" / "b_thumbnail.png").read_bytes() == b"someone else's file"
    assert files(tmp_path / "processed") == ["a_thumbnail.png", "b_thumbnail.png",
                                             "b_thumbnail_2.png"]
    for name in ("a_thumbnail.png", "b_thumbnail_2.png"):
        with Image.open(tmp_path / "processed" / name) as im:
            im.load()
    assert files(tmp_path / "archive") == ["a.png", "b.png"] and claimed(tmp_path) == []


def _folders(root: Path) -> lifecycle.Folders:
    for d in ("inbox", "processed", "archive", "quarantine", "work"):
        (root / d).mkdir(exist_ok=True)
    return lifecycle.Folders({k: str(root / v) for k, v in (
        ("inbox", "inbox"), ("output", "processed"), ("archive", "archive"),
        ("quarantine", "quarantine"), ("work", "work"))})


def test_a_fate_carried_out_but_never_logged_is_logged_at_the_next_start(
        tmp_path: Path) -> None:
    """What a daemon killed between a fate's move and its log line leaves, made with the
    daemon's own code: the next start writes each missing line once (``recovered``), drops
    the records, and writes nothing for a claim that was never completed."""
    folders = _folders(tmp_path)
    # archived after its outputs were published
    make_image(tmp_path / "inbox" / "done.png", seed=1)
    done = claiming.claim(folders, str(tmp_path / "inbox" / "done.png"), 1, time.time())
    out = tmp_path / "processed" / "done_thumbnail.png"
    done.outputs = (("thumbnail", str(out)),)
    claiming.save_record(done)
    make_image(out, seed=1)
    moves.archive(folders, done)
    # quarantined, sidecar and all
    (tmp_path / "inbox" / "bad.png").write_bytes(b"not a png at all")
    bad = claiming.claim(folders, str(tmp_path / "inbox" / "bad.png"), 2, time.time())
    moves.quarantine(folders, bad, {"reason": "not-an-image", "error": "no decoder",
                                        "error_type": "RejectedInput"})
    # a claim being made: its record written, the file not yet renamed in
    make_image(tmp_path / "inbox" / "mid.png", seed=2)
    mid = claiming.Claim(3, "mid.png", str(tmp_path / "work" / "tok-mid.png"),
                          detected_at=1.0, claimed_at=2.0, token="tok-mid.png")
    claiming.save_record(mid)
    assert len(list((tmp_path / "work").glob("*.claim"))) == 3
    d = Daemon(tmp_path)
    try:
        d.wait_for("file.processed", input="mid.png")
        drop(tmp_path, "later.png")
        d.wait_for("file.processed", input="later.png")
    finally:
        assert d.stop() == 0
    (p,) = d.seen("file.processed", input="done.png")
    assert p["recovered"] is True and p["outputs"] == [str(out)]
    assert p["claim"] == done.token  # what a consumer deduplicates by
    (q,) = d.seen("file.quarantined", input="bad.png")
    assert q["recovered"] is True and q["reason"] == "not-an-image"
    assert q["quarantined_as"] == str(tmp_path / "quarantine" / "bad.png")
    assert not d.seen("file.processed", input="mid.png")[0].get("recovered")
    assert sorted(d.fates().values()) == [1, 1, 1, 1]
    assert list((tmp_path / "work").glob("*.claim")) == []


@pytest.mark.timeout(300)
def test_kill_9_storms_leave_every_input_exactly_one_fate_line(tmp_path: Path) -> None:
    """SIGKILL the daemon again and again while a burst flows, restarting it each time: in the
    end every input has exactly one fate line over all the runs, and is archived once."""
    rnd = random.Random(12)
    _folders(tmp_path)
    names = [f"k{i:02d}.png" for i in range(40)]
    stage = tmp_path / "stage"
    for i, n in enumerate(names):
        make_image(stage / n, size=(120, 90), seed=i)
    runs: list[Daemon] = []
    for n in names:
        os.rename(stage / n, tmp_path / "inbox" / n)
    for _ in range(8):
        d = Daemon(tmp_path, "-j", "2")
        runs.append(d)
        time.sleep(rnd.uniform(0.05, 0.6))  # varies where the kill lands, nothing waits on it
        d.stop(signal.SIGKILL)
    final = Daemon(tmp_path, "-j", "2")
    runs.append(final)
    try:
        wait_until(lambda: len(list((tmp_path / "archive").iterdir())) == len(names) or None,
                   120, "every input archived")
        wait_until(lambda: sum(len(r.fates()) for r in runs) >= len(names) or None, 30,
                   "every fate line")
    finally:
        assert final.stop() == 0
    # one fate per input; a kill in the instant between a line and its record's removal may
    # repeat it, marked recovered, under the same claim (see the README): counted once
    claims: dict[str, set[str]] = {}
    first_hand: dict[str, int] = {}
    for r in runs:
        for e in r.events:
            if e["event"] in ("file.processed", "file.quarantined", "file.vanished"):
                claims.setdefault(e["input"], set()).add(e["claim"])
                if not e.get("recovered"):
                    first_hand[e["input"]] = first_hand.get(e["input"], 0) + 1
    assert {n: len(c) for n, c in claims.items()} == dict.fromkeys(names, 1)
    assert max(first_hand.values()) == 1
    assert files(tmp_path / "archive") == sorted(names)
    assert list((tmp_path / "work").glob("*.claim")) == []


def test_a_write_that_fails_only_for_one_input_while_others_succeed_gives_up_early(
        tmp_path: Path) -> None:
    """The evidence rule: the same write works for the others, so after a few failures the
    fault is taken to be this input's, well before retry_max."""
    (tmp_path / "processed" / "locked").mkdir(parents=True)
    (tmp_path / "processed" / "locked").chmod(0o555)
    d = Daemon(tmp_path, "--retry-max", "50", prefix=_unprivileged(),
               env={"WATCHER_RETRY_BACKOFF": "0.2", "WATCHER_RETRY_BACKOFF_MAX": "0.3"})
    try:
        make_image(tmp_path / "inbox" / "locked" / "x.png")
        for i in range(60):
            drop(tmp_path, f"ok{i}.png")
            d.wait_for("file.processed", input=f"ok{i}.png")
            if d.seen("file.quarantined", input="locked/x.png"):
                break
        q = d.wait_for("file.quarantined", input="locked/x.png", timeout=10)[0]
    finally:
        (tmp_path / "processed" / "locked").chmod(0o755)
        assert d.stop() == 0
    assert q["reason"] == "gave-up" and "other inputs succeeded" in q["error"]
    assert len(d.seen("file.retried", input="locked/x.png")) < 10
    assert (tmp_path / "quarantine" / "locked" / "x.png").is_file()


def test_a_file_written_on_after_its_claim_is_made_again_from_what_is_there(
        tmp_path: Path) -> None:
    """Someone else's open and close made the file look complete while its writer still held
    it: the writer's later bytes land in the claimed file, and the daemon, seeing it changed
    under the worker, makes it again from the whole file."""
    (tmp_path / "watcher.toml").write_text(SLOW_TOML)
    d = Daemon(tmp_path, "--workers", "1", "--config", str(tmp_path / "watcher.toml"))
    try:
        crashers.slow_image(str(tmp_path / "inbox" / "slow.png"), 3.0)  # the worker is busy
        d.wait_for("file.queued", input="slow.png")
        whole = (make_image(tmp_path / "src" / "x.png", size=(400, 300))).read_bytes()
        with open(tmp_path / "inbox" / "x.png", "wb", buffering=0) as writer:
            writer.write(whole[: len(whole) // 2])
            with open(tmp_path / "inbox" / "x.png", "ab"):
                pass  # another program's close: a close-write event
            d.wait_for("file.queued", input="x.png")
            writer.write(whole[len(whole) // 2:])
        done = d.wait_for("file.processed", input="x.png", timeout=60)[0]
    finally:
        assert d.stop() == 0
    assert [e["reason"] for e in d.seen("file.retried", input="x.png")] == ["changed"]
    assert (tmp_path / "archive" / "x.png").read_bytes() == whole
    with Image.open(done["outputs"][0]) as im:
        im.load()
    assert d.fates()["x.png"] == 1


def test_a_full_output_disk_is_retried_and_the_input_kept_until_there_is_room(
        tmp_path: Path, tmpfs) -> None:
    out, filler, d = _full_folder_daemon(tmp_path, tmpfs, "processed")
    try:
        drop(tmp_path, "x.png", size=(300, 200))
        r = d.wait_for("file.retried", input="x.png")[0]
        assert r["reason"] == "write-failed" and "No space left" in r["error"]
        assert claimed(tmp_path) == ["x.png"]
        assert [p.name for p in out.iterdir()] == ["filler.bin"]  # no partial, no temp
        filler.unlink()
        done = d.wait_for("file.processed", input="x.png", timeout=30)[0]
    finally:
        assert d.stop() == 0
    with Image.open(done["outputs"][0]) as im:
        im.load()
    assert d.fates()["x.png"] == 1 and files(tmp_path / "quarantine") == []


def test_a_full_work_disk_leaves_the_input_in_the_inbox_until_it_can_be_claimed(
        tmp_path: Path, tmpfs) -> None:
    root = tmpfs("root", "1m")
    for name in ("inbox", "processed", "archive", "quarantine", "work"):
        (root / name).mkdir()
    d = Daemon(root, env={"WATCHER_RETRY_BACKOFF": "0.2"})
    filler = None
    try:
        make_image(root / "src.png", size=(200, 150))
        filler = fill(root)
        os.rename(root / "src.png", root / "inbox" / "x.png")  # a rename needs no room
        d.wait_for("file.claim_failed", input="x.png", timeout=30)
        assert (root / "inbox" / "x.png").is_file() and claimed(root) == []
        # a file that cannot be claimed is not "ok, 0 waiting"
        sick = wait_until(lambda: (r := run_cli("health", "--work", str(root / "work")))
                          .returncode == 1 and r, 20, "health to say degraded")
        assert "x.png" in sick.stdout or "heartbeat" in sick.stdout, sick.stdout
        filler.unlink()
        filler = None
        d.wait_for("file.processed", input="x.png", timeout=60)
    finally:
        if filler is not None:
            filler.unlink()
        assert d.stop() == 0
    assert d.fates()["x.png"] == 1 and files(root / "archive") == ["x.png"]


def test_an_empty_file_refilled_after_its_close_gets_one_fate(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        data = make_image(tmp_path / "src" / "e.png").read_bytes()
        (tmp_path / "inbox" / "e.png").write_bytes(b"")  # created and closed empty
        time.sleep(0.3)  # the writer comes back, as the defect's did
        with open(tmp_path / "inbox" / "e.png", "ab") as f:
            f.write(data)
        d.wait_for("file.processed", input="e.png")
        drop(tmp_path, "after.png")  # a later file: the empty one had no second fate meanwhile
        d.wait_for("file.processed", input="after.png")
    finally:
        assert d.stop() == 0
    assert d.fates()["e.png"] == 1 and d.seen("file.quarantined") == []
    assert files(tmp_path / "archive") == ["after.png", "e.png"]


TWO_TOML = """
[pipelines.a]
steps = ["tests.crashers.slow", "thumbnail(64, 64)"]
[pipelines.b]
steps = ["thumbnail(32, 32)"]
[output]
pipelines = ["a", "b"]
"""


def test_a_conflict_at_a_later_output_leaves_no_orphan_of_the_earlier(tmp_path: Path) -> None:
    """Someone writes the second output's name while the input is processed: the attempt's
    first output (published before the conflict) is removed, the input is made again under
    free names, and no output is left that no fate line names."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "two.toml").write_text(TWO_TOML)
    d = Daemon(tmp_path, "-c", str(tmp_path / "conf" / "two.toml"))
    try:
        (tmp_path / "stage").mkdir()
        crashers.slow_image(str(tmp_path / "stage" / "x.png"), 1.5)
        os.rename(tmp_path / "stage" / "x.png", tmp_path / "inbox" / "x.png")
        d.wait_for("file.queued", input="x.png")
        (tmp_path / "processed" / "x_b.png").write_bytes(b"someone else's")
        done = d.wait_for("file.processed", input="x.png", timeout=60)[0]
    finally:
        assert d.stop() == 0
    assert d.seen("file.retried", input="x.png", reason="output-conflict")
    assert sorted(Path(p).name for p in done["outputs"]) == ["x_a.png", "x_b_2.png"]
    assert files(tmp_path / "processed") == ["x_a.png", "x_b.png", "x_b_2.png"]
    assert (tmp_path / "processed" / "x_b.png").read_bytes() == b"someone else's"
