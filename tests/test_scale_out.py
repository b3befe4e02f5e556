"""Scaling out: several daemons on one inbox (each claims into its own work folder; a dead
one's claims are recovered by the age rule or by command), and the daemon on a Dask cluster.
Real daemons as subprocesses, real kill -9, deadlines everywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import ROOT, json_lines, make_image, run_cli, wait_until
from tests.test_cli import tagged_processes
from tests.test_watch import Daemon, assert_no_temps, claimed, files
from watcher.ops.health import HEARTBEAT
from watcher.watch import lifecycle

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
        recovered = {Path(e["claim_path"]).name for e in b.seen("claim.recovered")}
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


class CliCluster:
    """`dask scheduler` on a fixed port and `dask worker` processes, each killable and
    restartable, as an operator's cluster is: the scheduler comes back on the same address."""

    def __init__(self, tmp_path: Path, workers: int = 2,
                 env: dict[str, str] | None = None) -> None:
        self.dask = Path(sys.executable).parent / "dask"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.n = workers
        self.env = {**os.environ, "PYTHONPATH": str(ROOT),
                    "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0", **(env or {})}
        self.cwd = tmp_path / "cluster-cwd"
        self.cwd.mkdir()
        self.log = open(tmp_path / "dask.log", "a")  # noqa: SIM115
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.start()

    def start(self) -> None:
        self.scheduler = subprocess.Popen(
            [str(self.dask), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-dashboard"], stdout=self.log, stderr=self.log, env=self.env, cwd=self.cwd)
        self.workers = [subprocess.Popen(
            [str(self.dask), "worker", self.address, "--nthreads", "1", "--no-dashboard",
             "--host", "127.0.0.1"], stdout=self.log, stderr=self.log, env=self.env,
            cwd=self.cwd) for _ in range(self.n)]
        from distributed import Client

        with Client(self.address, timeout=60) as c:
            c.wait_for_workers(self.n, timeout=60)

    def kill(self) -> None:
        for p in [*self.workers, *([self.scheduler] if self.scheduler else [])]:
            p.kill()
            p.wait(30)

    def close(self) -> None:
        for p in [*self.workers, *([self.scheduler] if self.scheduler else [])]:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.log.close()


# the coordinator's client gives up its own reconnection after this; watcher's then takes over
FAST_CONNECT = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"}


@needs_dask
@pytest.mark.timeout(240)
def test_a_batch_waits_out_a_scheduler_outage_and_finishes(tmp_path: Path) -> None:
    """SIGKILL the scheduler and its workers mid-batch, keep them away longer than the client's
    own reconnection (3 s here), bring them back on the same address: the batch reconnects,
    runs what was lost again uncharged, finishes with every input made, no temp left."""
    token = (os.getpid() + 11) % 256
    for m in crashers.started_markers(token):
        os.unlink(m)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        crashers.slow_marked_image(str(src / f"{i}.png"), 1.0, token)
    cluster = CliCluster(tmp_path)
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "batch", str(src), "--out", str(tmp_path / "out"),
             "--ops", "tests.crashers.slow_marked", "--executor", "dask", "--scheduler",
             cluster.address, "--report", str(tmp_path / "r.json"), "--no-progress",
             "--log-format", "json", "--log-level", "info"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **FAST_CONNECT})
        wait_until(lambda: proc.poll() is not None or crashers.started_markers(token), 60,
                   "a task to start")
        cluster.kill()
        time.sleep(8)  # the client has given up by now (3 s)
        assert proc.poll() is None, "the batch ended during the outage"
        cluster.start()
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.close()
        for m in crashers.started_markers(token):
            os.unlink(m)
    events = [e.get("event") for e in json_lines(out)]
    assert proc.returncode == 0, out[-3000:]
    assert "cluster.lost" in events and "cluster.reconnected" in events, events
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["succeeded"] == 6, report
    assert len(list((tmp_path / "out").glob("*.png"))) == 6
    assert_no_temps(tmp_path / "out")


@needs_dask
@pytest.mark.timeout(240)
def test_the_daemon_is_degraded_during_an_outage_and_resumes(tmp_path: Path) -> None:
    """The daemon on a CLI cluster that loses its scheduler: health is not ok and names the
    outage, new drops wait; once the cluster is back they are processed, health is ok again;
    SIGTERM then exits 0."""
    cluster = CliCluster(tmp_path)
    root = tmp_path / "d"
    root.mkdir()
    cfg = root / "conf.toml"
    cfg.write_text(f'[engine]\nexecutor = "dask"\nscheduler = "{cluster.address}"\n')
    d = Daemon(root, "-c", str(cfg), env=FAST_CONNECT)
    try:
        make_image(root / "inbox" / "before.png", size=(200, 150), seed=1)
        d.wait_for("file.processed", input="before.png", timeout=60)
        cluster.kill()
        d.wait_for("cluster.lost", timeout=30)
        make_image(root / "stage" / "during.png", size=(200, 150), seed=2)
        os.rename(root / "stage" / "during.png", root / "inbox" / "during.png")
        sick = wait_until(lambda: (r := run_cli("health", "--work", str(root / "work")))
                          .returncode == 1 and r, 30, "health to say degraded")
        assert "cannot be reached" in sick.stdout, sick.stdout
        time.sleep(5)  # past the client's own reconnection
        assert not d.seen("file.processed", input="during.png")
        cluster.start()
        d.wait_for("cluster.reconnected", timeout=60)
        d.wait_for("file.processed", input="during.png", timeout=60)
        wait_until(lambda: run_cli("health", "--work", str(root / "work")).returncode == 0,
                   30, "health to be ok again")
    finally:
        code = d.stop()
        cluster.close()
    assert code == 0
    assert set(d.fates().values()) == {1} and len(d.fates()) == 2
    assert_no_temps(root)


def _batch_on(cluster: CliCluster, tmp_path: Path, token: int, n: int,
              *args: str) -> subprocess.Popen[str]:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        crashers.slow_marked_image(str(src / f"{i}.png"), 1.0, token)
    return subprocess.Popen(
        [sys.executable, "-m", "watcher", "batch", str(src), "--out", str(tmp_path / "out"),
         "--ops", "tests.crashers.slow_marked", "--executor", "dask", "--scheduler",
         cluster.address, "--report", str(tmp_path / "r.json"), "--no-progress",
         "--log-format", "json", "--log-level", "info", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **FAST_CONNECT})


@needs_dask
@pytest.mark.timeout(180)
@pytest.mark.parametrize("end", ["sigterm", "cluster_wait"])
def test_a_batch_in_an_outage_ends_with_its_report(tmp_path: Path, end: str) -> None:
    """The cluster never comes back: a SIGTERM ends the batch at once with 143, or
    ``cluster_wait`` (4 s here) gives up with 1; either way the report is written, what was
    not made is ``cancelled``, and no traceback is printed."""
    token = (os.getpid() + 13 + len(end)) % 256
    for m in crashers.started_markers(token):
        os.unlink(m)
    cluster = CliCluster(tmp_path)
    proc = None
    try:
        conf = tmp_path / "wait.toml"
        conf.write_text("[engine]\ncluster_wait = 4\n")
        proc = _batch_on(cluster, tmp_path, token, 6,
                         *(["-c", str(conf)] if end == "cluster_wait" else []))
        wait_until(lambda: proc.poll() is not None or crashers.started_markers(token), 60,
                   "a task to start")
        cluster.kill()
        if end == "sigterm":
            time.sleep(6)
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.close()
        for m in crashers.started_markers(token):
            os.unlink(m)
    assert proc.returncode == (143 if end == "sigterm" else 1), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    items = json.loads((tmp_path / "r.json").read_text())["items"]
    assert len(items) == 6 and {i["status"] for i in items} <= {"ok", "cancelled"}
    assert any(i["status"] == "cancelled" for i in items)
    if end == "cluster_wait":
        assert "cluster.gave_up" in [e.get("event") for e in json_lines(out)]


@needs_dask
@pytest.mark.timeout(180)
def test_only_the_tasks_a_dead_worker_had_started_are_charged(tmp_path: Path) -> None:
    """Three slow inputs on two workers of one thread: Dask assigns the third to one of them
    to wait. With allowed-failures 0 every death is final for the tasks Dask holds on that
    worker; both workers are SIGKILLed (their nannies start new ones): the two that were
    running are charged ``worker-crashed`` with their worker's pid, the one that waited is run
    again uncharged and made."""
    token = (os.getpid() + 17) % 256
    for m in crashers.started_markers(token):
        os.unlink(m)
    cluster = CliCluster(tmp_path, env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    proc = None
    try:
        src = tmp_path / "in"
        src.mkdir()
        for i in range(3):
            crashers.slow_marked_image(str(src / f"{i}.png"), 6.0, token)
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "batch", str(src), "--out", str(tmp_path / "out"),
             "--ops", "tests.crashers.slow_marked", "--executor", "dask", "--scheduler",
             cluster.address, "--report", str(tmp_path / "r.json"), "--no-progress",
             "--log-format", "json", "--log-level", "info"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        started = wait_until(lambda: len(crashers.started_markers(token)) >= 2 and
                             crashers.started_markers(token), 60, "two tasks to start")
        pids = {int(Path(m).name.split(".")[-2]) for m in started}
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.close()
        for m in crashers.started_markers(token):
            os.unlink(m)
    items = json.loads((tmp_path / "r.json").read_text())["items"]
    crashed = [i for i in items if i["reason"] == "worker-crashed"]
    assert len(crashed) == 2, items
    assert {i["worker_pid"] for i in crashed} == pids, (items, pids)
    assert [i["status"] for i in items].count("ok") == 1, out[-3000:]
    assert "worker.died" in [e.get("event") for e in json_lines(out)]
    assert_no_temps(tmp_path / "out")


@needs_dask
@pytest.mark.timeout(180)
def test_a_killed_coordinator_leaves_no_temp_after_the_rerun(tmp_path: Path) -> None:
    """SIGKILL the batch (the coordinator) while its tasks run on a CLI cluster: the cluster
    drops its tasks (those running write nothing, or remove what they wrote), and the rerun of
    the same batch makes every output and leaves no temp file."""
    token = (os.getpid() + 19) % 256
    for m in crashers.started_markers(token):
        os.unlink(m)
    cluster = CliCluster(tmp_path)
    try:
        src = tmp_path / "in"
        src.mkdir()
        for i in range(4):
            crashers.slow_marked_image(str(src / f"{i}.png"), 2.0, token)
        cmd = [sys.executable, "-m", "watcher", "batch", str(src), "--out", str(tmp_path / "out"),
               "--ops", "tests.crashers.slow_marked", "--executor", "dask", "--scheduler",
               cluster.address, "--report", str(tmp_path / "r.json"), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
        wait_until(lambda: len(crashers.started_markers(token)) >= 2 or None, 60,
                   "two tasks to start")
        first.kill()
        first.wait(30)
        time.sleep(3)  # the running tasks end meanwhile, cancelled
        assert_no_temps(tmp_path / "out")
        again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env,
                               timeout=120, check=False)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        cluster.close()
        for m in crashers.started_markers(token):
            os.unlink(m)
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["succeeded"] == 4
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
    assert_no_temps(tmp_path / "out")


@needs_dask
@pytest.mark.timeout(180)
def test_a_daemon_sigterm_during_an_outage_exits_0_and_keeps_its_claims(tmp_path: Path) -> None:
    """SIGTERM to the daemon while its cluster is gone: it exits 0 at once (no traceback), the
    input it held stays claimed in the work folder, and a later start on a live cluster gives it
    its one fate."""
    cluster = CliCluster(tmp_path)
    root = tmp_path / "d"
    root.mkdir()
    cfg = root / "conf.toml"
    cfg.write_text(f'[engine]\nexecutor = "dask"\nscheduler = "{cluster.address}"\n')
    try:
        d = Daemon(root, "-c", str(cfg), env=FAST_CONNECT)
        try:
            cluster.kill()
            d.wait_for("cluster.lost", timeout=30)
            make_image(root / "stage" / "held.png", size=(200, 150), seed=3)
            os.rename(root / "stage" / "held.png", root / "inbox" / "held.png")
            d.wait_for("file.queued", input="held.png", timeout=30)
            time.sleep(4)  # past the client's own reconnection: watcher's is under way
        finally:
            code = d.stop(timeout=30)
        assert code == 0
        d.stderr = open(root / f"stderr-{d.tag}.log")  # noqa: SIM115 - read what it said
        assert "Traceback" not in d.stderr.read()
        d.stderr.close()
        assert claimed(root) == ["held.png"]
        cluster.start()
        d2 = Daemon(root, "-c", str(cfg))
        try:
            d2.wait_for("file.processed", input="held.png", timeout=60)
        finally:
            assert d2.stop() == 0
    finally:
        cluster.close()
    assert_no_temps(root)
