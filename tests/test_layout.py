"""The daemon's folder layout is checked whole: five folders, pairwise distinct, none inside
another, each overlap refused at start naming both folders."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli
from watcher.errors import ConfigError
from watcher.watch import lifecycle

KEYS = ("inbox", "output", "archive", "quarantine", "work")


def named(tmp_path: Path, **over: str) -> dict[str, str]:
    names = {k: str(tmp_path / k) for k in KEYS}
    names.update({k: str(tmp_path / v) for k, v in over.items()})
    return names


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(KEYS, 2)))
def test_two_folders_the_same_are_refused(tmp_path: Path, a: str, b: str) -> None:
    f = lifecycle.Folders(named(tmp_path, **{b: a}))
    with pytest.raises(ConfigError) as e:
        f.check()
    assert f"watch.{a}" in e.value.message and f"watch.{b}" in e.value.message
    assert "the same folder" in e.value.message
    assert not (tmp_path / a).exists() or not any((tmp_path / a).iterdir())


@pytest.mark.parametrize(("outer", "inner"), list(itertools.permutations(KEYS, 2)))
def test_a_folder_inside_another_is_refused(tmp_path: Path, outer: str, inner: str) -> None:
    f = lifecycle.Folders(named(tmp_path, **{inner: f"{outer}/{inner}"}))
    with pytest.raises(ConfigError) as e:
        f.check()
    assert f"watch.{outer}" in e.value.message and f"watch.{inner}" in e.value.message
    assert "inside" in e.value.message


def test_overlap_through_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    os.symlink(tmp_path / "archive", tmp_path / "alias")
    f = lifecycle.Folders(named(tmp_path, quarantine="alias"))
    with pytest.raises(ConfigError, match=r"watch\.archive .* and watch\.quarantine"):
        f.check()


def test_instances_parent_must_not_hold_other_folders(tmp_path: Path) -> None:
    names = named(tmp_path, output="work/out")
    names["work"] = str(tmp_path / "work" / "a")
    f = lifecycle.Folders(names, work_root=str(tmp_path / "work"))
    with pytest.raises(ConfigError, match=r"watch\.output"):
        f.check()


def test_distinct_folders_pass(tmp_path: Path) -> None:
    lifecycle.Folders(named(tmp_path)).check()
    assert all((tmp_path / k).is_dir() for k in KEYS)


@pytest.mark.integration
def test_daemon_refuses_archive_equal_to_output_naming_both(tmp_path: Path) -> None:
    proc = run_cli("watch", "--inbox", "in", "--output", "out", "--archive", "out",
                   cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "watch.output" in proc.stderr and "watch.archive" in proc.stderr
    assert "Traceback" not in proc.stderr
