"""The memory governor (watcher.imaging.memory): the cap, the estimate before decoding, the ceiling.

Real images, real worker processes, real limits: a worker's data segment really is limited
(RLIMIT_DATA), a real cgroup's limit really sets the default cap, and the estimate is checked
against the peak a fresh process really reaches on the same file.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import ROOT, make_image, run_cli
from tests.test_watch import Daemon
from watcher import config
from watcher.errors import ConfigError
from watcher.imaging import memory

MiB = 2**20


# --- the cap and its settings -------------------------------------------------------------------

def test_the_default_cap_shares_the_limit_less_the_reserve() -> None:
    assert memory.default_cap(2, limit=2 * 1024 * MiB) == (2048 - 256) // 2 * MiB
    assert memory.default_cap(4, limit=1024 * MiB) == 192 * MiB
    assert memory.default_cap(64, limit=1024 * MiB) == memory.MIN_CAP  # never below
    assert memory.resolve(300 * MiB, 2) == 300 * MiB  # a setting wins
    assert memory.resolve(0, 1) == memory.default_cap(1)


def test_max_worker_memory_is_checked_where_it_is_set(tmp_path: Path) -> None:
    toml = tmp_path / "w.toml"
    toml.write_text('[engine]\nmax_worker_memory = "1.5 GiB"\n')
    assert config.load(toml).engine.max_worker_memory == int(1.5 * 1024 * MiB)
    toml.write_text('[engine]\nmax_worker_memory = "64 MB"\n')
    with pytest.raises(ConfigError, match=r"w.toml: engine.max_worker_memory: must be 0 \(auto\)"):
        config.load(toml)
    toml.write_text('[engine]\nmax_worker_memory = "lots"\n')
    with pytest.raises(ConfigError, match=r"engine\.max_worker_memory: expected a size"):
        config.load(toml)
    s = config.from_environment(config.load(None), {"WATCHER_MAX_WORKER_MEMORY": "512MiB"})
    assert s.engine.max_worker_memory == 512 * MiB
    with pytest.raises(ConfigError, match="WATCHER_MAX_WORKER_MEMORY"):
        config.from_environment(config.load(None), {"WATCHER_MAX_WORKER_MEMORY": "1 KB"})
    bad = run_cli("batch", str(tmp_path), "-o", str(tmp_path / "o"), "--max-worker-memory",
                  "ten")
    assert bad.returncode == 2 and "--max-worker-memory" in bad.stderr, bad.stderr


def _cgroup_v1_memory() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    return root if (root / "cgroup.procs").exists() and os.access(root, os.W_OK) else None


@pytest.mark.skipif(_cgroup_v1_memory() is None, reason="no writable cgroup v1 memory controller")
def test_a_real_cgroup_limit_sets_the_default_cap(tmp_path: Path) -> None:
    """A batch started in a cgroup limited to 700 MB (as a unit's MemoryMax or a container's
    limit does): each worker gets (700 MB - 256 MiB) / 2 and runs with that as its RLIMIT_DATA,
    and an image that would need more is refused before decoding, so the kernel never has to
    kill anything."""
    group = _cgroup_v1_memory() / f"watcher-test-{os.getpid()}"  # type: ignore[operator]
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text("700000000")
        src = tmp_path / "in"
        make_image(src / "small.jpg", size=(640, 480))
        Image.new("RGBA", (9000, 9000), (1, 2, 3, 4)).save(src / "huge.png")
        report = tmp_path / "r.json"
        script = (f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -m watcher batch "
                  f"{src} -o {tmp_path / 'out'} --ops resize_half -j 2 --report {report} "
                  "--no-progress")
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        items = {Path(i["input"]).name: i for i in json.loads(report.read_text())["items"]}
        cap = (700000000 - memory.RESERVE) // 2 // MiB
        assert items["small.jpg"]["status"] == "ok", done.stderr
        assert items["huge.png"]["reason"] == "too-large"
        assert f"max_worker_memory is {cap} MiB" in items["huge.png"]["error"]
        assert int((group / "memory.failcnt").read_text()) == 0  # never reached the limit
    finally:
        group.rmdir()


# --- the estimate -------------------------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, sys, tempfile
    from watcher import config
    from watcher.imaging import memory
    from watcher.settings.schema import DecodeLimits
    from watcher.imaging.pipeline import Pipeline
    from watcher.imaging.processor import Processor
    from watcher.tasks import OutputPlan, Task
    from PIL import Image
    src, ops, fmt, frames = sys.argv[1:5]
    lossless = fmt.endswith("-lossless")
    fmt = fmt.removesuffix("-lossless")
    opts = config.output_options({"format": fmt, "frames": frames, "lossless": lossless,
                                  "quality": 100}, "o")
    steps = [config.parse_step(x, "ops") for x in config.split_ops(ops)] if ops else []
    p = config.pipeline_from(steps, "p", "x", opts) if steps else \\
        Pipeline(name="p", steps=(), suffix="x", output=opts)
    ext = {"jpeg": ".jpg", "webp": ".webp", "png": ".png", "avif": ".avif", "gif": ".gif"}[fmt]
    proc = Processor({"p": p}, DecodeLimits(), memory_cap=64 * 2**30)
    seen = {}
    real = memory.estimate
    def spy(*a, **k):
        seen["need"] = real(*a, **k)
        return seen["need"]
    memory.estimate = spy
    Image.open(src).close()
    base = memory.rss()
    out = os.path.join(tempfile.mkdtemp(), "o" + ext)
    r = proc.run(Task(seq=1, path=src, outputs=(OutputPlan(pipeline="p", path=out),),
                      overwrite=True))
    # VmHWM, not ru_maxrss: that one keeps the peak of the process image before exec (pytest)
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    peak = int(hwm.split()[1]) * 1024 - base
    print(json.dumps({"ok": r.ok, "error": r.error, "measured": peak,
                      "estimate": seen["need"].peak}))
""")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    make_image(d / "photo.jpg", size=(4000, 3000), quality=90)
    make_image(d / "progressive.jpg", size=(4000, 3000), quality=90, progressive=True)
    make_image(d / "alpha.png", size=(3000, 3000), mode="RGBA")
    make_image(d / "still.webp", size=(3000, 2000), quality=80)
    Image.frombytes("RGB", (2000, 2000), random.Random(3).randbytes(2000 * 2000 * 3)).save(
        d / "noise.png", compress_level=1)
    frames = [make_image(d / f"f{i}.png", size=(600, 600), seed=i) for i in range(20)]
    ims = [Image.open(f).convert("P") for f in frames]
    ims[0].save(d / "anim.gif", save_all=True, append_images=ims[1:], duration=40)
    return d


@pytest.mark.integration
@pytest.mark.parametrize(("name", "ops", "fmt", "frames"), [
    ("photo.jpg", "", "jpeg", "first"),
    ("photo.jpg", "", "webp", "first"),
    ("photo.jpg", "rotate(45)", "jpeg", "first"),
    ("photo.jpg", "sharpen", "png", "first"),
    ("progressive.jpg", "", "jpeg", "first"),
    ("alpha.png", "resize_half", "png", "first"),
    ("alpha.png", "blur(2)", "webp", "first"),
    ("alpha.png", "grayscale", "jpeg", "first"),
    ("still.webp", "", "avif", "first"),
    ("anim.gif", "", "webp", "all"),
    ("noise.png", "", "webp", "first"),
    ("noise.png", "", "webp-lossless", "first"),
])
def test_the_estimate_covers_what_decoding_and_processing_really_take(
        photos: Path, name: str, ops: str, fmt: str, frames: str) -> None:
    """Each case in a fresh process: the peak it reaches beyond its start, against the
    estimate made from the header before decoding. The estimate may miss by a little (the
    ceiling is there for that) and must not refuse what fits by much."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(photos / name), ops, fmt, frames],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["ok"], r["error"] or done.stderr
    measured, est = r["measured"], r["estimate"]
    assert measured <= est * 1.25 + 16 * MiB, f"estimate {est / MiB:.0f} MiB < {measured / MiB:.0f}"
    # libwebp's buffers grow with the image's entropy: the estimate takes noise's (see
    # test_the_webp_estimate_covers_noise), over 4x a photo's
    over = 4.5 if fmt == "webp" else 1.8
    assert est <= measured * over + 24 * MiB, \
        f"estimate {est / MiB:.0f} MiB >> {measured / MiB:.0f}"


@pytest.mark.integration
def test_an_input_over_the_cap_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """A 367 KB PNG of 9000x9000 RGBA needs ~850 MiB to halve; a 48 MP photo turned by 45
    degrees ~600 MiB: with a 256 MiB cap both are too-large, naming the estimate, and the
    worker never held their pixels (its peak stays far below one decoded image). The small
    photo beside them is made."""
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGBA", (9000, 9000), (10, 20, 30, 40)).save(src / "bomb.png")
    make_image(src / "wide.jpg", size=(8000, 6000), quality=70)
    make_image(src / "small.jpg", size=(800, 600))
    report = tmp_path / "r.json"
    for ops, big in (("resize_half", "bomb.png"), ("rotate(45)", "wide.jpg")):
        done = run_cli("batch", str(src / big), str(src / "small.jpg"), "-o",
                       str(tmp_path / "out"), "--ops", ops, "--max-worker-memory", "256MiB",
                       "--on-conflict", "overwrite", "--report", str(report), "--no-progress",
                       timeout=120)
        items = {Path(i["input"]).name: i for i in json.loads(report.read_text())["items"]}
        assert done.returncode == 1, done.stderr
        assert items["small.jpg"]["status"] == "ok"
        bad = items[big]
        assert bad["reason"] == "too-large", bad
        assert "would need about" in bad["error"] and "max_worker_memory is 256 MiB" in bad["error"]
        # decoding would have taken 309 MiB (the PNG) or 183 MiB (the JPEG) by itself
        assert bad["worker_peak_rss_kb"] * 1024 < 120 * MiB, bad


CALLABLE = textwrap.dedent("""
    def blow_up(im):
        return im.resize((im.width * 6, im.height * 6))
""")


@pytest.mark.integration
def test_what_the_estimate_misses_is_stopped_by_the_ceiling_and_charges_nobody_else(
        tmp_path: Path) -> None:
    """A user transform the estimate cannot size (it makes a 12000x9000 image, 412 MiB) in
    a worker capped at 256 MiB: its allocation fails in the worker, the input is too-large
    ("needed more memory"), the worker never exceeds the cap, it is replaced after that task,
    and the other inputs (before and after, on the same single worker) are made."""
    (tmp_path / "blowmod.py").write_text(CALLABLE)
    src = tmp_path / "in"
    make_image(src / "a.jpg", size=(400, 300))
    make_image(src / "b.jpg", size=(2000, 1500))
    make_image(src / "c.jpg", size=(300, 200))
    code = textwrap.dedent(f"""
        import json, watcher, blowmod
        r = watcher.process_images([{str(src / 'a.jpg')!r}, {str(src / 'b.jpg')!r},
                                    {str(src / 'c.jpg')!r}], {str(tmp_path / 'out')!r},
                                   [blowmod.blow_up], workers=1, max_worker_memory="256MiB")
        print(json.dumps([i.__dict__ for i in r.items]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    items = {Path(i["input"]).name: i for i in json.loads(done.stdout.splitlines()[-1])}
    assert items["b.jpg"]["reason"] == "too-large", items["b.jpg"]
    assert "needed more memory than the worker's max_worker_memory (256 MiB)" in \
        items["b.jpg"]["error"]
    assert items["a.jpg"]["status"] == items["c.jpg"]["status"] == "ok", done.stderr
    assert items["b.jpg"]["worker_peak_rss_kb"] * 1024 <= 256 * MiB
    assert items["c.jpg"]["worker_pid"] != items["b.jpg"]["worker_pid"]  # a fresh worker took over
    assert "worker-crashed" not in done.stdout and "Traceback" not in done.stderr


def test_the_ceiling_is_the_data_segment_limit() -> None:
    """set_ceiling really limits this process's heap (in a child, not the test process)."""
    code = ("import sys; from watcher.imaging import memory\n"
            "assert memory.set_ceiling(200 * 2**20)\n"
            "try:\n    b = bytearray(400 * 2**20)\nexcept MemoryError:\n    sys.exit(7)\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 7
    assert resource.getrlimit(resource.RLIMIT_DATA)[0] == resource.RLIM_INFINITY  # not ours


@pytest.mark.integration
def test_an_encoder_out_of_memory_under_the_ceiling_is_too_large(tmp_path: Path) -> None:
    """libwebp failing to allocate under the ceiling (Pillow's "encoding error 1") is the
    input's ``too-large``, not ``encode-failed``; no estimate here (cap 0), only the ceiling."""
    src = tmp_path / "noise.png"
    Image.frombytes("RGB", (2000, 2000), random.Random(4).randbytes(2000 * 2000 * 3)).save(
        src, compress_level=1)
    code = textwrap.dedent(f"""
        import json
        from watcher import config
        from watcher.imaging import memory
        from watcher.settings.schema import DecodeLimits
        from watcher.imaging.pipeline import Pipeline
        from watcher.imaging.processor import Processor
        from watcher.tasks import OutputPlan, Task
        opts = config.output_options({{"format": "webp", "lossless": True}}, "o")
        proc = Processor({{"p": Pipeline(name="p", steps=(), suffix="x", output=opts)}},
                         DecodeLimits())
        assert memory.set_ceiling(memory.rss() + 60 * 2**20)  # the decode fits, libwebp not
        r = proc.run(Task(seq=1, path={str(src)!r},
                          outputs=(OutputPlan(pipeline="p", path={str(tmp_path / 'o.webp')!r}),)))
        print(json.dumps({{"reason": r.reason, "error": r.error, "exhausted": proc.exhausted}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["reason"] == "too-large", (r, done.stderr)
    assert "needed more memory" in r["error"] and r["exhausted"] is True
    assert not (tmp_path / "o.webp").exists()


# --- the daemon ---------------------------------------------------------------------------------

@pytest.mark.integration
def test_the_daemon_quarantines_a_too_large_input_and_goes_on(tmp_path: Path) -> None:
    """A PNG that decodes to 244 MiB, for the default thumbnail pipeline, with 200 MiB per
    worker: quarantined too-large with its estimate; the next file is made by the same pool."""
    d = Daemon(tmp_path, "--max-worker-memory", "200MiB", "-j", "1")
    try:
        started = d.seen("daemon.started")[0]
        assert started["max_worker_memory"] == 200 * MiB
        Image.new("RGBA", (8000, 8000), (5, 5, 5, 5)).save(tmp_path / "big.part.png")
        os.rename(tmp_path / "big.part.png", tmp_path / "inbox" / "big.png")
        q = d.wait_for("file.quarantined", timeout=60)[0]
        assert q["reason"] == "too-large" and "would need about" in q["error"]
        make_image(tmp_path / "inbox" / "after.jpg", size=(640, 480))
        d.wait_for("file.processed", timeout=60, input="after.jpg")
        side: dict[str, Any] = json.loads(
            (tmp_path / "quarantine" / "big.png.error.json").read_text())
        assert side["reason"] == "too-large"
    finally:
        assert d.stop() == 0
    assert not d.seen("worker.died")
