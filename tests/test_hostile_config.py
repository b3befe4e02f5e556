"""Hostile configuration: steps and config files nested thousands deep, empty and huge ``--ops``
values. Each is refused as a config or usage error naming where (exit 2), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_image, run_cli

pytestmark = pytest.mark.integration


def assert_refused(proc: object, *needles: str) -> str:
    err = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 2, err[-3000:]  # type: ignore[attr-defined]
    assert "Traceback" not in err and "RecursionError" not in err, err[-3000:]
    assert "internal" not in err, err[-3000:]
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
