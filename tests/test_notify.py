"""Notifications on each fate, for real: a real daemon processing real images, its documents
POSTed to a real HTTP server on 127.0.0.1 (a thread of the test) that answers, fails with 500s,
stalls past the client's timeout and recovers; a real command hook fed on stdin; a hook that
hangs, killed at its timeout; and the config errors refused at start naming the key."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli, wait_until
from tests.test_fates import _unprivileged
from tests.test_ops import free_port, metric, scrape
from tests.test_watch import Daemon, drop
from watcher.fs.files import HOST

pytestmark = pytest.mark.integration

TOKEN = "s3cret-t0ken-never-logged"


class Receiver:
    """A webhook endpoint: ``mode`` is ok (200, documents kept), fail (500) or stall (reads the
    request, then sleeps past the client's timeout without answering in time)."""

    def __init__(self, stall_s: float = 3.0) -> None:
        self.mode = "ok"
        self.stall_s = stall_s
        self.bodies: list[Any] = []  # each accepted POST's JSON
        self.headers: list[dict[str, str]] = []
        self.seen = {"ok": 0, "fail": 0, "stall": 0}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                mode = outer.mode
                with outer.lock:
                    outer.seen[mode] += 1
                if mode == "stall":
                    time.sleep(outer.stall_s)
                    self._answer(503)
                    return
                if mode == "fail":
                    self._answer(500)
                    return
                with outer.lock:
                    outer.bodies.append(json.loads(body))
                    outer.headers.append(dict(self.headers.items()))
                self._answer(200)

            def _answer(self, code: int) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up (a stall)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook?key=abc"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def docs(self) -> list[dict[str, Any]]:
        with self.lock:
            out: list[dict[str, Any]] = []
            for b in self.bodies:
                out.extend(b if isinstance(b, list) else [b])
            return out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def bad(root: Path, name: str) -> Path:
    path = root / "inbox" / name
    path.write_bytes(b"not an image at all, just text\n" * 4)
    return path


def inputs_in_order(daemon: Daemon, event: str) -> list[str]:
    return [e["input"] for e in daemon.seen(event)]


def failures(port: int) -> float:
    return metric(scrape(port, "/metrics")[1], 'watcher_notify_failures_total{sink="webhook"}')


def test_documents_arrive_with_their_content_and_the_token_is_never_logged(
        tmp_path: Path, receiver: Receiver) -> None:
    daemon = Daemon(tmp_path, "--workers", "1", "--notify-url", receiver.url,
                    "--notify-fates", "all", "--notify-headers", "X-Test: yes",
                    env={"WATCHER_NOTIFY_TOKEN": TOKEN})
    try:
        drop(tmp_path, "one.jpg")
        drop(tmp_path, "sub/two.png", size=(80, 60))
        bad(tmp_path, "bad.jpg")
        wait_until(lambda: len(receiver.docs()) >= 3, 60, "three documents")
        processed = {e["input"]: e for e in daemon.wait_for("file.processed", 2)}
        quarantined = daemon.wait_for("file.quarantined")[0]
    finally:
        assert daemon.stop() == 0
    docs = {d["input"]: d for d in receiver.docs()}
    assert sorted(docs) == ["bad.jpg", "one.jpg", "sub/two.png"] and len(receiver.docs()) == 3
    for name, line in processed.items():
        d = docs[name]
        assert d["schema"] == 1 and d["fate"] == "processed" and d["event"] == "file.processed"
        assert d["claim"] == line["claim"] and d["host"] == HOST
        assert d["daemon_pid"] == daemon.proc.pid and d["worker_pid"] == line["worker_pid"]
        assert d["input_path"] == str(tmp_path / "inbox" / name)
        assert d["moved_to"] == line["moved_to"] and d["moved_to"].startswith(
            str(tmp_path / "archive"))
        assert d["reason"] is None and d["error"] is None and d["recovered"] is False
        assert [o["path"] for o in d["outputs"]] == line["outputs"] and d["outputs"]
        for o in d["outputs"]:
            assert o["pipeline"] == "thumbnail" and o["bytes"] == os.path.getsize(o["path"]) > 0
        t = d["timings"]
        assert t["detected_at"] <= t["claimed_at"] <= t["decided_at"]
        assert t["decided_at"].endswith("Z") and t["processing_s"] > 0 and t["total_s"] > 0
        assert d["input_bytes"] == (tmp_path / "archive" / name).stat().st_size
    q = docs["bad.jpg"]
    assert q["fate"] == "quarantined" and q["reason"] == "not-an-image" and q["error"]
    assert q["claim"] == quarantined["claim"] and q["outputs"] == []
    assert q["moved_to"] == quarantined["quarantined_as"]
    for h in receiver.headers:
        assert h["Authorization"] == f"Bearer {TOKEN}" and h["X-Test"] == "yes"
        assert h["Content-Type"] == "application/json"
    daemon_output = json.dumps(daemon.events) + (tmp_path / f"stderr-{daemon.tag}.log").read_text()
    assert TOKEN not in daemon_output and "key=abc" not in daemon_output


def test_a_failing_then_stalled_endpoint_never_holds_up_the_daemon_and_gets_everything(
        tmp_path: Path, receiver: Receiver) -> None:
    port = free_port()
    receiver.mode = "fail"
    daemon = Daemon(tmp_path, "--notify-url", receiver.url, "--notify-fates", "all",
                    "--notify-timeout", "0.5", "--notify-backoff", "0.1",
                    "--notify-backoff-max", "0.4", "--notify-tries", "1000",
                    "--metrics-port", str(port))
    try:
        drop(tmp_path, "first.jpg")
        daemon.wait_for("file.processed")
        fails = daemon.wait_for("notify.failed", 3)  # 500s, retried with back-off
        assert [f["attempt"] for f in fails[:3]] == [1, 2, 3]
        assert all(f["sink"] == "webhook" and f["error"].startswith("HTTP 500") and
                   f["endpoint"] == receiver.url.split("?")[0] and f["for_inputs"] == ["first.jpg"]
                   for f in fails)
        receiver.mode = "stall"
        wait_until(lambda: receiver.seen["stall"] >= 1, 30, "a request to stall on")
        for i in range(5):
            drop(tmp_path, f"during-{i}.jpg", seed=i)
        daemon.wait_for("file.processed", 6)  # the line moves while the endpoint stalls
        assert receiver.mode == "stall" and receiver.docs() == []
        stalled = daemon.wait_for("notify.failed", error=f"{receiver.url.split('?')[0]}: "
                                  "timed out")
        assert stalled[0]["retry_in_s"] > 0
        assert failures(port) >= len(daemon.seen("notify.failed")) - 1 >= 3
        receiver.mode = "ok"
        wait_until(lambda: len(receiver.docs()) >= 6, 60, "every document after recovery")
        assert sorted(d["input"] for d in receiver.docs()) == sorted(
            ["first.jpg", *(f"during-{i}.jpg" for i in range(5))])
        text = wait_until(lambda: (t := scrape(port, "/metrics")[1]) and metric(
            t, 'watcher_notify_delivered_total{sink="webhook"}') == 6 and t, 30, "6 delivered")
        assert metric(text, "watcher_notify_dropped_total") == 0
        assert metric(text, 'watcher_notify_failures_total{sink="webhook"}') == len(
            daemon.seen("notify.failed"))
    finally:
        assert daemon.stop() == 0
    assert not daemon.seen("notify.dropped")


def test_a_full_queue_drops_the_oldest_first_with_a_count(tmp_path: Path,
                                                            receiver: Receiver) -> None:
    port = free_port()
    receiver.mode = "fail"
    daemon = Daemon(tmp_path, "--workers", "1", "--notify-url", receiver.url,
                    "--notify-fates", "all", "--notify-queue", "2", "--notify-backoff", "0.3",
                    "--notify-backoff-max", "0.3", "--notify-tries", "1000",
                    "--metrics-port", str(port))
    try:
        drop(tmp_path, "held.jpg")
        daemon.wait_for("notify.failed")  # the thread holds held.jpg's document, retrying
        for i in range(5):
            drop(tmp_path, f"n{i}.jpg", seed=i)
        daemon.wait_for("file.processed", 6)
        order = inputs_in_order(daemon, "file.processed")
        assert order[0] == "held.jpg"
        wait_until(lambda: sum(e["documents"] for e in daemon.seen("notify.dropped")) >= 3, 30,
                   "three documents dropped")
        assert all(e["why"] == "queue-full" and e["notify_queue"] == 2
                   for e in daemon.seen("notify.dropped"))
        receiver.mode = "ok"
        wait_until(lambda: len(receiver.docs()) >= 3, 30, "the three kept documents")
        time.sleep(1)  # nothing more comes
        assert [d["input"] for d in receiver.docs()] == [order[0], order[4], order[5]]
        assert sum(e["documents"] for e in daemon.seen("notify.dropped")) == 3
        text = scrape(port, "/metrics")[1]
        assert metric(text, 'watcher_notify_dropped_total{why="queue-full"}') == 3
        assert metric(text, "watcher_notify_queue_depth") == 0
    finally:
        assert daemon.stop() == 0


def test_on_stop_a_short_flush_then_the_rest_dropped_with_one_line(
        tmp_path: Path, receiver: Receiver) -> None:
    receiver.mode = "fail"
    daemon = Daemon(tmp_path, "--notify-url", receiver.url, "--notify-fates", "all",
                    "--notify-backoff", "0.2", "--notify-tries", "1000",
                    "--notify-flush", "0.5")
    for i in range(3):
        drop(tmp_path, f"f{i}.jpg", seed=i)
    daemon.wait_for("file.processed", 3)
    assert daemon.stop(timeout=30) == 0
    dropped = daemon.seen("notify.dropped")
    assert len(dropped) == 1 and dropped[0]["why"] == "stopping" and dropped[0]["documents"] == 3
    stopped = daemon.seen("daemon.stopped")[0]
    assert daemon.events.index(dropped[0]) < daemon.events.index(stopped)


def test_a_batch_waits_for_others_and_a_stop_flushes_it_at_once(
        tmp_path: Path, receiver: Receiver) -> None:
    daemon = Daemon(tmp_path, "--notify-url", receiver.url, "--notify-fates", "processed",
                    "--notify-batch", "10", "--notify-batch-delay", "600",
                    "--notify-flush", "20")
    drop(tmp_path, "a.jpg")
    drop(tmp_path, "b.jpg", seed=1)
    bad(tmp_path, "c.jpg")  # quarantined: not a fate asked for
    daemon.wait_for("file.processed", 2)
    daemon.wait_for("file.quarantined")
    assert receiver.bodies == []  # waiting for more (up to 10, for 600 s)
    assert daemon.stop(timeout=30) == 0
    assert len(receiver.bodies) == 1 and isinstance(receiver.bodies[0], list)
    assert sorted(d["input"] for d in receiver.bodies[0]) == ["a.jpg", "b.jpg"]
    assert not daemon.seen("notify.dropped") and not daemon.seen("notify.failed")


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_command_hook_gets_the_documents_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "hook-out.txt"
    hook = script(tmp_path / "hook.sh", 'cat >> "$1"\nprintf "\\n" >> "$1"\n')
    cfg = tmp_path / "w.toml"
    cfg.write_text(f"[notify]\nnotify_command = [{json.dumps(str(hook))}, {json.dumps(str(out))}]"
                   "\nnotify_batch = 2\nnotify_batch_delay = 30\n")  # fates: quarantined
    daemon = Daemon(tmp_path, "-c", str(cfg))
    try:
        drop(tmp_path, "good.jpg")
        bad(tmp_path, "bad1.jpg")
        bad(tmp_path, "bad2.jpg")
        daemon.wait_for("file.quarantined", 2)
        lines = wait_until(lambda: out.exists() and out.read_text().splitlines(), 60,
                           "the hook's output")
    finally:
        assert daemon.stop() == 0
    assert len(lines) == 1  # one run, one array of the two documents
    docs = json.loads(lines[0])
    assert sorted(d["input"] for d in docs) == ["bad1.jpg", "bad2.jpg"]
    assert {d["fate"] for d in docs} == {"quarantined"} and {d["reason"] for d in docs} == {
        "not-an-image"}
    assert daemon.wait_for("file.processed")  # processed, but not asked for: not sent


def test_a_hook_that_hangs_is_killed_at_its_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    hook = script(tmp_path / "hang.sh", 'sleep 300 &\necho $! > "$1"\nwait\n')
    daemon = Daemon(tmp_path, "--notify-command", str(hook), "--notify-command", str(pidfile),
                    "--notify-timeout", "1", "--notify-tries", "1")
    try:
        bad(tmp_path, "bad.jpg")
        failed = daemon.wait_for("notify.failed", timeout=60)[0]
        assert failed["sink"] == "command" and failed["retries_left"] == 0
        assert "retry_in_s" not in failed  # the only try: dropped
        assert "timed out after 1 s and was killed" in failed["error"]
        pid = int(pidfile.read_text())

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False
        wait_until(gone, 10, "the hook's child to be killed with it")
        bad(tmp_path, "bad2.jpg")  # the daemon goes on
        daemon.wait_for("file.quarantined", 2)
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize(("toml", "named"), [
    ('[notify]\nnotify_url = "ftp://example.com/x"\n', "notify.notify_url: expected an http:// "
                                                       "or https:// URL, got scheme 'ftp'"),
    ('[notify]\nnotify_ulr = "http://127.0.0.1:9/"\n', "notify.notify_ulr: unknown key; did you "
                                                       "mean 'notify_url'?"),
    ('[notify]\nnotify_fates = ["sometimes"]\n', "notify.notify_fates[0]: expected one of"),
    ('[notify]\nnotify_headers = ["no colon"]\n', "notify.notify_headers[0]: expected "),
    ('[notify]\nnotify_tries = 0\n', "notify.notify_tries: must be >= 1, got 0"),
    ('[notify]\nnotify_url = "http://127.0.0.1:9/"\nnotify_token_file = "missing.txt"\n',
     "notify.notify_token_file: cannot read "),
    ('[notify]\nnotify_command = ["no-such-hook-xyz"]\n', "notify.notify_command: "
                                                          "'no-such-hook-xyz' is not"),
])
def test_a_bad_notify_config_is_refused_at_start_naming_the_key(tmp_path: Path, toml: str,
                                                                 named: str) -> None:
    (tmp_path / "w.toml").write_text(toml)
    proc = run_cli("watch", "-c", "w.toml", "--inbox", "i", "--output", "o", "--archive", "a",
                   "--quarantine", "q", "--work", "wk", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr
    assert not (tmp_path / "i").exists()  # refused before anything was made


def test_a_bad_url_flag_or_variable_is_refused_naming_it(tmp_path: Path) -> None:
    proc = run_cli("watch", "--notify-url", "gopher://x/", cwd=tmp_path)
    assert proc.returncode == 2 and "--notify-url" in proc.stderr and "usage:" in proc.stderr
    proc = run_cli("check-config", cwd=tmp_path, env={"WATCHER_NOTIFY_URL": "file:///etc"})
    assert proc.returncode == 2 and "WATCHER_NOTIFY_URL: expected an http" in proc.stderr


def test_check_config_prints_the_notify_section_without_the_token(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(TOKEN)
    (tmp_path / "w.toml").write_text('[notify]\nnotify_url = "https://h.example/x"\n'
                                     'notify_token_file = "tok"\nnotify_batch = 5\n')
    proc = run_cli("check-config", "-c", "w.toml", cwd=tmp_path,
                   env={"WATCHER_NOTIFY_TOKEN": "other"})
    assert proc.returncode == 0, proc.stderr
    assert "[notify]" in proc.stdout and "notify_batch = 5" in proc.stdout
    assert f'notify_token_file = {json.dumps(str(tmp_path / "tok"))}' in proc.stdout
    assert TOKEN not in proc.stdout and "other" not in proc.stdout


def test_sigterm_with_notifications_on_exits_promptly_even_mid_stall(
        tmp_path: Path, receiver: Receiver) -> None:
    receiver.mode = "stall"
    receiver.stall_s = 30
    daemon = Daemon(tmp_path, "--notify-url", receiver.url, "--notify-fates", "all",
                    "--notify-timeout", "60", "--notify-flush", "1")
    drop(tmp_path, "x.jpg")
    daemon.wait_for("file.processed")
    wait_until(lambda: receiver.seen["stall"] >= 1, 30, "a stalled request")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.exit_code(timeout=20) == 0  # the flush (1 s) bounds the stalled POST
    assert daemon.seen("notify.dropped", why="stopping")[0]["documents"] == 1


def test_a_reload_moves_notifications_to_the_new_endpoint_and_a_bad_one_keeps_the_old(
        tmp_path: Path, receiver: Receiver) -> None:
    second = Receiver()
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[notify]\nnotify_url = "{receiver.url}"\nnotify_fates = ["all"]\n')
    (tmp_path / "tok").write_text(TOKEN + "\n")
    daemon = Daemon(tmp_path, "-c", str(cfg))
    try:
        drop(tmp_path, "before.jpg")
        wait_until(receiver.docs, 30, "the first document")
        cfg.write_text(f'[notify]\nnotify_url = "{second.url}"\nnotify_fates = ["all"]\n'
                       'notify_token_file = "tok"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("config.reloaded")
        drop(tmp_path, "after.jpg", seed=1)
        wait_until(second.docs, 30, "a document at the new endpoint")
        assert second.headers[0]["Authorization"] == f"Bearer {TOKEN}"  # from the file
        cfg.write_text(f'[notify]\nnotify_url = "{receiver.url}"\n'
                       'notify_token_file = "gone"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_for("config.reload_failed")[0]
        assert "notify.notify_token_file: cannot read" in failed["error"]
        drop(tmp_path, "kept.jpg", seed=2)
        wait_until(lambda: len(second.docs()) >= 2, 30, "the kept endpoint's next document")
    finally:
        assert daemon.stop() == 0
        second.close()
    assert [d["input"] for d in receiver.docs()] == ["before.jpg"]
    assert [d["input"] for d in second.docs()] == ["after.jpg", "kept.jpg"]
    assert TOKEN not in json.dumps(daemon.events)


def test_retries_and_a_gave_up_quarantine_are_notified_with_their_reasons(
        tmp_path: Path, receiver: Receiver) -> None:
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed").chmod(0o555)  # the outputs cannot be written: not the input's fault
    daemon = Daemon(tmp_path, "--retry-max", "2", "--retry-backoff", "0.2",
                    "--retry-backoff-max", "0.3", "--notify-url", receiver.url,
                    "--notify-fates", "retried,quarantined", prefix=_unprivileged())
    try:
        drop(tmp_path, "x.png")
        daemon.wait_for("file.quarantined", input="x.png", timeout=60)
        wait_until(lambda: len(receiver.docs()) >= 3, 30, "two retries and the quarantine")
    finally:
        (tmp_path / "processed").chmod(0o755)
        assert daemon.stop() == 0
    docs = receiver.docs()
    assert [d["fate"] for d in docs] == ["retried", "retried", "quarantined"]
    assert [d["reason"] for d in docs] == ["write-failed", "write-failed", "gave-up"]
    assert [d["transient_failures"] for d in docs] == [1, 2, 3]
    assert "write-failed" in docs[2]["error"] and docs[2]["moved_to"].startswith(
        str(tmp_path / "quarantine"))
    assert len({d["claim"] for d in docs}) == 1 and docs[0]["attempt"] == 1
