"""Operations: the systemd notify protocol against a real AF_UNIX datagram socket, `watcher
health`, and the metrics endpoint scraped for real while files flow."""

from __future__ import annotations

import itertools
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import PIL
import pytest
from prometheus_client.parser import text_string_to_metric_families

import watcher
from tests.conftest import ROOT, wait_until
from tests.test_fates import _unprivileged
from tests.test_watch import Daemon, drop
from watcher.errors import QUARANTINE_REASONS, RETRY_REASONS
from watcher.ops import health
from watcher.ops.notify import Notifier

pytestmark = pytest.mark.integration


class NotifySocket:
    """What systemd listens on: a bound AF_UNIX datagram socket, messages collected."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self) -> list[tuple[float, dict[str, str]]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def having(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.collect() if key in m]

    def close(self) -> None:
        self.sock.close()


def short_dir() -> Path:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp paths can be longer
    import tempfile

    return Path(tempfile.mkdtemp(prefix="wn-", dir="/tmp"))


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and not n.ping() and n.watchdog_interval is None


def test_notifier_speaks_the_protocol_to_a_real_socket() -> None:
    d = short_dir()
    s = NotifySocket(d / "notify")
    try:
        n = Notifier({"NOTIFY_SOCKET": s.path, "WATCHDOG_USEC": "400000"})
        assert n.watchdog_interval == pytest.approx(0.2)
        assert n.ready("up")
        assert n.ping(10.0) and not n.ping(10.1) and n.ping(10.25)
        assert n.stopping()
        msgs = [m for _, m in wait_until(lambda: len(s.collect()) >= 4 and s.messages, 5,
                                         "4 datagrams")]
        assert msgs[0]["READY"] == "1" and msgs[0]["STATUS"] == "up"
        assert msgs[0]["MAINPID"] == str(os.getpid())
        assert [m.get("WATCHDOG") for m in msgs[1:3]] == ["1", "1"]
        assert msgs[3]["STOPPING"] == "1"
        n.close()
    finally:
        s.close()


def test_watchdog_pid_of_another_process_disables_pings() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None or os.getpid() == 1


def test_daemon_ready_watchdog_cadence_and_stopping(tmp_path: Path) -> None:
    d = short_dir()
    s = NotifySocket(d / "notify")
    try:
        daemon = Daemon(tmp_path, env={"NOTIFY_SOCKET": s.path, "WATCHDOG_USEC": "1000000"})
        ready = wait_until(lambda: s.having("READY"), 10, "READY=1")
        drop(tmp_path, "a.png")
        daemon.wait_for("file.processed")
        pings = wait_until(lambda: len(s.having("WATCHDOG")) >= 6 and s.having("WATCHDOG"), 15,
                           "six watchdog pings")
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(pings)]
        # scheduled every half of WATCHDOG_USEC: never sooner (a busy machine can only delay
        # them, so no upper bound is asserted here; under the real systemd, scripts/test-deploy
        # checks that a healthy daemon is not killed and a stalled one is)
        assert all(g >= 0.45 for g in gaps), gaps
        assert Notifier({"NOTIFY_SOCKET": s.path,
                         "WATCHDOG_USEC": "1000000"}).watchdog_interval == 0.5
        assert any("processed" in m.get("STATUS", "") for _, m in s.collect())
        assert daemon.stop() == 0
        stopping = wait_until(lambda: s.having("STOPPING"), 5, "STOPPING=1")
        assert stopping[0][0] > ready[0][0]
        assert len(s.having("READY")) == 1
    finally:
        s.close()


def run_health(work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watcher", "health", "--work", str(work),
                           *extra], capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_health_alive_wedged_and_stopped(tmp_path: Path) -> None:
    none = run_health(tmp_path / "work")
    assert none.returncode == 1 and "not running" in none.stdout
    stall = tmp_path / "stall"
    daemon = Daemon(tmp_path, env={"WATCHER_DEBUG_STALL_FILE": str(stall)})
    try:
        ok = run_health(tmp_path / "work")
        assert ok.returncode == 0 and ok.stdout.startswith("ok: pid"), ok.stdout
        stall.touch()  # the supervisor loop wedges
        daemon.wait_for("daemon.stalling")
        bad = wait_until(lambda: (r := run_health(tmp_path / "work", "--max-age", "1.5"))
                         .returncode == 1 and r, 10, "health to notice the stall")
        assert "last ticked" in bad.stdout and "wedged" in bad.stdout
        stall.unlink()
        wait_until(lambda: run_health(tmp_path / "work", "--max-age", "1.5").returncode == 0,
                   10, "health to recover")
    finally:
        stall.unlink(missing_ok=True)
        assert daemon.stop() == 0
    gone = run_health(tmp_path / "work")
    assert gone.returncode == 1 and "stopped" in gone.stdout


def test_health_check_unit(tmp_path: Path) -> None:
    p = str(tmp_path / "hb.json")
    health.write(p, {"state": "running", "in_flight": 2})
    assert health.check(p)[0]
    assert not health.check(p, max_age=5, now=time.time() + 10)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_metrics_endpoint_scraped_while_files_flow(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path, "--metrics-port", str(port), "--pipeline", "thumbnail",
                    "--pipeline", "web")
    try:
        assert scrape(port, "/readyz") == (200, "ready\n")
        assert scrape(port, "/healthz")[0] == 200
        for i in range(20):
            drop(tmp_path, f"m{i}.png", seed=i)
        (tmp_path / "inbox" / "bad.jpg").write_text("not an image")
        mid = scrape(port, "/metrics")[1]  # while they flow
        assert "watcher_queue_depth" in mid and "watcher_workers_alive" in mid
        daemon.wait_for("file.processed", count=20)
        daemon.wait_for("file.quarantined")
        text = wait_until(lambda: (t := scrape(port, "/metrics")[1]) and
                          metric(t, 'watcher_files_processed_total{pipeline="web"}') == 20 and t,
                          10, "the metrics to show 20 processed")
        assert metric(text, 'watcher_files_processed_total{pipeline="thumbnail"}') == 20
        assert metric(text, 'watcher_files_quarantined_total{reason="not-an-image"}') == 1
        assert metric(text, "watcher_file_processing_seconds_count") == 20
        assert metric(text, "watcher_output_bytes_total") > 0
        assert metric(text, "watcher_workers_alive") == 2
        assert scrape(port, "/nope")[0] == 404
    finally:
        assert daemon.stop() == 0


def test_metrics_bind_to_loopback_by_default(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path, "--metrics-port", str(port))
    try:
        listening = daemon.seen("metrics.listening")[0]
        assert listening["host"] == "127.0.0.1" and listening["port"] == port
    finally:
        daemon.stop()


def test_worker_restarts_are_counted(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path, "--metrics-port", str(port), "--workers", "1")
    try:
        pid = daemon.seen("worker.started")[-1]["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        daemon.wait_for("worker.started", count=2)
        wait_until(lambda: metric(scrape(port, "/metrics")[1],
                                  "watcher_worker_restarts_total") == 1, 10, "a counted restart")
        drop(tmp_path, "after.png")
        daemon.wait_for("file.processed")
    finally:
        daemon.stop()


def families(text: str) -> dict[str, Any]:
    """The page parsed by prometheus_client's own text parser (a bad page raises)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    (found,) = [s.value for s in fams[family].samples if s.name == sample and s.labels == labels]
    return found


def test_metrics_parse_follow_the_naming_rules_and_show_every_series_from_the_start(
        tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed").chmod(0o555)  # every write fails: a failure not the input's own
    daemon = Daemon(tmp_path, "--metrics-port", str(port), "--pipeline", "thumbnail",
                    "--pipeline", "web", "--retry-max", "50", prefix=_unprivileged(),
                    env={"WATCHER_RETRY_BACKOFF": "30"})
    try:
        status, start = scrape(port, "/metrics")
        assert status == 200
        fams = families(start)
        # the build, and the daemon's process from /proc
        (build,) = fams["watcher_build_info"].samples
        assert build.name == "watcher_build_info" and build.value == 1
        assert build.labels == {"version": watcher.__version__,
                                "python": platform.python_version(),
                                "pillow": PIL.__version__}
        assert value(fams, "process_resident_memory_bytes", "process_resident_memory_bytes") > 0
        assert value(fams, "process_open_fds", "process_open_fds") > 3
        assert value(fams, "process_cpu_seconds", "process_cpu_seconds_total") > 0
        started = value(fams, "process_start_time_seconds", "process_start_time_seconds")
        assert time.time() - 600 < started <= time.time()
        # every labelled series is there before anything happened, at 0
        for pipeline in ("thumbnail", "web"):
            assert value(fams, "watcher_files_processed", "watcher_files_processed_total",
                         pipeline=pipeline) == 0
        for reason in QUARANTINE_REASONS:
            assert value(fams, "watcher_files_quarantined", "watcher_files_quarantined_total",
                         reason=reason) == 0
        for reason in RETRY_REASONS:
            assert value(fams, "watcher_files_retried", "watcher_files_retried_total",
                         reason=reason) == 0
        assert value(fams, "watcher_input_bytes", "watcher_input_bytes_total") == 0
        assert value(fams, "watcher_retry_waiting", "watcher_retry_waiting") == 0
        # Prometheus' naming: our prefix, counters (and only they) end in _total, units last
        for fam in fams.values():
            assert fam.name.startswith(("watcher_", "process_")), fam.name
            for s in fam.samples:
                assert s.name.endswith("_total") == (fam.type == "counter"), (fam.type, s.name)
        assert "watcher_bytes_in_total" not in start and "_created" not in start
        assert fams["watcher_file_processing_seconds"].type == "histogram"

        drop(tmp_path, "x.png")  # its outputs cannot be written: it waits to retry
        daemon.wait_for("file.retried", input="x.png")
        fams = wait_until(lambda: (f := families(scrape(port, "/metrics")[1])) and value(
            f, "watcher_retry_waiting", "watcher_retry_waiting") == 1 and f, 10,
            "the gauge of files waiting to retry to show 1")
        assert value(fams, "watcher_files_retried", "watcher_files_retried_total",
                     reason="write-failed") == 1
        assert value(fams, "watcher_queue_depth", "watcher_queue_depth") == 1
    finally:
        (tmp_path / "processed").chmod(0o755)
        assert daemon.stop() == 0
    # the stop left it claimed; a daemon that can write takes it up and counts its bytes
    port = free_port()
    daemon = Daemon(tmp_path, "--metrics-port", str(port), "--pipeline", "thumbnail")
    try:
        daemon.wait_for("file.processed", input="x.png", timeout=60)
        # (the gauges follow the heartbeat, once a second)
        fams = wait_until(lambda: (f := families(scrape(port, "/metrics")[1])) and value(
            f, "watcher_output_bytes", "watcher_output_bytes_total") > 0 and value(
            f, "watcher_retry_waiting", "watcher_retry_waiting") == 0 and f, 10,
            "the bytes written to be counted, no file left waiting to retry")
        assert value(fams, "watcher_input_bytes", "watcher_input_bytes_total") == \
            (tmp_path / "archive" / "x.png").stat().st_size
    finally:
        assert daemon.stop() == 0
