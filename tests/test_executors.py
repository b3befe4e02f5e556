"""The engine's behaviour on both executors: local worker processes and a real multi-process
Dask LocalCluster on 127.0.0.1. Seed examples, bad inputs, a worker SIGKILLed mid-task, a hung
task, a file that kills every worker, SIGTERM drain, late duplicates, and the same outputs and
fates from both. Real processes and deadlines; no sleeps."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import crashers
from tests.conftest import make_image, wait_until
from tests.test_engine import poison, run_all, tasks_for
from watcher import batch, config
from watcher.config import EngineSettings
from watcher.engine.factory import create_executor
from watcher.settings.schema import DecodeLimits
from watcher.tasks import OutputPlan, Result, Task

pytestmark = pytest.mark.integration


def failures(results: dict[str, Result], paths: list[Path]) -> list[tuple[str, str, str]]:
    """The inputs among ``paths`` that did not succeed, with their reason and error."""
    return [(str(p), results[str(p)].reason, results[str(p)].error) for p in paths
            if not results[str(p)].ok]

HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed "
                                "(pip install 'watcher[dask]'); scripts/test installs it")
EXECUTORS = ["local", pytest.param("dask-local", marks=needs_dask)]


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def engine_for(executor: str, steps: list[Any], **settings: Any) -> Any:
    p = config.pipeline_from(steps, "p", "p")
    s = EngineSettings(**{"workers": 2, "task_timeout": 30.0, "grace": 5.0,
                          "executor": executor, **settings})
    return create_executor(s, {"p": p}, DecodeLimits())


def temps(root: Path) -> list[Path]:
    return list(root.rglob("*.watcher-tmp")) if root.exists() else []


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return [make_image(tmp_path / "in" / f"{i}.png", seed=i) for i in range(6)]


def test_seed_example_grayscale_and_half_size(executor: str, tmp_path: Path,
                                              images: list[Path]) -> None:
    e = engine_for(executor, ["grayscale", "resize_half"])
    e.start()
    try:
        results = run_all(e, tasks_for(images, tmp_path / "out"))
    finally:
        e.close()
    assert all(r.ok for r in results.values()), results
    for p in images:
        out = tmp_path / "out" / f"{p.stem}_p.png"
        assert results[str(p)].outputs == (str(out),)
        from PIL import Image

        with Image.open(out) as im:
            assert im.mode == "L" and im.size == (32, 24)
    assert not temps(tmp_path / "out")


def test_bad_inputs_fail_with_their_reason_and_the_rest_succeed(
        executor: str, tmp_path: Path, images: list[Path]) -> None:
    text = tmp_path / "in" / "notes.png"
    text.write_text("not an image")
    cut = tmp_path / "in" / "cut.jpg"
    make_image(cut, size=(256, 256), fmt="JPEG")
    cut.write_bytes(cut.read_bytes()[:600])
    e = engine_for(executor, ["thumbnail(16, 16)"])
    e.start()
    try:
        results = run_all(e, tasks_for([*images, text, cut], tmp_path / "out"))
    finally:
        e.close()
    assert results[str(text)].reason == "not-an-image"
    assert results[str(cut)].reason in ("truncated", "corrupt")
    assert all(results[str(p)].ok for p in images), failures(results, images)
    assert not (tmp_path / "out" / "notes_p.png").exists()
    assert not temps(tmp_path / "out")


def test_a_file_that_kills_every_worker_is_charged_worker_crashed(
        executor: str, tmp_path: Path, images: list[Path]) -> None:
    bad = poison(tmp_path / "in" / "bad.png")
    e = engine_for(executor, [crashers.kill_on_poison, "thumbnail(8, 8)"])
    e.start()
    try:
        results = run_all(e, tasks_for([*images, bad], tmp_path / "out"))
        # the cluster (or the pool) still serves other files afterwards
        more = [Task(seq=t.seq + 100, path=t.path,
                     outputs=(OutputPlan(pipeline="p", path=str(tmp_path / "more" /
                                                                f"{Path(t.path).stem}.png")),))
                for t in tasks_for(images[:2], tmp_path)]
        again = run_all(e, more)
    finally:
        e.close()
    r = results[str(bad)]
    assert (r.ok, r.reason, r.attempt) == (False, "worker-crashed", 2)
    assert all(results[str(p)].ok for p in images), failures(results, images)
    assert all(r.ok for r in again.values())
    assert e.stats.crashes >= 1
    assert not temps(tmp_path / "out")


def test_worker_sigkilled_mid_task_reruns_the_task(executor: str, tmp_path: Path) -> None:
    slow = tmp_path / "in" / "slow.png"
    slow.parent.mkdir(parents=True)
    crashers.slow_image(str(slow), 2.0)
    e = engine_for(executor, [crashers.slow], workers=1)
    e.start()
    try:
        task = tasks_for([slow], tmp_path / "out")[0]
        e.submit(task)
        wait_until(lambda: e.poll(0.05) or e.running() == [str(slow)], 30,
                   "the worker to start the task")
        for pid in e.pids:
            os.kill(pid, signal.SIGKILL)
        results: list[Result] = []
        deadline = time.monotonic() + 60
        while e.outstanding and time.monotonic() < deadline:
            results += e.poll(0.2)
    finally:
        e.close()
    assert len(results) == 1 and results[0].ok, results
    assert (tmp_path / "out" / "slow_p.png").is_file()


def test_hung_task_times_out_and_its_worker_is_replaced(executor: str, tmp_path: Path,
                                                         images: list[Path]) -> None:
    bad = poison(tmp_path / "in" / "hang.png")
    e = engine_for(executor, [crashers.hang_on_poison], task_timeout=2.0)
    e.start()
    try:
        results = run_all(e, tasks_for([bad, *images], tmp_path / "out"))
        after = run_all(e, [Task(seq=50, path=str(images[0]),
                                 outputs=(OutputPlan(pipeline="p",
                                                     path=str(tmp_path / "after.png")),))])
    finally:
        e.close()
    r = results[str(bad)]
    assert (r.ok, r.reason) == (False, "timeout")
    assert all(results[str(p)].ok for p in images), failures(results, images)
    assert all(x.ok for x in after.values())
    assert e.stats.timeouts == 1
    if r.worker:
        wait_until(lambda: not _alive(r.worker), 20, "the hung worker to be gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_close_lets_running_tasks_finish_and_withdraws_the_rest(executor: str,
                                                                 tmp_path: Path) -> None:
    paths = []
    for i in range(6):
        p = tmp_path / "in" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        crashers.slow_image(str(p), 1.5)
        paths.append(p)
    e = engine_for(executor, [crashers.slow], workers=2, tasks_per_worker=1)
    e.start()
    for t in tasks_for(paths, tmp_path / "out"):
        e.submit(t)
    wait_until(lambda: e.poll(0.05) or len(e.running()) == 2, 30, "both workers to be busy")
    withdrawn = e.stop_intake()
    results = e.close(grace=20)
    assert len(results) == 2 and all(r.ok for r in results), results
    assert len(withdrawn) == 4
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


@needs_dask
def test_dask_late_duplicate_result_is_dropped_and_its_temps_removed(
        tmp_path: Path, images: list[Path]) -> None:
    e = engine_for("dask-local", ["mirror"])
    e.start()
    try:
        task = tasks_for(images[:1], tmp_path / "out")[0]
        e.submit(task)
        e.submit(task)  # the same task twice: two attempts run, one result counts
        results: list[Result] = []
        deadline = time.monotonic() + 60
        while (e.outstanding or e.stats.duplicates < 1) and time.monotonic() < deadline:
            results += e.poll(0.2)
    finally:
        e.close()
    assert len(results) == 1 and results[0].ok
    assert e.stats.duplicates == 1
    assert not temps(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["0_p.png"]


@needs_dask
def test_dask_and_local_give_the_same_outputs_and_fates(tmp_path: Path) -> None:
    src = tmp_path / "in"
    for i, fmt in enumerate(["PNG", "JPEG", "WEBP", "TIFF", "BMP"]):
        make_image(src / f"seed{i}.{fmt.lower()}", size=(120, 90), fmt=fmt, seed=i)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    inputs, _ = batch.expand([str(src)])
    pipes = config.default_settings().select(["thumbnail"])
    reports = {}
    for ex in ("local", "dask-local"):
        s = config.load(None, workers=2, executor=ex)
        reports[ex] = batch.run(inputs, str(tmp_path / ex), pipes, s)
    fates = {ex: sorted((Path(i.input).name, i.status, i.reason) for i in r.items)
             for ex, r in reports.items()}
    assert fates["local"] == fates["dask-local"]
    assert ("broken.jpg", "failed", "corrupt") in fates["local"] or \
        any(f[0] == "broken.jpg" and f[1] == "failed" for f in fates["local"])
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "dask-local").iterdir())
    assert len(names) == 5
    for n in names:
        assert (tmp_path / "local" / n).read_bytes() == (tmp_path / "dask-local" / n).read_bytes()


def test_batch_cli_sigterm_drains_running_tasks(executor: str, tmp_path: Path) -> None:
    token = (os.getpid() + 7) % 256
    for m in crashers.started_markers(token):
        os.unlink(m)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        crashers.slow_marked_image(str(src / f"{i}.png"), 2.0, token)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "watcher", "batch", str(src), "--out", str(tmp_path / "out"),
           "--ops", "tests.crashers.slow_marked", "--workers", "2", "--executor", executor,
           "--report", str(report), "--no-progress", "--log-format", "json"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or crashers.started_markers(token), 60,
                   "a task to start")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for m in crashers.started_markers(token):
            os.unlink(m)
    assert proc.returncode == 143, err[-2000:]
    items = json.loads(report.read_text())["items"]
    statuses = [i["status"] for i in items]
    assert statuses.count("ok") >= 1 and "cancelled" in statuses, statuses
    assert set(statuses) <= {"ok", "cancelled"}
    assert len(list((tmp_path / "out").glob("*.png"))) == statuses.count("ok")
    assert not temps(tmp_path / "out")


def test_problems_is_empty_for_a_healthy_run_on_both_executors(
        executor: str, tmp_path: Path, images: list[Path]) -> None:
    # The health check's source (Engine.problems / DaskEngine.problems): nothing to report
    # while healthy workers do their tasks, nor after.
    e = engine_for(executor, ["mirror"])
    e.start()
    try:
        assert e.problems() == []
        results = run_all(e, tasks_for(images, tmp_path / "out"))
        assert e.problems() == []
    finally:
        e.close()
    assert all(r.ok for r in results.values())
