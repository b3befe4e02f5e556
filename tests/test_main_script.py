"""Scripts that call the API, run by a real interpreter: a script file without an
``if __name__ == "__main__":`` guard gets one short error (not a flood of forkserver
tracebacks); functions defined in ``python -`` (stdin) and ``python -c`` (as in a notebook) are
sent to the workers by value and work under every start method; what cannot be sent is refused
before any work starts, in one message."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, make_image, wait_until

pytestmark = pytest.mark.integration

# A thread running makes start_method "auto" pick the forkserver, as in a notebook or an
# application with threads of its own; "spawn" is named to cover it too.
SCRIPT = """
import threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
from PIL import ImageOps
from watcher import process_images

def invert(im):
    return ImageOps.invert(im.convert("RGB"))

{call}
"""
CALL = ('report = process_images(["in"], "out", [invert], suffix="inv", workers=2{extra})\n'
        'print("totals", report.totals)')


def tagged(tag: str) -> list[int]:
    """Live processes carrying ``tag`` in their environment (this run's, workers included)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if tag.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def python(tmp_path: Path, args: list[str], stdin: str | None = None,
           ) -> subprocess.CompletedProcess[str]:
    tag = f"WATCHER_TEST_TAG_{uuid.uuid4().hex}"
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), tag: "1"})
    wait_until(lambda: not tagged(tag), 15, "the script's workers to be gone")
    return proc


def images(tmp_path: Path) -> None:
    for i in range(3):
        make_image(tmp_path / "in" / f"p{i}.png", size=(32, 24), seed=i)


def assert_inverted(tmp_path: Path) -> None:
    for i in range(3):
        with Image.open(tmp_path / "in" / f"p{i}.png") as src, \
                Image.open(tmp_path / "out" / f"p{i}_inv.png") as out:
            assert out.getpixel((5, 5)) == tuple(255 - v for v in src.getpixel((5, 5)))


@pytest.mark.parametrize("extra", ["", ', start_method="spawn"'])
def test_a_script_without_a_guard_gets_one_short_error(tmp_path: Path, extra: str) -> None:
    images(tmp_path)
    script = tmp_path / "noguard.py"
    script.write_text(SCRIPT.format(call=CALL.format(extra=extra)))
    proc = python(tmp_path, [str(script)])
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err[-1] == (
        "watcher.engine.executor.UnguardedMainError: worker processes cannot start: each one "
        f"runs {script} again as it starts (start method "
        f"{'spawn' if extra else 'forkserver'}), and it calls watcher at its top level. Put "
        'the code that calls watcher under `if __name__ == "__main__":`')
    assert len(err) <= 8, proc.stderr  # the caller's line and ours, not a flood
    assert "forkserver.py" not in proc.stderr and "bootstrapping" not in proc.stderr
    assert "totals" not in proc.stdout


def test_the_same_script_with_a_guard_runs(tmp_path: Path) -> None:
    images(tmp_path)
    call = textwrap.indent(CALL.format(extra=""), "    ")
    (tmp_path / "guarded.py").write_text(SCRIPT.format(
        call=f'if __name__ == "__main__":\n{call}'))
    proc = python(tmp_path, ["guarded.py"])
    assert proc.returncode == 0, proc.stderr
    assert "'succeeded': 3" in proc.stdout
    assert_inverted(tmp_path)


@pytest.mark.parametrize("extra", ["", ', start_method="spawn"', ', start_method="fork"'])
def test_functions_from_stdin_are_sent_by_value(tmp_path: Path, extra: str) -> None:
    images(tmp_path)
    proc = python(tmp_path, ["-"], stdin=SCRIPT.format(call=CALL.format(extra=extra)))
    assert proc.returncode == 0, proc.stderr  # was: workers died, blaming the guard
    assert "'succeeded': 3" in proc.stdout
    assert_inverted(tmp_path)


@pytest.mark.parametrize("extra", ["", ', start_method="spawn"'])
def test_functions_from_python_c_are_sent_by_value(tmp_path: Path, extra: str) -> None:
    images(tmp_path)
    proc = python(tmp_path, ["-c", SCRIPT.format(call=CALL.format(extra=extra))])
    assert proc.returncode == 0, proc.stderr  # was: refused as "an interactive session"
    assert "'succeeded': 3" in proc.stdout
    assert_inverted(tmp_path)


def test_what_cannot_be_sent_is_refused_in_one_message_before_any_work(tmp_path: Path) -> None:
    images(tmp_path)
    holds_a_lock = SCRIPT.replace("def invert(im):\n",
                                  "LOCK = threading.Lock()\n\ndef invert(im):\n    LOCK\n")
    proc = python(tmp_path, ["-c", holds_a_lock.format(call=CALL.format(extra=""))])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("watcher.errors.ConfigError: transforms[0]: invert is defined in an "
                           "interactive session and cannot be sent to a worker process by "
                           "value (TypeError: cannot pickle '_thread.lock' object)"), last
    assert not (tmp_path / "out").exists()
    lam = SCRIPT.format(call=CALL.format(extra="").replace("[invert]", "[lambda im: im]"))
    proc = python(tmp_path, ["-c", lam])
    assert proc.returncode == 1
    assert "cannot be sent to a worker process: define it with 'def' at the top level" in \
        proc.stderr.strip().splitlines()[-1]
