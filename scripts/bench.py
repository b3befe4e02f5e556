"""watcher beside its peers, in one run: jobs T G S M C W of ../shared/bench (and X: the worst
worker peak on inputs that need gigabytes, under a memory cap; P: what the status page costs the
daemon's start and its idle latency, scripts/bench_status.py), alternating
implementations round by round, one table of medians and ratios, JSON and a chart.

Peers come from ../shared/bench (run its setup.sh first: it builds the corpus into
$BENCH_CORPUS and the peers' venvs under $BENCH_HOME). Absent peers are reported as such.
--quick uses a small slice of the corpus (or a synthetic one when there is none) and one round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageStat

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
BENCH_HOME = Path(os.environ.get("BENCH_HOME", "/var/tmp/watcher-bench")).resolve()
# Where every measured command runs (main() sets it to the run's work folder): not this clone,
# whose ./watcher.toml (the daemon's demo config) watcher batch would pick up; watcher runs on
# its built-in defaults, the peers on theirs.
RUN_DIR: Path | None = None
PEER_PY = BENCH_HOME / ".venv" / "bin" / "python"
PEER_SPY = BENCH_HOME / ".venv-sysvips" / "bin" / "python"
WATCHER = Path(sys.executable).parent / "watcher"
CORES = 2

# What each job asks of watcher (the same definitions as the peers').
WATCHER_OPS = {"T": ("thumbnail(256, 256)", "jpeg"), "G": ("grayscale, resize_half", "jpeg"),
               "S": ("thumbnail(128, 128)", "same"), "M": ("thumbnail(256, 256)", "jpeg")}
TARGETS = {  # (peer, minimum ratio peer_time / watcher_time), or memory (watcher <= peer)
    "T": [("pillow_tuned", 1.1), ("vips_cli", 1.4)],
    "G": [("pillow_tuned", 1.0), ("pyvips_pool", 1.6)],
    "S": [("pillow_tuned", 1.0), ("vips_cli", 2.5)],
}


@dataclass
class Run:
    job: str
    impl: str
    walls: list[float] = field(default_factory=list)
    peaks_mib: list[float] = field(default_factory=list)
    note: str = ""
    ok: bool = True

    @property
    def wall(self) -> float:
        return statistics.median(self.walls) if self.walls else math.nan

    @property
    def peak(self) -> float:
        return statistics.median(self.peaks_mib) if self.peaks_mib else math.nan


# --- measuring ---------------------------------------------------------------------------------

TIMER = '''
import os, sys, time, subprocess
t0 = time.monotonic()
try:
    p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
except OSError:
    print(0.0, 0.0, 127)
    raise SystemExit(0)
_, status, ru = os.wait4(p.pid, 0)
print(time.monotonic() - t0, ru.ru_maxrss / 1024, status)
'''


def timed(cmd: list[str], env: dict[str, str] | None = None,
          cwd: Path | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS MiB (the largest process reaped in the tree), exit status.

    Measured by a small fresh launcher, as the peers' timecmd.py does: a child's ru_maxrss
    starts from its parent's high-water mark at exec, so this (large) process must not fork the
    measured command itself."""
    out = subprocess.run(["/usr/bin/python3", "-c", TIMER, *cmd], capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, cwd=cwd or RUN_DIR,
                         check=True)
    wall, peak, status = out.stdout.split()
    return float(wall), float(peak), int(status)


def psnr(a: Image.Image, b: Image.Image) -> float:
    if a.size != b.size:
        b = b.resize(a.size, Image.Resampling.LANCZOS)
    mode = "L" if a.mode == "L" and b.mode == "L" else "RGB"
    a, b = a.convert(mode), b.convert(mode)
    st = ImageStat.Stat(ImageChops.difference(a, b))
    mse = sum(r * r for r in st.rms) / len(st.rms)
    return 99.0 if mse == 0 else 10 * math.log10(255 * 255 / mse)


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean SSIM of the luma planes (7x7 uniform window, the usual constants)."""
    import numpy as np

    if a.size != b.size:
        b = b.resize(a.size, Image.Resampling.LANCZOS)
    x = np.asarray(a.convert("L"), dtype=np.float64)
    y = np.asarray(b.convert("L"), dtype=np.float64)
    w = 7
    if min(x.shape) < w:
        return 1.0 if np.array_equal(x, y) else 0.0

    def box(z: Any) -> Any:  # mean over every 7x7 window, via an integral image
        c = np.pad(z, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]) / (w * w)

    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx * mx, box(y * y) - my * my, box(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def jpeg_q85(im: Image.Image) -> Image.Image:
    import io

    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    buf.seek(0)
    return Image.open(buf).convert(im.mode)


def reference(job: str, src: Path) -> Image.Image:
    """Full decode, LANCZOS resize: what every output is compared with."""
    with Image.open(src) as im:
        im.load()
        from PIL import ImageOps

        im = ImageOps.exif_transpose(im)
        if job == "G":
            return im.convert("L").resize((max(1, im.width // 2), max(1, im.height // 2)),
                                          Image.Resampling.LANCZOS)
        box = 128 if job == "S" else 256
        s = min(box / im.width, box / im.height, 1.0)
        size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
        return im.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def quality(job: str, inputs: list[Path], outdir: Path, sample: int = 12) -> dict[str, float]:
    """PSNR and SSIM of a sample of outputs against the reference (full decode, LANCZOS; for
    JPEG outputs also encoded at q85), matched by input stem (watcher's outputs are
    STEM_bench.EXT, the peers' STEM.EXT)."""
    outs = {p.stem.removesuffix("_bench"): p for p in outdir.rglob("*") if p.is_file()}
    values, sims, passed = [], [], 0
    for src in random.Random(7).sample(inputs, min(sample, len(inputs))):
        out = outs.get(src.stem)
        if out is None:
            continue
        ref = reference(job, src)
        with Image.open(out) as o:
            if o.format == "JPEG":  # what a full-decode LANCZOS pipeline gives at the same q85:
                ref = jpeg_q85(ref)  # the guard judges the resize path, not the shared encoder
            p, s = psnr(ref, o), ssim(ref, o)
        values.append(p)
        sims.append(s)
        passed += p >= 35 or s >= 0.97
    if not values:
        return {"n": 0, "min": math.nan, "mean": math.nan, "ssim_min": math.nan, "pass": 0}
    return {"n": len(values), "min": round(min(values), 2),
            "mean": round(statistics.fmean(values), 2), "ssim_min": round(min(sims), 4),
            "pass": passed}


# --- the implementations --------------------------------------------------------------------

def watcher_cmd(job: str, src: Path, out: Path, workers: int = CORES,
                report: Path | None = None, executor: str = "local") -> list[str]:
    ops, fmt = WATCHER_OPS[job]
    cmd = [str(WATCHER), "batch", str(src), "--out", str(out), "--ops", ops, "--suffix", "bench",
           "--format", fmt, "--quality", "85", "--workers", str(workers), "--no-progress",
           "--log-format", "json", "--log-level", "warning", "--on-conflict", "overwrite",
           "--executor", executor]
    if report:
        cmd += ["--report", str(report)]
    return cmd


def peer_cmd(impl: str, job: str, src: Path, out: Path) -> list[str] | None:
    """The peer's command line, or None where the peer (or the kit beside the clone) is absent."""
    peers = SHARED / "peers"
    script = {"vips_cli": "vips_cli.sh", "magick_hint": "magick.sh"}.get(impl, f"{impl}.py")
    if not (peers / script).exists():
        return None
    if impl in ("pillow_tuned", "pillow_naive", "pyvips_pool"):
        py = PEER_SPY if (impl == "pyvips_pool" and job == "S") else PEER_PY
        return [str(py), str(peers / f"{impl}.py"), job, str(src), str(out), str(CORES)] \
            if py.exists() else None
    if impl == "vips_cli":
        return [str(peers / "vips_cli.sh"), job, str(src), str(out), str(CORES)] \
            if shutil.which("vipsthumbnail") and shutil.which("parallel") else None
    if impl == "magick_hint":
        return [str(peers / "magick.sh"), job, str(src), str(out), str(CORES), "1"] \
            if shutil.which("mogrify") else None
    return None


PEERS = {"T": ["pillow_tuned", "pillow_naive", "pyvips_pool", "vips_cli", "magick_hint"],
         "G": ["pillow_tuned", "pyvips_pool", "vips_cli"],
         "S": ["pillow_tuned", "pyvips_pool", "vips_cli"]}


def fresh_out(work: Path, name: str, r: int) -> Path:
    """A new, empty output folder for round ``r``, on a file system with nothing left to write.

    Earlier rounds' outputs stay until the work folder goes: deleting a thousand files just
    before a run makes the next tool's file creations scan past the freshly freed inodes (ext4
    skips recently deleted ones), about 1 ms of kernel time per file that varied from run to run
    by which tool the freed inodes happened to be near. ``os.sync`` writes back what the
    previous tool left in the page cache, so that write-back is not charged to this one."""
    out = work / f"{name}-r{r}"
    out.mkdir(parents=True)
    os.sync()
    return out


def warm(inputs: list[Path]) -> None:
    """Read every input once, so that each run starts with them in the page cache. Some
    machines reclaim page-cache pages unused for a minute or so (here: DAMON's pageout scheme
    on the VM), and the first tool after such a pause would otherwise pay the disk reads."""
    for path in inputs:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def worker_peak_mib(report: Path) -> float:
    """The largest worker peak RSS (MiB) a ``watcher batch --report`` names."""
    items = json.loads(report.read_text())["items"]
    return max((i.get("worker_peak_rss_kb") or 0 for i in items), default=0) / 1024


worst: dict[str, float] = {}  # job -> the worst worker peak (MiB) of watcher's runs


def bench_memory_hostile(big: Path, work: Path, cap_mib: int = 896) -> dict[str, Any]:
    """Job X: the inputs that drove workers to gigabytes before the memory governor (a tiny
    PNG that decodes to 9000x9000 RGBA, a 48 MP photo turned by 45 degrees and converted in
    full to WebP, a photo far under the cap) with each worker capped as a 2 GB service with
    2 workers is: the worst worker peak, against the cap, and each input's fate."""
    src = work / "X-in"
    src.mkdir(exist_ok=True)
    Image.new("RGBA", (9000, 9000), (12, 34, 56, 78)).save(src / "flat_rgba.png")
    shutil.copy(big, src / "big.jpg")
    with Image.open(big) as im:
        im.resize((im.width // 4, im.height // 4)).save(src / "quarter.jpg", quality=85)
    out: dict[str, Any] = {"cap_mib": cap_mib, "cases": []}
    for ops, fmt in (("rotate(45)", "jpeg"), ("resize_half", "webp"), ("thumbnail(256,256)",
                                                                       "jpeg")):
        report = work / f"X-{len(out['cases'])}.json"
        cmd = [str(WATCHER), "batch", str(src), "--out", str(fresh_out(work, "X", len(
            out["cases"]))), "--ops", ops, "--format", fmt, "--workers", str(CORES),
            "--max-worker-memory", f"{cap_mib}MiB", "--no-progress", "--log-level", "error",
            "--report", str(report)]
        wall, peak, status = timed(cmd)
        items = json.loads(report.read_text())["items"] if report.exists() else []
        out["cases"].append({
            "ops": ops, "format": fmt, "status": status, "wall": wall, "peak_tree_mib": peak,
            "worker_peak_mib": worker_peak_mib(report) if report.exists() else None,
            "fates": {Path(i["input"]).name: i["reason"] or i["status"] for i in items}})
    peaks = [c["worker_peak_mib"] for c in out["cases"] if c["worker_peak_mib"] is not None]
    out["worst_mib"] = max(peaks) if peaks else None
    return out


def bench_throughput(job: str, src: Path, rounds: int, work: Path,
                     inputs: list[Path]) -> tuple[list[Run], dict[str, Any]]:
    impls = ["watcher", *PEERS[job]]
    runs = {i: Run(job, i) for i in impls}
    for impl in impls[1:]:
        if peer_cmd(impl, job, src, work) is None:
            runs[impl].ok, runs[impl].note = False, "not installed"
    for r in range(rounds):
        order = impls if r % 2 == 0 else list(reversed(impls))  # alternate, fair to both
        for impl in order:
            if not runs[impl].ok and runs[impl].note:
                continue
            out = fresh_out(work, f"{job}-{impl}", r)
            report = work / f"{job}-watcher-r{r}.json"
            cmd = watcher_cmd(job, src, out, report=report) if impl == "watcher" \
                else peer_cmd(impl, job, src, out)
            assert cmd is not None
            warm(inputs)
            wall, peak, status = timed(cmd)
            if status:
                runs[impl].ok, runs[impl].note = False, f"exit status {status}"
            runs[impl].walls.append(wall)
            runs[impl].peaks_mib.append(peak)
            if impl == "watcher" and report.exists():
                worst[job] = max(worst.get(job, 0.0), worker_peak_mib(report))
    q = {impl: quality(job, inputs, work / f"{job}-{impl}-r{rounds - 1}") for impl in impls
         if runs[impl].ok}
    return list(runs.values()), q


def bench_executor(job: str, src: Path, rounds: int, work: Path, inputs: list[Path],
                   executor: str) -> dict[str, Any]:
    """watcher on ``executor`` against watcher on local processes, alternately: the price of
    the cluster (start-up and per-task cost) on one machine."""
    runs = {e: Run(job, f"watcher --executor {e}") for e in ("local", executor)}
    for r in range(rounds):
        order = ["local", executor] if r % 2 == 0 else [executor, "local"]
        for ex in order:
            out = fresh_out(work, f"{job}-exec-{ex}", r)
            warm(inputs)
            wall, peak, status = timed(watcher_cmd(job, src, out, executor=ex))
            if status:
                runs[ex].ok, runs[ex].note = False, f"exit status {status}"
            runs[ex].walls.append(wall)
            runs[ex].peaks_mib.append(peak)
    local, other = runs["local"], runs[executor]
    out: dict[str, Any] = {"job": job, "executor": executor, "images": len(inputs),
                           "runs": [{**asdict(x), "wall": x.wall, "peak": x.peak}
                                    for x in runs.values()]}
    if local.ok and other.ok:
        out["slowdown"] = other.wall / local.wall
        out["extra_s"] = other.wall - local.wall
        out["extra_ms_per_file"] = 1000 * (other.wall - local.wall) / len(inputs)
        out["quality"] = quality(job, inputs, work / f"{job}-exec-{executor}-r{rounds - 1}")
    return out


def bench_memory(big: Path, rounds: int, work: Path) -> list[Run]:
    """Job M: one 48 MP JPEG -> 256 px thumbnail; watcher's figure is its worker's peak RSS."""
    runs = {i: Run("M", i) for i in ("watcher", "vipsthumbnail", "pillow_tuned", "pillow_naive")}
    for _ in range(rounds):
        out = work / "M-watcher"
        shutil.rmtree(out, ignore_errors=True)
        report = work / "M-report.json"
        _, _, status = timed(watcher_cmd("M", big, out, workers=1, report=report))
        item = json.loads(report.read_text())["items"][0] if report.exists() else {}
        if status or not item.get("worker_peak_rss_kb"):
            runs["watcher"].ok, runs["watcher"].note = False, f"exit status {status}"
        else:
            runs["watcher"].peaks_mib.append(item["worker_peak_rss_kb"] / 1024)
            runs["watcher"].walls.append(item["duration_ms"] / 1000)
        if shutil.which("vipsthumbnail"):
            _, peak, _ = timed(["vipsthumbnail", "-s", "256x256", "-o",
                                f"{work}/M_vt.jpg[Q=85]", str(big)])
            runs["vipsthumbnail"].peaks_mib.append(peak)
        else:
            runs["vipsthumbnail"].ok, runs["vipsthumbnail"].note = False, "not installed"
        for impl in ("pillow_tuned", "pillow_naive"):
            cmd = peer_cmd(impl, "T", big, work / f"M-{impl}")
            if cmd is None:
                runs[impl].ok, runs[impl].note = False, "not installed"
                continue
            cmd[-1] = "1"
            _, peak, _ = timed(cmd)
            runs[impl].peaks_mib.append(peak)
    return list(runs.values())


def bench_cpu(tasks: int, seconds: float, work: Path) -> list[Run]:
    """Job C: N tasks of ~1 s CPU each on 1 and 2 workers (parallel efficiency)."""
    src = work / "C-in"
    src.mkdir(exist_ok=True)
    for i in range(tasks):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(src / f"c{i:03d}.png")
    runs = []
    for workers in (1, 2):
        out = work / f"C-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(WATCHER), "batch", str(src), "--out", str(out), "--ops",
               f"bench_ops.burn(seconds={seconds})", "--workers", str(workers),
               "--no-progress", "--log-format", "json", "--log-level", "warning",
               "--timeout", str(max(60, seconds * 10))]
        wall, peak, status = timed(cmd, env={"PYTHONPATH": str(ROOT / "scripts")})
        run = Run("C", f"watcher x{workers}", [wall], [peak])
        if status:
            run.ok, run.note = False, f"exit status {status}"
        runs.append(run)
    return runs


# --- watch mode -------------------------------------------------------------------------------

class WatchDaemon:
    def __init__(self, base: Path, pipeline: str = "thumbnail(256, 256)") -> None:
        self.base = base
        for d in ("inbox", "processed", "archive", "quarantine", "work", "staging"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "w.toml").write_text(
            f'[pipelines.bench]\nsteps = ["{pipeline}"]\nformat = "jpeg"\nquality = 85\n'
            '[output]\npipelines = ["bench"]\n')
        self.log = open(base / "daemon.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(WATCHER), "watch", "--config", str(base / "w.toml"),
             "--inbox", str(base / "inbox"), "--output", str(base / "processed"),
             "--archive", str(base / "archive"), "--quarantine", str(base / "quarantine"),
             "--work", str(base / "work"), "--workers", str(CORES), "--log-format", "json",
             "--max-in-flight", "16", "--reconcile-interval", "600"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: "daemon.started" in self._text(), 60)

    def _text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def events(self, name: str) -> list[dict[str, Any]]:
        text = self._text()
        text = text[: text.rfind("\n") + 1]  # the last line may still be being written
        return [json.loads(line) for line in text.splitlines()
                if line.startswith("{") and f'"event": "{name}"' in line]

    @staticmethod
    def wait(cond: Callable[[], Any], timeout: float, step: float = 0.0005) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(step)
        raise TimeoutError("watch benchmark: condition not met in time")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(x for x in f if x.startswith("VmHWM")).split()[1]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log.close()


def bench_watch(photos: list[Path], small: list[Path], idle: int, backlog: int,
                work: Path, rounds: int = 1) -> dict[str, Any]:
    res: dict[str, Any] = {}
    base = work / "W"
    shutil.rmtree(base, ignore_errors=True)
    d = WatchDaemon(base)
    try:
        n = len(photos)
        bursts = []
        for r in range(rounds):  # the median of a few bursts, as the batch jobs take
            for p in photos:  # staged on the same file system, then renamed in at once
                shutil.copy(p, base / "staging" / f"r{r}_{p.name}")
            os.sync()  # the staged copies written: the burst starts with nothing to write
            t0 = time.monotonic()
            for p in photos:
                os.rename(base / "staging" / f"r{r}_{p.name}", base / "inbox" / f"r{r}_{p.name}")
            d.wait(lambda r=r: len(os.listdir(base / "archive")) >= n * (r + 1), 600, 0.01)
            bursts.append(time.monotonic() - t0)
        res["bursts_s"] = [round(x, 4) for x in bursts]
        res["burst_s"] = statistics.median(bursts)
        res["burst_images_per_s"] = n / res["burst_s"]
        lat, work_ms = [], []
        for i, p in enumerate(small[:idle]):
            data = p.read_bytes()
            name = f"idle{i:04d}{p.suffix}"
            out = base / "processed" / f"idle{i:04d}_bench.jpg"
            time.sleep(0.05)  # idle between files
            with open(base / "inbox" / name, "wb") as f:
                f.write(data)
            t0 = time.monotonic()  # file closed
            d.wait(out.exists, 30)
            lat.append((time.monotonic() - t0) * 1000)
        done = {e["input"]: e["duration_ms"] for e in d.events("file.processed")}
        work_ms = [done[f"idle{i:04d}{p.suffix}"] for i, p in enumerate(small[:idle])
                   if f"idle{i:04d}{p.suffix}" in done]
        over = sorted(a - b for a, b in zip(lat, work_ms, strict=False))
        res["idle_latency_ms_p50"] = statistics.median(lat)
        res["idle_work_ms_p50"] = statistics.median(work_ms) if work_ms else math.nan
        res["idle_overhead_ms_p50"] = statistics.median(over) if over else math.nan
        res["idle_overhead_ms_p99"] = over[min(len(over) - 1, int(len(over) * 0.99))] \
            if over else math.nan
    finally:
        d.stop()
    # parent RSS with a big backlog waiting
    base2 = work / "W2"
    shutil.rmtree(base2, ignore_errors=True)
    (base2 / "inbox").mkdir(parents=True)
    data = small[0].read_bytes()
    for i in range(backlog):
        (base2 / "inbox" / f"b{i:05d}{small[0].suffix}").write_bytes(data)
    d = WatchDaemon(base2)
    try:
        d.wait(lambda: len(d.events("file.queued")) >= 16, 120, 0.05)
        res["backlog"] = backlog
        res["daemon_rss_mib_with_backlog"] = d.rss_mib()
    finally:
        d.stop()
    return res


INOTIFY_QUEUE = Path("/proc/sys/fs/inotify/max_queued_events")


def bench_drain(sizes: list[int], work: Path) -> dict[str, Any]:
    """Job W's bursts: ``sizes`` tiny files renamed into the inbox at once, each size on a
    fresh daemon: the drain rate (files/s from the first rename to the last archived), the
    daemon's peak RSS (with them all waiting at first); then, with the kernel's event queue
    lowered to 64 (restored after) and the daemon stopped (SIGSTOP) while 1,000 files are
    renamed in, the time from its overflow to the first file it claims from the rescan."""
    res: dict[str, Any] = {"drain": []}
    for n in sizes:
        base = work / f"W-drain-{n}"
        shutil.rmtree(base, ignore_errors=True)
        d = WatchDaemon(base, pipeline="grayscale")
        try:
            data = _tiny_png()
            for i in range(n):
                (base / "staging" / f"d{i:06d}.png").write_bytes(data)
            os.sync()
            t0 = time.monotonic()
            for i in range(n):
                os.rename(base / "staging" / f"d{i:06d}.png", base / "inbox" / f"d{i:06d}.png")
            d.wait(lambda b=base, k=n: len(os.listdir(b / "archive")) >= k, 3600, 0.2)
            wall = time.monotonic() - t0
            res["drain"].append({"files": n, "wall_s": round(wall, 3),
                                 "files_per_s": round(n / wall, 1),
                                 "daemon_rss_mib": round(d.rss_mib(), 1)})
        finally:
            d.stop()
            shutil.rmtree(base, ignore_errors=True)
        print(f"job W drain {n} done", file=sys.stderr, flush=True)
    if not os.access(INOTIFY_QUEUE, os.W_OK):
        res["overflow"] = "not measured: fs.inotify.max_queued_events is not writable"
        return res
    before = INOTIFY_QUEUE.read_text()
    base = work / "W-overflow"
    shutil.rmtree(base, ignore_errors=True)
    INOTIFY_QUEUE.write_text("64\n")
    try:
        d = WatchDaemon(base, pipeline="grayscale")
    finally:
        INOTIFY_QUEUE.write_text(before)  # the daemon's instance keeps its 64
    try:
        data = _tiny_png()
        for i in range(1000):
            (base / "staging" / f"o{i:04d}.png").write_bytes(data)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            for i in range(1000):
                os.rename(base / "staging" / f"o{i:04d}.png", base / "inbox" / f"o{i:04d}.png")
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        d.wait(lambda: len(os.listdir(base / "archive")) >= 1000, 600, 0.1)
        over = d.events("observer.overflowed")
        found = d.events("reconcile.found")
        claims = d.events("file.queued")
        if over:
            t_over = _ts(over[0]["timestamp"])
            later = [_ts(c["timestamp"]) for c in claims if _ts(c["timestamp"]) >= t_over]
            res["overflow"] = {"overflows": len(over),
                               "found_by_rescan": sum(e["files"] for e in found),
                               "overflow_to_first_claim_ms": round(
                                   (min(later) - t_over) * 1000, 1) if later else None}
        else:
            res["overflow"] = "no overflow was seen"
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    return res


def _tiny_png() -> bytes:
    """The bytes of a 16x12 PNG: the burst jobs' file, cheap to make, copy and process."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (90, 120, 150)).save(buf, "PNG")
    return buf.getvalue()


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- corpus -------------------------------------------------------------------------------------

def corpus(quick: bool, work: Path) -> tuple[Path, bool]:
    real = Path(os.environ.get("BENCH_CORPUS", BENCH_HOME / "corpus")).resolve()
    if (real / "manifest.tsv").exists():
        if not quick:
            return real, True
        sl = work / "corpus"
        for sub, n in (("photos", 8), ("small", 40)):
            (sl / sub).mkdir(parents=True, exist_ok=True)
            for p in sorted((real / sub).iterdir())[:n]:
                shutil.copy(p, sl / sub / p.name)
        (sl / "big").mkdir(exist_ok=True)
        shutil.copy(real / "big" / "b0.jpg", sl / "big" / "b0.jpg")
        return sl, True
    sys.path.insert(0, str(ROOT))
    from watcher.samples import picture

    syn = work / "corpus"
    for sub in ("photos", "small", "big"):
        (syn / sub).mkdir(parents=True, exist_ok=True)
    for i in range(6):
        picture(1600, 1200, i).save(syn / "photos" / f"p{i:03d}.jpg", quality=90)
    for i in range(30):
        ext = (".jpg", ".png", ".bmp")[i % 3]
        picture(320, 240, i).save(syn / "small" / f"s{i:04d}{ext}")
    picture(3200, 2400, 1).save(syn / "big" / "b0.jpg", quality=90)
    return syn, False


# --- report -------------------------------------------------------------------------------------

def table(results: dict[str, Any], counts: dict[str, tuple[int, float]]) -> str:
    lines = ["| job | impl | wall s (median) | images/s | input MP/s | peak RSS MiB | "
             "watcher is N x faster | PSNR dB min/mean, SSIM min |",
             "|---|---|---|---|---|---|---|---|"]
    for job in ("T", "G", "S"):
        if job not in results:
            continue
        runs = {r["impl"]: r for r in results[job]["runs"]}
        w = runs["watcher"]["wall"]
        n, mp = counts[job]
        for impl, r in runs.items():
            q = results[job]["quality"].get(impl, {})
            ratio = "" if impl == "watcher" or not r["ok"] else f"{r['wall'] / w:.2f}"
            if not r["ok"]:
                lines.append(f"| {job} | {impl} | {r['note']} | | | | | |")
                continue
            lines.append(f"| {job} | {impl} | {r['wall']:.3f} | {n / r['wall']:.1f} | "
                         f"{mp / r['wall']:.0f} | {r['peak']:.0f} | {ratio} | "
                         f"{q.get('min', '')}/{q.get('mean', '')}, {q.get('ssim_min', '')} |")
    if "M" in results:
        for r in results["M"]:
            val = f"{r['peak']:.1f}" if r["ok"] else r["note"]
            who = "(worker)" if r["impl"] == "watcher" else ""
            lines.append(f"| M | {r['impl']} {who} | | | | {val} | | |")
    if "C" in results:
        for r in results["C"]:
            lines.append(f"| C | {r['impl']} | {r['wall']:.2f} | | | {r['peak']:.0f} | | |")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[str]:
    out = []
    for job in ("T", "G", "S"):
        q = results.get(job, {}).get("quality", {}).get("watcher")
        if q and q["n"]:
            out.append(f"{job}: quality guard: {q['pass']}/{q['n']} sampled outputs reach "
                       f"PSNR >= 35 dB or SSIM >= 0.97 (min PSNR {q['min']} dB, min SSIM "
                       f"{q['ssim_min']}) {'MET' if q['pass'] == q['n'] else 'MISSED'}")
    for job, targets in TARGETS.items():
        if job not in results:
            continue
        runs = {r["impl"]: r for r in results[job]["runs"]}
        w = runs["watcher"]["wall"]
        for peer, want in targets:
            r = runs.get(peer)
            if not r or not r["ok"]:
                out.append(f"{job}: vs {peer}: not measured")
                continue
            ratio = r["wall"] / w
            out.append(f"{job}: {ratio:.2f}x {peer} (target >= {want}) "
                       f"{'MET' if ratio >= want else 'MISSED'}")
    if results.get("worker_peak_mib"):
        out.append("memory: worst worker peak " + ", ".join(
            f"{job} {mib:.0f} MiB" for job, mib in results["worker_peak_mib"].items()))
    if "X" in results:
        x = results["X"]
        for c in x["cases"]:
            out.append(f"X: {c['ops']} -> {c['format']}: worker peak {c['worker_peak_mib']:.0f} "
                       f"MiB; " + ", ".join(f"{k} {v}" for k, v in sorted(c["fates"].items())))
        if x["worst_mib"] is not None:
            met = "MET" if x["worst_mib"] <= x["cap_mib"] else "MISSED"
            out.append(f"X: worst worker peak {x['worst_mib']:.0f} MiB with a cap of "
                       f"{x['cap_mib']} MiB {met}")
    if "M" in results:
        m = {r["impl"]: r for r in results["M"]}
        if m["watcher"]["ok"] and m["vipsthumbnail"]["ok"]:
            w, v = m["watcher"]["peak"], m["vipsthumbnail"]["peak"]
            out.append(f"M: worker peak {w:.1f} MiB vs vipsthumbnail {v:.1f} MiB "
                       f"{'MET' if w <= v else 'MISSED'}")
    if "C" in results and len(results["C"]) == 2:
        one, two = results["C"][0]["wall"], results["C"][1]["wall"]
        ideal = results["C_ideal_s"]
        out.append(f"C: 2 workers {two:.2f} s for an ideal {ideal:.1f} s: "
                   f"{ideal / two * 100:.1f} % parallel efficiency; 1 worker {one:.2f} s "
                   f"(target <= {ideal * 1.03:.1f} s) {'MET' if two <= ideal * 1.03 else 'MISSED'}")
    if "W" in results:
        w = results["W"]
        t_batch = results.get("T_images_per_s")
        if t_batch:
            ratio = w["burst_images_per_s"] / t_batch
            out.append(f"W: burst {w['burst_images_per_s']:.1f} images/s = {ratio:.2f}x batch T "
                       f"(target >= 0.95) {'MET' if ratio >= 0.95 else 'MISSED'}")
        out.append(f"W: idle file closed -> output: p50 {w['idle_latency_ms_p50']:.1f} ms "
                   f"(work {w['idle_work_ms_p50']:.1f} ms, overhead p50 "
                   f"{w['idle_overhead_ms_p50']:.1f} ms <= 20: "
                   f"{'MET' if w['idle_overhead_ms_p50'] <= 20 else 'MISSED'}, p99 "
                   f"{w['idle_overhead_ms_p99']:.1f} ms <= 100: "
                   f"{'MET' if w['idle_overhead_ms_p99'] <= 100 else 'MISSED'})")
        rss = w["daemon_rss_mib_with_backlog"]
        out.append(f"W: daemon RSS with {w['backlog']} files waiting: {rss:.0f} MiB "
                   f"(target <= 150) {'MET' if rss <= 150 else 'MISSED'}")
        drain = w.get("drain") or []
        for b in drain:
            out.append(f"W: burst of {b['files']} tiny files drains at {b['files_per_s']:.0f} "
                       f"files/s, daemon peak RSS {b['daemon_rss_mib']:.0f} MiB")
        if len(drain) >= 2:
            first, last = drain[0], drain[-1]
            ratio = last["files_per_s"] / first["files_per_s"]
            out.append(f"W: drain rate at {last['files']} = {ratio:.2f}x the rate at "
                       f"{first['files']} (target >= 0.9) {'MET' if ratio >= 0.9 else 'MISSED'}; "
                       f"RSS {last['daemon_rss_mib']:.0f} MiB (target <= 150) "
                       f"{'MET' if last['daemon_rss_mib'] <= 150 else 'MISSED'}")
        o = w.get("overflow")
        if isinstance(o, dict):
            out.append(f"W: queue overflow ({o['overflows']}x, {o['found_by_rescan']} files "
                       f"found by the rescan) -> first claim in "
                       f"{o['overflow_to_first_claim_ms']} ms")
        elif o:
            out.append(f"W: overflow: {o}")
    if "P" in results:
        from bench_status import verdict

        out += verdict(results["P"])
    return out


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    jobs = [j for j in ("T", "G", "S") if j in results]
    fig, axes = plt.subplots(1, max(1, len(jobs)), figsize=(4.2 * max(1, len(jobs)), 3.6))
    axes = axes if len(jobs) > 1 else [axes]
    for ax, job in zip(axes, jobs, strict=False):
        runs = [r for r in results[job]["runs"] if r["ok"]]
        names = [r["impl"] for r in runs]
        ips = [results[job]["images"] / r["wall"] for r in runs]
        colours = ["#d9534f" if n == "watcher" else "#7a8ca3" for n in names]
        ax.barh(names, ips, color=colours)
        ax.set_title(f"job {job}: images/s (2 cores)")
        ax.invert_yaxis()
        for i, v in enumerate(ips):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a small slice, one round: seconds")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per job (default 3; quick 1)")
    ap.add_argument("--jobs", default="T,G,S,M,X,C,W,P")
    ap.add_argument("--bursts", default="1000,10000,100000",
                    help="job W: burst sizes for the drain rate (default 1000,10000,100000)")
    ap.add_argument("--json", default="", help="write the figures here (default: bench.json in "
                                                "the work folder)")
    ap.add_argument("--chart", default="", help="write the chart PNG here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--executor", choices=["local", "dask-local"], default="local",
                    help="dask-local: also run jobs S and T on a Dask LocalCluster and report "
                         "its overhead against local worker processes")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    jobs = [j.strip().upper() for j in args.jobs.split(",") if j.strip()]
    global RUN_DIR
    work = Path(tempfile.mkdtemp(prefix="watcher-bench-", dir="/var/tmp"))
    RUN_DIR = work
    try:
        src, real = corpus(args.quick, work)
        photos = sorted((src / "photos").iterdir())
        small = sorted((src / "small").iterdir())
        counts = {}
        for job, folder in (("T", photos), ("G", photos), ("S", small)):
            mp = 0.0
            for p in folder:
                with Image.open(p) as im:
                    mp += im.width * im.height / 1e6
            counts[job] = (len(folder), mp)
        for p in (*photos, *small):  # warm the page cache
            p.read_bytes()
        results: dict[str, Any] = {"corpus": str(src), "real_corpus": real, "rounds": rounds,
                                   "quick": args.quick, "cores": CORES}
        for job in ("T", "G", "S"):
            if job in jobs:
                folder = src / ("small" if job == "S" else "photos")
                runs, q = bench_throughput(job, folder, rounds, work,
                                           small if job == "S" else photos)
                results[job] = {"runs": [{**asdict(r), "wall": r.wall, "peak": r.peak}
                                         for r in runs], "quality": q,
                                "images": counts[job][0], "input_mp": counts[job][1]}
                print(f"job {job} done", file=sys.stderr, flush=True)
        if "T" in results:
            w = next(r for r in results["T"]["runs"] if r["impl"] == "watcher")
            results["T_images_per_s"] = counts["T"][0] / w["wall"]
        if worst:
            results["worker_peak_mib"] = dict(worst)
        if "X" in jobs:
            results["X"] = bench_memory_hostile(src / "big" / "b0.jpg", work)
            print("job X done", file=sys.stderr, flush=True)
        if "M" in jobs:
            results["M"] = [{**asdict(r), "wall": r.wall, "peak": r.peak}
                            for r in bench_memory(src / "big" / "b0.jpg", rounds, work)]
        if "C" in jobs:
            n, s = (8, 0.25) if args.quick else (100, 1.0)
            results["C"] = [{**asdict(r), "wall": r.wall, "peak": r.peak}
                            for r in bench_cpu(n, s, work)]
            results["C_ideal_s"] = n * s / CORES
        if "W" in jobs:
            idle, backlog = (10, 300) if args.quick else (100, 10_000)
            results["W"] = bench_watch(photos, small, idle, backlog, work, rounds)
            sizes = [int(x) for x in args.bursts.split(",") if x.strip()]
            if args.quick:
                sizes = [n // 10 for n in sizes[:2]]
            results["W"].update(bench_drain(sizes, work))
        if "P" in jobs:
            from bench_status import bench_status_page

            results["P"] = bench_status_page(WATCHER, small, work, 1000 if args.quick else
                                             10_000, 5 if args.quick else 50)
            print("job P done", file=sys.stderr, flush=True)
        if args.executor != "local":
            results["executor"] = {}
            for job in ("S", "T"):
                folder = src / ("small" if job == "S" else "photos")
                results["executor"][job] = bench_executor(
                    job, folder, rounds, work, small if job == "S" else photos, args.executor)
                print(f"job {job} on {args.executor} done", file=sys.stderr, flush=True)
        print(table(results, counts))
        print()
        for job, e in results.get("executor", {}).items():
            if "slowdown" not in e:
                print(f"{job} on {e['executor']}: did not run ({e['runs']})")
                continue
            walls = {r["impl"]: r["wall"] for r in e["runs"]}
            q = e["quality"]
            print(f"{job} on {e['executor']}: " + ", ".join(f"{k} {v:.3f} s" for k, v in
                                                         walls.items())
                  + f"; {e['slowdown']:.2f}x the local time, +{e['extra_s']:.2f} s = "
                  f"{e['extra_ms_per_file']:.2f} ms per file ({e['images']} files, cluster "
                  f"start-up included); quality {q['pass']}/{q['n']}")
        print()
        for line in verdicts(results):
            print(line)
        results["verdicts"] = verdicts(results)
        out_json = Path(args.json) if args.json else work / "bench.json"
        out_json.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nfigures: {out_json}")
        if args.chart and chart(results, Path(args.chart)):
            print(f"chart: {args.chart}")
        return 0
    finally:
        if not args.keep and not args.json.startswith(str(work)):
            with contextlib.suppress(OSError):
                shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
