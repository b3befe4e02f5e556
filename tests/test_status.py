"""The status page's JSON and its guards, and ``watcher status``, against a real daemon
processing real images: the counts move, the quarantine is listed with reasons, files are served
by id only (traversal attempts get 404s), the token is enforced on another address, a POST
needs the CSRF token, and ``watcher status`` reads the state with and without the page (and
redraws it live in a real terminal)."""

from __future__ import annotations

import http.client
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import crashers
from tests.conftest import ROOT, fill, make_image, run_cli, wait_until
from tests.test_ops import free_port
from tests.test_watch import SLOW_TOML, Daemon, drop
from watcher.ops.status import Board
from watcher.watch.qindex import QuarantineIndex

pytestmark = pytest.mark.integration


def request(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request: the path is sent exactly as given (no normalising)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}),
                        skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def status(port: int, host: str = "127.0.0.1", **headers: str) -> dict[str, Any]:
    code, _, body = request(port, "/status", headers=headers, host=host)
    assert code == 200, body
    return json.loads(body)


def csrf(port: int, **headers: str) -> str:
    code, _, body = request(port, "/", headers=headers)
    assert code == 200
    m = re.search(rb'<meta name="csrf" content="([^"]+)">', body)
    assert m, body[:300]
    return m[1].decode()


def bad_file(root: Path, name: str = "bad.jpg") -> Path:
    """A JPEG cut short: quarantined as truncated."""
    buf = io.BytesIO()
    make_image(root / "whole.jpg", size=(200, 150))
    data = (root / "whole.jpg").read_bytes()
    path = root / "inbox" / name
    buf.write(data[: len(data) // 2])
    path.write_bytes(buf.getvalue())
    return path


def test_the_json_endpoint_shows_the_counts_move_workers_and_the_quarantine(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "watcher.toml").write_text(SLOW_TOML.replace('pipelines = ["slow"]',
                                                             'pipelines = ["slow", "web"]'))
    d = Daemon(tmp_path, "--config", str(tmp_path / "watcher.toml"), "--status-port", str(port),
               "--workers", "2")
    try:
        started = d.seen("status.listening")[0]
        assert started["host"] == "127.0.0.1" and started["port"] == port
        first = wait_until(lambda: (s := status(port)).get("state") and s, 10, "a document")
        assert first["state"] == "running" and first["counts"]["processed"] == 0
        assert first["workers_configured"] == 2 and len(first["throughput"]) == 360
        crashers.slow_image(str(tmp_path / "inbox" / "slow.png"), 3.0)
        busy = wait_until(lambda: [w for w in status(port)["workers"]
                                   if w["input"] == "slow.png"], 15, "a worker on slow.png")
        assert busy[0]["phase"] == "processing" and busy[0]["pid"] > 0
        later = wait_until(lambda: [w for w in status(port)["workers"] if w["input"] ==
                                    "slow.png" and w["elapsed_s"] >= 1.0], 10, "time to pass")
        assert later[0]["pid"] == busy[0]["pid"]
        for i in range(6):
            drop(tmp_path, f"p{i}.png", seed=i)
        bad_file(tmp_path)
        done = wait_until(lambda: (s := status(port))["counts"]["processed"] >= 7 and
                          s["counts"]["quarantined"] >= 1 and s, 30, "the counts to move")
        assert done["counts"]["processed"] == 7 and done["counts"]["quarantined"] == 1
        assert done["quarantine"] == {"total": 1, "by_reason": {"truncated": 1}, "loaded": True}
        assert sum(b["files_s"] for b in done["throughput"]) * 10 == pytest.approx(8)
        assert sum(b["mb_s"] for b in done["throughput"]) > 0
        assert done["per_hour"][-1]["processed"] == 7
        fates = {f["input"]: f for f in done["recent"]}
        assert fates["bad.jpg"]["fate"] == "quarantined" and \
            fates["bad.jpg"]["reason"] == "truncated"
        p0 = fates["p0.png"]
        assert p0["fate"] == "processed" and len(p0["outputs"]) == 2
        code, head, body = request(port, f"/files/output/{p0['id']}/1")
        assert code == 200 and head["content-type"] == "image/jpeg"
        assert body == Path(p0["outputs"][1]).read_bytes()
        assert Image.open(io.BytesIO(body)).size[0] > 0
        page = json.loads(request(port, "/status/quarantine?page=1")[2])
        assert page["total"] == 1 and page["items"][0]["name"] == "bad.jpg"
        assert page["items"][0]["reason"] == "truncated" and page["items"][0]["size"] > 0
        # a preview of what decodes of it (it is a JPEG: served as it is)
        code, head, _ = request(port, f"/files/quarantine/{page['items'][0]['id']}")
        assert code == 200 and head["content-type"] == "image/jpeg"
        assert head["x-content-type-options"] == "nosniff"
        # the page itself, and /metrics beside it
        code, head, html = request(port, "/")
        assert code == 200 and b"<canvas" in html and "script-src 'nonce-" in \
            head["content-security-policy"]
        assert request(port, "/metrics")[0] == 200 and request(port, "/healthz")[0] == 200
    finally:
        assert d.stop() == 0


def test_files_are_served_by_id_only_traversal_attempts_get_404(tmp_path: Path) -> None:
    port = free_port()
    secret = make_image(tmp_path / "secret.png")
    d = Daemon(tmp_path, "--status-port", str(port))
    try:
        drop(tmp_path, "a.png")
        drop(tmp_path, "b.png", seed=2)
        bad_file(tmp_path)
        s = wait_until(lambda: (s := status(port))["counts"]["processed"] == 2 and
                       s["quarantine"]["total"] == 1 and s, 30, "2 processed, 1 quarantined")
        fates = {f["input"]: f for f in s["recent"]}
        qid = json.loads(request(port, "/status/quarantine")[2])["items"][0]["id"]
        a = fates["a.png"]["id"]
        attempts = ["/files/output/../../../etc/passwd", "/files/output/%2e%2e/%2e%2e/etc/passwd",
                    "/files/output/..%2f..%2fetc%2fpasswd",
                    f"/files/output/{a}/0/../../../../etc/passwd",
                    f"/files/quarantine/{qid}/../../etc/passwd",
                    "/files/quarantine/..%2F..%2Fsecret.png",
                    "/files//etc/passwd", "/files/output/-1/0", "/files/output/999999/0",
                    f"/files/output/{fates['a.png']['id']}/5", "/files/quarantine/999999",
                    "/files/quarantine/%31", "/files/" + str(secret), "/" + str(secret),
                    f"/files/quarantine/{qid}%00", "/../../etc/passwd"]
        for path in attempts:
            code, _, body = request(port, path)
            assert code == 404, (path, code, body[:80])
        # a quarantined file swapped for a link to a file elsewhere: not followed
        q = tmp_path / "quarantine" / "bad.jpg"
        q.unlink()
        q.symlink_to(secret)
        assert request(port, f"/files/quarantine/{qid}")[0] == 404
        # an output swapped for a link (and a folder on the way, for a link): not followed
        out = Path(fates["b.png"]["outputs"][0])
        out.unlink()
        out.symlink_to(secret)
        assert request(port, f"/files/output/{fates['b.png']['id']}/0")[0] == 404
        # the one served, by its id
        assert request(port, f"/files/output/{fates['a.png']['id']}/0")[0] == 200
    finally:
        assert d.stop() == 0


def test_a_post_needs_the_csrf_token_and_requeue_and_delete_act(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path, "--status-port", str(port))
    try:
        bad_file(tmp_path, "one.jpg")
        bad_file(tmp_path, "two.jpg")
        wait_until(lambda: status(port)["quarantine"]["total"] == 2, 30, "two quarantined")
        items = {i["name"]: i for i in json.loads(request(port, "/status/quarantine")[2])
                 ["items"]}
        one, two = items["one.jpg"]["id"], items["two.jpg"]["id"]
        token = csrf(port)
        q = tmp_path / "quarantine"
        # nothing destructive by GET; a POST without the token, with a wrong one, or from
        # another origin is refused
        assert request(port, f"/quarantine/{one}/requeue")[0] == 404
        assert request(port, f"/quarantine/{one}/delete")[0] == 404
        assert request(port, f"/quarantine/{one}/requeue", "POST")[0] == 403
        assert request(port, f"/quarantine/{one}/delete", "POST",
                       {"X-CSRF-Token": token[:-1] + "x"})[0] == 403
        assert request(port, f"/quarantine/{one}/delete", "POST",
                       {"X-CSRF-Token": token, "Origin": "http://evil.example"})[0] == 403
        assert request(port, f"/quarantine/{one}/delete", "POST",
                       {"X-CSRF-Token": token, "Host": "evil.example"})[0] == 403
        assert (q / "one.jpg").exists() and (q / "one.jpg.error.json").exists()
        # requeue: back into the inbox, through the daemon again (quarantined again: it is
        # still cut short)
        code, _, body = request(port, f"/quarantine/{one}/requeue", "POST",
                                {"X-CSRF-Token": token,
                                 "Origin": f"http://127.0.0.1:{port}"})
        assert code == 200 and json.loads(body)["requeued"] == "one.jpg", body
        d.wait_for("quarantine.requeued", input="one.jpg")
        d.wait_for("file.quarantined", count=3)
        assert len(d.seen("file.quarantined", input="one.jpg")) == 2
        # delete: the file and its sidecar are gone
        code, _, body = request(port, f"/quarantine/{two}/delete", "POST",
                                {"X-CSRF-Token": token})
        assert code == 200 and json.loads(body)["deleted"] == "two.jpg"
        assert not (q / "two.jpg").exists() and not (q / "two.jpg.error.json").exists()
        assert request(port, f"/quarantine/{two}/delete", "POST",
                       {"X-CSRF-Token": token})[0] == 404  # gone: its id is not known
        s = wait_until(lambda: (s := status(port))["counts"]["deleted"] == 1 and s, 10,
                       "the counts")
        assert s["counts"]["requeued"] == 1 and s["quarantine"]["by_reason"] == {"truncated": 1}
        names = [i["name"] for i in json.loads(request(port, "/status/quarantine")[2])["items"]]
        assert names == ["one.jpg"]
    finally:
        assert d.stop() == 0


def test_another_address_needs_a_token_checked_on_every_request(tmp_path: Path) -> None:
    port = free_port()
    refused = run_cli("watch", "--inbox", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                      "--archive", str(tmp_path / "a"), "--quarantine", str(tmp_path / "q"),
                      "--work", str(tmp_path / "w"), "--status-port", str(port),
                      "--status-host", "127.0.0.2", timeout=60)
    assert refused.returncode == 2 and "ops.status_host" in refused.stderr and \
        "needs a token" in refused.stderr, refused.stderr
    (tmp_path / "token").write_text("s3cret-token-from-a-file\n")
    (tmp_path / "w.toml").write_text(f'[ops]\nstatus_host = "127.0.0.2"\nstatus_port = {port}\n'
                                     f'status_token_file = "{tmp_path / "token"}"\n')
    d = Daemon(tmp_path, "--config", str(tmp_path / "w.toml"))
    try:
        assert d.seen("status.listening")[0]["host"] == "127.0.0.2"
        drop(tmp_path, "a.png")
        d.wait_for("file.processed")
        good = {"Authorization": "Bearer s3cret-token-from-a-file"}
        for path in ("/", "/status", "/status/quarantine", "/metrics", "/healthz",
                     "/files/output/1/0", "/nope"):
            assert request(port, path, host="127.0.0.2")[0] == 401, path
            assert request(port, path, host="127.0.0.2",
                           headers={"Authorization": "Bearer s3cret-token-from-a-fil"})[0] == 401
            assert request(port, path, host="127.0.0.2",
                           headers={"Cookie": "watcher_status_token=nope"})[0] == 401
        wait_until(lambda: status(port, host="127.0.0.2", **good)["counts"]["processed"] == 1,
                   10, "the count, with the token")
        assert request(port, "/metrics", host="127.0.0.2", headers=good)[0] == 200
        # the browser's way in: /?token= sets a cookie and sends it to / without the token
        assert request(port, "/?token=wrong", host="127.0.0.2")[0] == 401
        code, head, _ = request(port, "/?token=s3cret-token-from-a-file", host="127.0.0.2")
        assert code == 303 and head["location"] == "/"
        cookie = head["set-cookie"].split(";")[0]
        assert "HttpOnly" in head["set-cookie"] and "SameSite=Strict" in head["set-cookie"]
        assert request(port, "/", host="127.0.0.2", headers={"Cookie": cookie})[0] == 200
        # not on loopback
        with pytest.raises(OSError):
            request(port, "/status", host="127.0.0.1")
    finally:
        assert d.stop() == 0


def test_a_loopback_page_answers_only_to_a_loopback_host(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path, "--status-port", str(port))
    try:
        assert request(port, "/status", headers={"Host": f"localhost:{port}"})[0] == 200
        # a page elsewhere whose name now resolves to 127.0.0.1 (DNS rebinding)
        assert request(port, "/status", headers={"Host": f"evil.example:{port}"})[0] == 403
    finally:
        assert d.stop() == 0


def watcher_status(work: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return run_cli("status", "--work", str(work), *args, env=env, timeout=30)


def test_watcher_status_without_the_page_reads_the_heartbeat(tmp_path: Path, tmpfs: Any) -> None:
    out = tmpfs("processed", size="1m")
    filler = fill(out)
    none = watcher_status(tmp_path / "work")
    assert none.returncode == 1 and "not running" in none.stdout
    d = Daemon(tmp_path, "--retry-backoff", "2", "--retry-max", "50")
    try:
        drop(tmp_path, "full.png", size=(400, 300))
        d.wait_for("file.retried", input="full.png")
        r = wait_until(lambda: (r := watcher_status(tmp_path / "work", "--json")).returncode
                       == 0 and json.loads(r.stdout)["queue"]["retry"] and r, 15, "a retry")
        doc = json.loads(r.stdout)
        assert doc["source"].endswith(".watcher-heartbeat.json") and "url" in doc
        assert doc["state"] == "degraded" and doc["problems"]
        retry = doc["queue"]["retry"][0]
        assert retry["input"] == "full.png" and retry["failures"] >= 1
        assert 0 <= retry["next_try_in_s"] <= 60 and "write-failed" in retry["last_error"]
        table = watcher_status(tmp_path / "work")
        assert table.returncode == 0
        assert "watcher: degraded" in table.stdout and "RETRYING" in table.stdout
        assert "full.png" in table.stdout and "problem:" in table.stdout
        filler.unlink()  # room again: it goes through
        d.wait_for("file.processed", input="full.png", timeout=60)
        bad_file(tmp_path)
        d.wait_for("file.quarantined")
        t = wait_until(lambda: "quarantine: 1 file(s): 1 truncated" in
                       (t := watcher_status(tmp_path / "work")).stdout and t, 10, "the table")
        assert "watcher: running" in t.stdout and "processed" in t.stdout
        assert re.search(r"processed\s+full\.png\s+full_thumbnail\.png", t.stdout), t.stdout
        assert re.search(r"quarantined\s+bad\.jpg\s+truncated", t.stdout), t.stdout
        assert "WORKER" in t.stdout and "counts: 1 processed, 1 quarantined" in t.stdout
    finally:
        assert d.stop() == 0
    gone = watcher_status(tmp_path / "work")
    assert gone.returncode == 1 and "watcher: stopped" in gone.stdout


def test_watcher_status_with_the_page_reads_the_endpoint(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path, "--status-port", str(port))
    try:
        drop(tmp_path, "a.png")
        d.wait_for("file.processed")
        r = wait_until(lambda: (r := watcher_status(tmp_path / "work", "--json")) and
                       json.loads(r.stdout)["counts"]["processed"] == 1 and r, 10, "status")
        doc = json.loads(r.stdout)
        assert doc["source"] == f"http://127.0.0.1:{port}/status"
        assert len(doc["throughput"]) == 360  # only the endpoint's document has these
    finally:
        assert d.stop() == 0


def test_watcher_status_uses_the_token_on_another_address(tmp_path: Path) -> None:
    port = free_port()
    env = {"WATCHER_STATUS_TOKEN": "tok-123"}
    d = Daemon(tmp_path, "--status-port", str(port), "--status-host", "127.0.0.2", env=env)
    try:
        with_token = json.loads(watcher_status(tmp_path / "work", "--json", env=env).stdout)
        assert with_token["source"] == f"http://127.0.0.2:{port}/status"
        without = watcher_status(tmp_path / "work", "--json",
                                 env={"WATCHER_STATUS_TOKEN": ""})
        doc = json.loads(without.stdout)
        assert "401" in doc["note"] and doc["source"].endswith(".watcher-heartbeat.json")
    finally:
        assert d.stop() == 0


def test_watcher_status_watch_redraws_in_a_terminal(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: watcher status --watch on the pty
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "watcher", "status", "--work",
                                  str(tmp_path / "work"), "--watch", "--interval", "0.3"])
    out = b""

    def read_until(cond: Any, timeout: float) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while not cond(out):
            left = deadline - time.monotonic()
            assert left > 0, out[-2000:]
            if select.select([fd], [], [], min(left, 0.5))[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
    try:
        read_until(lambda o: o.count(b"\x1b[H\x1b[2J") >= 2 and b"watcher: running" in o, 20)
        drop(tmp_path, "live.png")
        read_until(lambda o: b"counts: 1 processed" in o and b"live.png" in o, 30)
        frames = out.split(b"\x1b[H\x1b[2J")
        assert b"counts: 0 processed" in out and b"counts: 1 processed" in frames[-1] + \
            frames[-2]
        os.kill(pid, signal.SIGINT)  # Ctrl-C ends it, exit 0
        _, code = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(code) == 0
    finally:
        os.close(fd)
        with_child_gone(pid)
        assert d.stop() == 0


def with_child_gone(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_status_usage_errors_exit_2() -> None:
    r = run_cli("status", "--interval", "0")
    assert r.returncode == 2 and r.stderr.startswith("usage: watcher status")
    r = subprocess.run([sys.executable, "-m", "watcher", "status", "--bogus"],
                       capture_output=True, text=True, timeout=30, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "usage:" in r.stderr


# --- the parts alone ----------------------------------------------------------------------------

def test_board_counts_per_hour_throughput_and_outputs_by_id() -> None:
    b = Board(recent_max=3)
    t0 = 1_800_000_000.0  # on an hour and a bucket boundary
    for i in range(5):
        b.record("processed", f"f{i}.png", now=t0 + i, outputs=(f"/out/f{i}.jpg",),
                 input_bytes=1_000_000)
    b.record("quarantined", "bad.jpg", now=t0 + 3605, reason="truncated")
    assert b.counts["processed"] == 5 and b.counts["quarantined"] == 1
    assert [h["hour"] for h in b.per_hour()] == [t0, t0 + 3600]
    assert b.per_hour()[0]["processed"] == 5 and b.per_hour()[1] == {"hour": t0 + 3600,
                                                                      "quarantined": 1}
    rows = b.throughput(now=t0 + 3605)
    assert len(rows) == 360 and rows[-1]["files_s"] == 0.1  # the quarantined one
    assert sum(r["files_s"] for r in rows) == pytest.approx(0.1)  # t0's bucket has aged out
    rows = b.throughput(now=t0 + 5)
    assert rows[-1]["files_s"] == 0.5 and rows[-1]["mb_s"] == pytest.approx(0.5)
    assert [f.input for f in b.fates()] == ["bad.jpg", "f4.png", "f3.png"]
    f4 = b.fates()[1]
    assert b.output(f4.id, 0) == "/out/f4.jpg" and b.output(f4.id, 1) is None
    assert b.output(1, 0) is None  # fallen off the list: no longer served


def test_quarantine_index_pages_counts_and_follows_the_folder(tmp_path: Path) -> None:
    q = tmp_path / "q"
    q.mkdir()
    for i in range(7):
        (q / f"f{i}.jpg").write_bytes(b"x" * i)
        (q / f"f{i}.jpg.error.json").write_text(json.dumps(
            {"reason": "truncated" if i % 2 else "not-an-image", "error": f"e{i}",
             "quarantined_at": f"2026-01-01T00:00:0{i}.000Z"}))
    idx = QuarantineIndex(str(q))
    idx.scan()
    assert idx.loaded and len(idx) == 7
    assert idx.counts() == {"not-an-image": 4, "truncated": 3}
    p1, p2 = idx.page(1, size=5), idx.page(2, size=5)
    assert p1["pages"] == 2 and [i["name"] for i in p1["items"]] == [f"f{i}.jpg" for i in
                                                                     (6, 5, 4, 3, 2)]
    assert [i["name"] for i in p2["items"]] == ["f1.jpg", "f0.jpg"]
    assert idx.page(9, size=5)["page"] == 2 and idx.page(1, reason="truncated")["total"] == 3
    item = idx.get(p1["items"][0]["id"])
    assert item is not None
    idx.delete(item)
    assert not (q / "f6.jpg").exists() and not (q / "f6.jpg.error.json").exists()
    assert idx.get(item.id) is None and len(idx) == 6
    (q / "f0.jpg").unlink()
    (q / "f0.jpg.error.json").unlink()
    new = tmp_path / "q" / "sub"
    new.mkdir()
    (new / "n.png").write_bytes(b"n")
    idx.scan()  # what an operator changed by hand
    names = sorted(i["name"] for i in idx.page(1)["items"])
    assert names == ["f1.jpg", "f2.jpg", "f3.jpg", "f4.jpg", "f5.jpg", "sub/n.png"]
    added = idx.add(str(q / "sub" / "n2.png"), "truncated", "cut")
    assert added is not None and idx.get(added.id) == added
    assert idx.add(str(tmp_path / "elsewhere.png"), "x", "y") is None


def test_the_apps_guards_alone(tmp_path: Path) -> None:
    from watcher.errors import ConfigError
    from watcher.ops import web

    class NoFiles:
        def page(self, number: int, reason: str = "") -> dict[str, Any]:
            return {"page": number, "reason": reason}

        def file(self, item_id: int) -> None:
            return None

        def output(self, fate_id: int, index: int) -> None:
            return None

        def requeue(self, item_id: int) -> dict[str, Any]:
            raise ConfigError(str(item_id), "no such quarantined file")

        delete = requeue

    app = web.StatusApp(lambda: {"state": "running"}, NoFiles(), html="{{CSRF}}")
    for host in ("127.0.0.1:8470", "localhost", "[::1]:8470", "localhost:1"):
        assert app.handle("GET", "/status", {"Host": host})[0] == 200, host  # type: ignore[index]
    for host in ("127.0.0.2:8470", "example.com", "[::2]:80", "", "127.0.0.1.evil.example"):
        assert app.handle("GET", "/status", {"Host": host})[0] == 403, host  # type: ignore[index]
    ok = {"Host": "127.0.0.1:1"}
    assert app.handle("GET", "/metrics", ok) is None  # the metrics server's own
    assert app.handle("PUT", "/status", ok)[0] == 405  # type: ignore[index]
    assert app.handle("GET", "/", ok)[1] == app.csrf.encode()  # type: ignore[index]
    assert app.handle("POST", "/quarantine/7/requeue", {**ok, "X-CSRF-Token": app.csrf})[0] \
        == 404  # type: ignore[index]
    assert app.handle("GET", "/status/quarantine?page=x&reason=truncated", ok)[1] == \
        b'{"page": 1, "reason": "truncated"}'  # type: ignore[index]
    assert web.is_loopback("::1") and not web.is_loopback("127.0.0.2")
    with pytest.raises(ConfigError, match=r"ops\.status_host.*needs a token"):
        web.check_bind("0.0.0.0", "")
    web.check_bind("0.0.0.0", "t")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"ops\.status_token_file.*holds no token"):
        web.read_token({}, str(empty))
    with pytest.raises(ConfigError, match=r"ops\.status_token_file.*cannot read"):
        web.read_token({}, str(tmp_path / "nope"))
    assert web.read_token({"WATCHER_STATUS_TOKEN": "a"}, str(tmp_path / "nope")) == "a"


def test_the_pages_settings_are_checked_like_every_other() -> None:
    r = run_cli("watch", "--status-port", "70000")
    assert r.returncode == 2 and "--status-port: must be <= 65535" in r.stderr, r.stderr
    r = run_cli("check-config", env={"WATCHER_STATUS_PAGE": "maybe"})
    assert r.returncode == 2 and "WATCHER_STATUS_PAGE" in r.stderr, r.stderr
    r = run_cli("check-config", env={"WATCHER_STATUS_TOKEN": "secret-never-printed"})
    assert r.returncode == 0 and "secret-never-printed" not in r.stdout + r.stderr
    assert "[ops]\nstatus_page = false" in r.stdout


def test_previews_served_as_they_are_converted_apart_or_refused(tmp_path: Path) -> None:
    from watcher.ops import thumbs

    make_image(tmp_path / "a.tif", size=(900, 600))
    make_image(tmp_path / "b.webp", size=(90, 60))
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)  # a JPEG in name only
    (tmp_path / "noise.bin").write_bytes(os.urandom(4096))
    (tmp_path / "link.tif").symlink_to(tmp_path / "a.tif")
    (tmp_path / "dir").mkdir()
    tif = thumbs.read(str(tmp_path), "a.tif")
    assert tif is not None and thumbs.native(tif) is None  # not a browser's format
    png = thumbs.convert(tif)
    assert png is not None and Image.open(io.BytesIO(png)).size == (320, 213)
    webp = thumbs.read(str(tmp_path), "b.webp")
    assert webp is not None and thumbs.native(webp) == "image/webp"
    assert thumbs.convert((tmp_path / "noise.bin").read_bytes()) is None  # does not decode
    for rel in ("link.tif", "dir", "gone.png", "../x", "dir/../a.tif"):
        assert thumbs.read(str(tmp_path), rel) is None, rel
    assert thumbs.read(str(tmp_path), "a.tif", limit=100) is None  # too large
    cache = thumbs.Previews(size=2)
    assert cache.get(("q", 1, 0), str(tmp_path), "a.tif") == ("image/png", png)
    assert cache.get(("q", 2, 0), str(tmp_path), "noise.bin") is None
    assert cache.get(("q", 3, 0), str(tmp_path), "junk.jpg") is not None  # the browser judges


def test_the_page_lives_through_a_reload_and_shows_the_drain(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "watcher.toml").write_text(SLOW_TOML)
    d = Daemon(tmp_path, "--config", str(tmp_path / "watcher.toml"), "--status-port", str(port),
               "--grace", "30")
    try:
        drop(tmp_path, "before.png")
        wait_until(lambda: status(port)["counts"]["processed"] == 1, 30, "one processed")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("config.reloaded")
        drop(tmp_path, "after.png", seed=3)
        s = wait_until(lambda: (s := status(port))["counts"]["processed"] == 2 and s, 30,
                       "the count to go on after the reload")
        assert s["pid"] == d.proc.pid and [f["input"] for f in s["recent"]][:2] == \
            ["after.png", "before.png"]
        crashers.slow_image(str(tmp_path / "inbox" / "long.png"), 4.0)
        wait_until(lambda: any(w["input"] == "long.png" for w in status(port)["workers"]), 15,
                   "a worker on long.png")
        d.proc.send_signal(signal.SIGTERM)  # drains: the page says so while it does
        wait_until(lambda: status(port)["state"] == "draining", 10, "the draining state")
        assert d.exit_code() == 0
    finally:
        d.stop()
    assert len(d.seen("file.processed", input="long.png")) == 1
