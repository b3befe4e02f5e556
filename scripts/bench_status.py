"""Job P of the benchmark: what the status page costs the daemon. The same daemon, with a
quarantine of ``quarantined`` files, started with the page off and on: the time from its
spawn to its ``daemon.started`` line, and an idle file's overhead (file closed -> output,
minus the worker's own time) while a client polls /status every second as the page does."""

from __future__ import annotations

import calendar
import json
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    text = log.read_text()
    text = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in text.splitlines()
            if line.startswith("{") and f'"event": "{name}"' in line]


def _wait(cond: Any, timeout: float, step: float = 0.001) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise TimeoutError("status-page benchmark: condition not met in time")


def _one(watcher: Path, base: Path, small: list[Path], idle: int, page: bool) -> dict[str, Any]:
    for d in ("inbox", "processed", "archive", "work"):
        (base / d).mkdir(parents=True, exist_ok=True)
    log = base / ("page-on.log" if page else "page-off.log")
    port = _port()
    cmd = [str(watcher), "watch", "--inbox", str(base / "inbox"), "--output",
           str(base / "processed"), "--archive", str(base / "archive"), "--quarantine",
           str(base / "quarantine"), "--work", str(base / "work"), "--workers", "2",
           "--log-format", "json", "--reconcile-interval", "600", "--pipeline", "thumbnail",
           # both runs drop the same images: measure processing, not the duplicate check
           "--duplicates", "process"]
    if page:
        cmd += ["--status-port", str(port)]
    polling = threading.Event()
    with open(log, "w") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            _wait(lambda: _events(log, "daemon.started"), 120, 0.01)
            started = _events(log, "daemon.started")[0]["timestamp"]
            start_s = _ts(started) - t0

            def poll() -> None:  # as the page does: /status every second
                while not polling.is_set():
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status",
                                                    timeout=5) as r:
                            r.read()
                    except OSError:
                        pass
                    polling.wait(1.0)
            if page:
                threading.Thread(target=poll, daemon=True).start()
            lat = []
            for i, p in enumerate(small[:idle]):
                out_path = base / "processed" / f"p{int(page)}_{i:04d}_thumbnail{p.suffix}"
                time.sleep(0.05)
                (base / "inbox" / f"p{int(page)}_{i:04d}{p.suffix}").write_bytes(p.read_bytes())
                t = time.monotonic()
                _wait(out_path.exists, 30)
                lat.append((time.monotonic() - t) * 1000)
            done = {e["input"]: e["duration_ms"] for e in _events(log, "file.processed")}
            over = [a - done.get(f"p{int(page)}_{i:04d}{p.suffix}", 0.0)
                    for i, (a, p) in enumerate(zip(lat, small, strict=False))]
        finally:
            polling.set()
            proc.terminate()
            proc.wait(120)
    return {"start_s": round(start_s, 3), "idle_overhead_ms_p50": statistics.median(over)}


def _ts(text: str) -> float:
    base, _, frac = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")


def bench_status_page(watcher: Path, small: list[Path], work: Path, quarantined: int,
                      idle: int) -> dict[str, Any]:
    base = work / "P"
    q = base / "quarantine"
    q.mkdir(parents=True, exist_ok=True)
    for i in range(quarantined):
        (q / f"q{i:05d}.jpg").write_bytes(b"not an image")
        (q / f"q{i:05d}.jpg.error.json").write_text(json.dumps(
            {"reason": "not-an-image", "error": "bench", "quarantined_at":
             "2026-01-01T00:00:00.000Z"}))
    return {"quarantined": quarantined, "off": _one(watcher, base, small, idle, False),
           "on": _one(watcher, base, small, idle, True)}


def verdict(p: dict[str, Any]) -> list[str]:
    off, on = p["off"], p["on"]
    return [f"P: daemon start with {p['quarantined']} quarantined files: page off "
            f"{off['start_s']:.2f} s, on {on['start_s']:.2f} s; idle overhead p50 off "
            f"{off['idle_overhead_ms_p50']:.1f} ms, on (polled every second) "
            f"{on['idle_overhead_ms_p50']:.1f} ms"]
