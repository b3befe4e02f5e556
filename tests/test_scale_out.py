"""Scaling out: several daemons on one inbox (each claims into its own work folder; a dead
one's claims are recovered by the age rule or by command), and the daemon on a Dask cluster.
Real daemons as subprocesses, real kill -9, deadlines everywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, make_image, run_cli, wait_until
from tests.test_cli import tagged_processes
from tests.test_watch import Daemon, assert_no_temps, files
from watcher import lifecycle
from watcher.health import HEARTBEAT

pytestmark = pytest.mark.integration

needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="the dask extra is not installed "
                                       "(pip install 'watcher[dask]'); scripts/test installs it")


def folders(root: Path, instance: str) -> lifecycle.Folders:
    return lifecycle.Folders({"inbox": str(root / "inbox"), "output": str(root / "out"),
                              "archive": str(root / "archive"),
                              "quarantine": str(root / "quarantine"),
                              "work": str(root / "work" / instance)},
                             work_root=str(root / "work"))


def test_recover_claims_by_age_and_by_name_never_its_own(tmp_path: Path) -> None:
    mine = folders(tmp_path, "me")
    mine.check()
    for inst, age in (("fresh", 5.0), ("old", 1000.0), ("named", 5.0)):
        d = tmp_path / "work" / inst / "sub"
        d.mkdir(parents=True)
        (d / f"{inst}.jpg").write_bytes(b"claimed")
        beat = tmp_path / "work" / inst / HEARTBEAT
        beat.write_text("{}")
        t = time.time() - age
        os.utime(beat, (t, t))
    (tmp_path / "work" / "me" / "mine.jpg").write_bytes(b"my own claim")
    moved = lifecycle.recover_claims(mine, max_age=600)
    assert [Path(d).relative_to(tmp_path / "inbox").as_posix() for _, d in moved] == \
        ["sub/old.jpg"]
    moved = lifecycle.recover_claims(mine, max_age=600, only=["named"])
    assert [Path(d).name for _, d in moved] == ["named.jpg"]
    assert (tmp_path / "work" / "fresh" / "sub" / "fresh.jpg").exists()
    assert (tmp_path / "work" / "me" / "mine.jpg").exists()


def test_requeue_claims_of_a_dead_instance_by_command(tmp_path: Path) -> None:
    (tmp_path / "work" / "gone").mkdir(parents=True)
    (tmp_path / "work" / "gone" / "x.jpg").write_bytes(b"left behind")
    for d in ("inbox", "out", "archive", "quarantine"):
        (tmp_path / d).mkdir()
    cmd = [sys.executable, "-m", "watcher", "requeue", "--inbox", str(tmp_path / "inbox"),
           "--output", str(tmp_path / "out"), "--archive", str(tmp_path / "archive"),
           "--quarantine", str(tmp_path / "quarantine"), "--work", str(tmp_path / "work"),
           "--instance", "me", "--claims-of", "gone"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "inbox" / "x.jpg").read_bytes() == b"left behind"
    assert "requeued 1 file(s)" in proc.stderr


@pytest.mark.timeout(180)
def test_two_daemons_share_an_inbox_and_one_is_killed(tmp_path: Path) -> None:
    names = [f"s{i:03d}.png" for i in range(100)]
    a = Daemon(tmp_path, "--instance", "a", "--workers", "1", "--max-in-flight", "30")
    b = Daemon(tmp_path, "--instance", "b", "--workers", "1", "--stale-claims-after", "3")
    try:
        for n in names:  # made aside, then renamed in: a burst
            make_image(tmp_path / "src" / n, size=(1000, 750), seed=hash(n) % 50)
        for n in names:
            os.rename(tmp_path / "src" / n, tmp_path / "inbox" / n)
        a.wait_for("file.processed", count=5, timeout=60)
        wait_until(lambda: len(files(tmp_path / "work" / "a")) >= 5, 30,
                   "daemon a to hold claims")
        a.kill()  # SIGKILL: its claims stay in work/a, its heartbeat stops
        wait_until(lambda: not tagged_processes(a.tag), 15, "a's workers to exit")
        left = [f for f in files(tmp_path / "work" / "a") if not f.endswith(".watcher-tmp")]
        assert left, "a held no claims when it was killed"
        wait_until(lambda: len(files(tmp_path / "archive")) == len(names), 120,
                   "every input archived")
        recovered = {Path(e["claim"]).name for e in b.seen("claim.recovered")}
        assert recovered == {Path(x).name for x in left}
    finally:
        if a.proc.poll() is None:
            a.kill()
        assert b.stop() == 0
    assert files(tmp_path / "archive") == names  # each exactly once: no name_2 copies
    assert files(tmp_path / "processed") == sorted(n.replace(".png", "_thumbnail.png")
                                                   for n in names)
    assert not (tmp_path / "work" / "a").exists() or files(tmp_path / "work" / "a") == []
    assert files(tmp_path / "inbox") == [] and files(tmp_path / "work") == []
    assert files(tmp_path / "quarantine") == []
    assert_no_temps(tmp_path)
    for n in names:
        with Image.open(tmp_path / "processed" / n.replace(".png", "_thumbnail.png")) as im:
            im.load()
    # both did work, and no input got two fates from the live daemon
    assert a.fates() and b.fates()
    assert set(b.fates().values()) == {1}


@needs_dask
def test_daemon_on_a_dask_cluster_processes_and_quarantines_like_local(tmp_path: Path) -> None:
    results = {}
    for ex in ("local", "dask-local"):
        root = tmp_path / ex
        root.mkdir()
        d = Daemon(root, "--executor", ex, "--workers", "2")
        try:
            for i, fmt in enumerate(["PNG", "JPEG", "WEBP", "TIFF"]):
                make_image(root / "inbox" / f"seed{i}.{fmt.lower()}", size=(300, 200), fmt=fmt,
                           seed=i)
            (root / "inbox" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
            d.wait_for("file.processed", count=4, timeout=90)
            d.wait_for("file.quarantined", count=1, timeout=60)
            if ex == "dask-local":
                assert d.seen("cluster.connected", executor="dask-local")
        finally:
            assert d.stop() == 0
        results[ex] = (files(root / "archive"), files(root / "processed"),
                       files(root / "quarantine"),
                       {n: (root / "processed" / n).read_bytes()
                        for n in files(root / "processed")})
        assert_no_temps(root)
    assert results["local"] == results["dask-local"]
    assert "broken.jpg" in results["local"][2]


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """A real cluster from the command line: `dask scheduler` and `dask worker` processes on
    127.0.0.1, as the README sets one up on several machines."""
    dask = Path(sys.executable).parent / "dask"
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "dask.log", "w")  # noqa: SIM115
    elsewhere = tmp_path / "worker-cwd"  # the workers' working folder is not the coordinator's
    elsewhere.mkdir()
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=log, stderr=log, env=env)]
    try:
        wait_until(sched_file.exists, 60, "the scheduler to write its address")
        procs.append(subprocess.Popen(
            [str(dask), "worker", "--scheduler-file", str(sched_file), "--nworkers", "2",
             "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            stdout=log, stderr=log, env=env, cwd=elsewhere))
        address = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()


@needs_dask
@pytest.mark.timeout(180)
def test_daemon_with_executor_dask_on_a_cli_started_cluster(tmp_path: Path,
                                                            dask_cluster: str) -> None:
    root = tmp_path / "d"
    root.mkdir()
    cfg = root / "watcher.toml"
    cfg.write_text(f'[engine]\nexecutor = "dask"\nscheduler = "{dask_cluster}"\n')
    d = Daemon(root, "-c", str(cfg))
    try:
        assert d.seen("cluster.connected", executor="dask")
        for i, fmt in enumerate(["PNG", "JPEG", "WEBP"]):
            make_image(root / "inbox" / f"seed{i}.{fmt.lower()}", size=(300, 200), fmt=fmt,
                       seed=i)
        (root / "inbox" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        d.wait_for("file.processed", count=3, timeout=90)
        d.wait_for("file.quarantined", count=1, timeout=60)
    finally:
        assert d.stop() == 0
    assert files(root / "archive") == ["seed0.png", "seed1.jpeg", "seed2.webp"]
    assert files(root / "processed") == ["seed0_thumbnail.png", "seed1_thumbnail.jpeg",
                                         "seed2_thumbnail.webp"]
    assert "broken.jpg" in files(root / "quarantine")
    assert_no_temps(root)


@needs_dask
@pytest.mark.timeout(180)
def test_a_batch_with_relative_paths_on_a_cli_started_cluster(tmp_path: Path,
                                                              dask_cluster: str) -> None:
    """Relative inputs and output folder, on workers whose working folder is another: the
    paths are made absolute at submit time, every input is made, no temp is left anywhere."""
    job = tmp_path / "job"
    for i in range(4):
        make_image(job / "corpus" / f"p{i}.jpg", size=(300, 200), seed=i)
    done = run_cli("batch", "corpus", "-o", "out", "--executor", "dask", "--scheduler",
                   dask_cluster, "--report", "r.json", "--no-progress", cwd=job, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((job / "r.json").read_text())
    assert report["totals"]["succeeded"] == 4, report
    assert files(job / "out") == [f"p{i}_thumbnail.jpg" for i in range(4)]
    assert_no_temps(tmp_path)
    assert not (tmp_path / "worker-cwd" / "out").exists()  # nothing written where workers run
