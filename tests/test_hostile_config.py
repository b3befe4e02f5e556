"""Hostile configuration: steps and config files nested thousands deep, empty and huge ``--ops``
values. Each is refused as a config or usage error naming where (exit 2), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import json_lines, make_image, run_cli
from watcher.errors import REASONS

pytestmark = pytest.mark.integration


def assert_refused(proc: object, *needles: str) -> str:
    err = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 2, err[-3000:]  # type: ignore[attr-defined]
    assert "Traceback" not in err and "RecursionError" not in err, err[-3000:]
    assert "internal_error" not in err and "internal error" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, err[-3000:]
    return err


@pytest.mark.parametrize("ops", [
    "thumbnail(" + "[" * 1000 + "]" * 1000 + ")",
    "thumbnail(" + "(" * 3000 + ")" * 3000 + ")",
    "f(" * 1000,
])
def test_a_step_nested_thousands_deep_is_a_usage_error(tmp_path: Path, ops: str) -> None:
    make_image(tmp_path / "a.png")
    proc = run_cli("batch", "a.png", "-o", "out", "--ops", ops, cwd=tmp_path)
    err = assert_refused(proc, "watcher batch: error: --ops: cannot read step")
    assert len(err) < 4000, len(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("body", "where"), [
    ('[pipelines.x]\nsteps = ["thumbnail(' + "[" * 1000 + "]" * 1000 + ')"]\n',
     "pipelines.x.steps[0]"),
    ("[pipelines.x]\nsteps = " + "[" * 1000 + "]" * 1000 + "\n", "line 2: arrays or inline"),
    ('[pipelines.x]\nsteps = [{op = "thumbnail", width = ' + "[" * 600 + "]" * 600 + "}]\n",
     "line 2: arrays or inline"),
    ("# a comment [[[[\n" + "a = " + "{b=" * 1000 + "1" + "}" * 1000 + "\n",
     "line 2: arrays or inline"),
])
def test_a_config_file_nested_thousands_deep_is_a_config_error(tmp_path: Path, body: str,
                                                               where: str) -> None:
    (tmp_path / "watcher.toml").write_text(body)
    proc = run_cli("check-config", "--config", "watcher.toml", cwd=tmp_path)
    assert_refused(proc, "watcher.toml", where)
    make_image(tmp_path / "a.png")
    proc = run_cli("batch", "a.png", "-o", "out", "--config", "watcher.toml", cwd=tmp_path)
    assert_refused(proc, "watcher.toml", where)


def test_brackets_in_strings_and_comments_do_not_count_as_nesting(tmp_path: Path) -> None:
    deep = "[" * 150
    (tmp_path / "watcher.toml").write_text(
        f'# {deep}\n[pipelines.x]\nsuffix = "x"\nsteps = ["grayscale"]  # {deep}\n'
        f'[pipelines.y]\nsuffix = "y"\nsteps = [{{op = "grayscale"}}]\n')
    proc = run_cli("check-config", "--config", "watcher.toml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("ops", ["x" * 100_000, "x" * 100_000 + "(1", "grayscale, " + "y" * 5000])
def test_a_huge_step_name_is_refused_in_a_short_message(tmp_path: Path, ops: str) -> None:
    make_image(tmp_path / "a.png")
    proc = run_cli("batch", "a.png", "-o", "out", "--ops", ops, cwd=tmp_path)
    err = assert_refused(proc, "watcher batch: error: --ops")
    assert len(err) < 2000, len(err)
    assert all(len(line) < 400 for line in err.splitlines()), err


@pytest.mark.parametrize("ops", ["", " ", ",", " ; | "])
def test_an_empty_ops_is_refused(tmp_path: Path, ops: str) -> None:
    make_image(tmp_path / "a.png")
    proc = run_cli("batch", "a.png", "-o", "out", "--ops", ops, cwd=tmp_path)
    assert_refused(proc, "usage: watcher batch", "--ops: no steps given")
    assert not (tmp_path / "out").exists()


def test_quarantine_list_refuses_an_unknown_reason_listing_the_known_ones(
        tmp_path: Path) -> None:
    (tmp_path / "watcher.toml").write_text(
        '[watch]\ninbox = "in"\noutput = "out"\narchive = "done"\nquarantine = "bad"\n'
        'work = "work"\n')
    for d in ("in", "out", "done", "bad", "work"):
        (tmp_path / d).mkdir()
    proc = run_cli("quarantine", "list", "--reason", "nope", cwd=tmp_path)
    err = assert_refused(proc, "usage: watcher quarantine list", "--reason", "'nope'")
    for reason in REASONS:
        assert f"'{reason}'" in err, reason
    ok = run_cli("quarantine", "list", "--reason", "truncated", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_batch_finished_logs_interrupted_as_an_int(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    proc = run_cli("batch", "a.png", "-o", "out", "--log-format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (finished,) = [e for e in json_lines(proc.stderr) if e["event"] == "batch.finished"]
    assert finished["interrupted"] == 0 and type(finished["interrupted"]) is int, finished
