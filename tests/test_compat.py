"""``watcher.compat``: what each private-API workaround relies on is still there and behaves as
assumed. A library upgrade that moves any of it fails here, instead of silently undoing the
workaround (a daemon reaping its own forkserver as PID 1, claims held back half a second each,
an observer walking through a link, a lost overflow, a slow or silent exit)."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from watchdog.observers import inotify, inotify_c
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from watcher import compat

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# --- multiprocessing ---------------------------------------------------------------------------

def test_the_helper_singletons_name_the_running_helpers() -> None:
    from multiprocessing import forkserver, resource_tracker

    assert hasattr(forkserver._forkserver, "_forkserver_pid")
    assert hasattr(resource_tracker._resource_tracker, "_pid")
    resource_tracker.ensure_running()
    forkserver.ensure_running()
    pids = compat.multiprocessing_helper_pids()
    tracker = resource_tracker._resource_tracker._pid
    server = forkserver._forkserver._forkserver_pid
    assert isinstance(tracker, int) and isinstance(server, int)
    assert {tracker, server} <= pids
    for pid in (tracker, server):
        assert _parent_of(pid) == os.getpid()  # our own children, alive


def test_reap_orphans_reaps_others_and_never_multiprocessing_s_own() -> None:
    """A child exited and not waited for (an adopted orphan, to PID 1) is reaped; the resource
    tracker (alive) and a listed pid (an engine's worker) that exited are not."""
    r = _run("""
        import multiprocessing, os, time
        from multiprocessing import resource_tracker
        from watcher import compat

        resource_tracker.ensure_running()
        tracker = resource_tracker._resource_tracker._pid
        orphan = os.fork()
        if orphan == 0:
            os._exit(7)
        time.sleep(0.3)
        compat.reap_orphans(())
        try:
            os.waitpid(orphan, os.WNOHANG)
            reaped = False
        except ChildProcessError:
            reaped = True
        listed = os.fork()
        if listed == 0:
            os._exit(0)
        time.sleep(0.3)
        compat.reap_orphans([listed])
        kept = os.waitpid(listed, 0)[0] == listed
        assert os.waitpid(tracker, os.WNOHANG) == (0, 0)
        print(reaped, kept)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


# --- watchdog ----------------------------------------------------------------------------------

def test_the_installed_watchdog_is_the_one_pinned() -> None:
    major, minor = map(int, importlib.metadata.version("watchdog").split(".")[:2])
    assert (major, minor) in {(7, 0), (7, 1)}  # the internals compat was written against
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("watchdog>=7.0,<7.2") for d in deps)


def test_move_pairing_delay_is_the_class_attribute_each_watch_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(InotifyMoveEventGrouper.delay, float)
    monkeypatch.setattr(InotifyMoveEventGrouper, "delay", InotifyMoveEventGrouper.delay)
    compat.shorten_move_pairing()
    assert InotifyMoveEventGrouper.delay == compat.MOVE_PAIRING_DELAY
    assert InotifyMoveEventGrouper()._queue.delay == compat.MOVE_PAIRING_DELAY
    # each watch group makes its grouper from that class, when it is made
    assert inotify.InotifyMoveEventGrouper is InotifyMoveEventGrouper
    field = inotify.InotifyWatchGroup.__dataclass_fields__["_move_event_grouper"]
    assert field.default_factory is InotifyMoveEventGrouper


def test_the_watch_group_walks_through_the_methods_patched() -> None:
    group = inotify.InotifyWatchGroup
    for name in compat.PATCHED_GROUP_METHODS:
        assert callable(getattr(group, name)), name
    assert "is_recursive" in group.__dataclass_fields__
    # the watch of a folder by its path: 7.1's node tree, else 7.0's dict field
    assert callable(getattr(group, "_find_node_by_path", None)) or \
        "_active_callbacks_by_path" in group.__dataclass_fields__
    # watchdog's own code calls the two walking methods (else the patch would change nothing)
    source = inspect.getsource(group)
    assert "self._add_all_callbacks(" in source and "self._recursive_simulate(" in source
    ev = inotify_c.InotifyEvent(3, inotify_c.InotifyConstants.IN_CREATE |
                                inotify_c.InotifyConstants.IN_ISDIR, 0, b"sub")
    assert ev.is_create and ev.is_directory and ev.wd == 3 and ev.name == b"sub"


def test_watch_without_links_replaces_the_walking_methods() -> None:
    r = _run("""
        from watchdog.observers import inotify
        from watcher import compat

        group = inotify.InotifyWatchGroup
        before = group._add_all_callbacks, group._recursive_simulate
        walked = []

        def walk(top):
            walked.append(top)
            yield top, [b"d"], [b"f"]

        compat.watch_without_links(walk)
        assert (group._add_all_callbacks, group._recursive_simulate) != before
        node = type("N", (), {"wd": 5})()
        fake = type("G", (), {"_active_callbacks_by_path": {b"/x": 5},  # 7.0
                              "_find_node_by_path": lambda self, p: node if p == b"/x" else None})()
        events = group._recursive_simulate(fake, b"/x")
        print(len(events), events[0].is_directory, events[1].is_directory, walked == [b"/x"])
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "True", "False", "True"]


def test_the_overflow_warning_is_still_logged_where_it_is_heard() -> None:
    assert inotify_c.logger.name == compat.OverflowWatch.LOGGER
    assert f'logger.warning("{compat.OverflowWatch.MESSAGE}' in inspect.getsource(inotify_c)
    heard: list[int] = []
    watch = compat.OverflowWatch(lambda: heard.append(1))
    logger = logging.getLogger(compat.OverflowWatch.LOGGER)
    logger.addHandler(watch)
    try:
        logger.warning("Inotify queue overflowed; filesystem events were lost")
        logger.warning("something else")
    finally:
        logger.removeHandler(watch)
    assert heard == [1]


# --- the quick exit ----------------------------------------------------------------------------

def test_quick_exit_runs_exit_handlers_flushes_and_keeps_the_code() -> None:
    assert callable(getattr(__import__("atexit"), "_run_exitfuncs", None))
    r = _run("""
        import atexit, sys
        from watcher import compat
        atexit.register(lambda: sys.stdout.write("handler ran\\n"))
        sys.stdout.write("buffered")
        compat.quick_exit(3)
    """)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "bufferedhandler ran\n"


def test_quick_exit_fails_when_the_output_did_not_get_out() -> None:
    r = _run("""
        import sys
        from watcher import compat
        sys.stdout.close()
        compat.quick_exit(0)
    """)
    assert r.returncode == 1, r.stderr
