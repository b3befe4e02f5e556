"""The systemd units as systemd itself reads them: `systemd-analyze verify` and the exposure
level of `systemd-analyze security`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"

needs = pytest.mark.skipif(not shutil.which("systemd-analyze") or not shutil.which("unshare"),
                           reason="needs systemd-analyze (Debian: systemd) and unshare")


@needs
def test_units_verify(tmp_path: Path) -> None:
    template = tmp_path / "watcher@demo.service"  # a template is verified through an instance
    shutil.copy(UNITS / "watcher@.service", template)
    watcher = Path(sys.executable).parent / "watcher"
    # ExecStart names /opt/watcher/bin/watcher: provide it in a private mount namespace only
    script = ("mount -t tmpfs tmpfs /opt && mkdir -p /opt/watcher/bin && "
              f"ln -s {watcher} /opt/watcher/bin/watcher && "
              f"exec systemd-analyze verify {UNITS / 'watcher.service'} {template}")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


@needs
@pytest.mark.parametrize("unit", ["watcher.service", "watcher@.service"])
def test_units_exposure_is_low(tmp_path: Path, unit: str) -> None:
    path = UNITS / unit
    if "@" in unit:
        path = tmp_path / "watcher@demo.service"
        shutil.copy(UNITS / unit, path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                           str(path)], capture_output=True, text=True, timeout=60, check=False)
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert level, proc.stdout[-1000:] + proc.stderr
    assert float(level.group(1)) <= 2.0, proc.stdout[-3000:]
    assert proc.returncode == 0  # --threshold=20: fails above 2.0


def test_unit_folders_match_the_service_config() -> None:
    unit = (UNITS / "watcher.service").read_text()
    writable = [p for line in unit.splitlines() if line.startswith("ReadWritePaths=")
                for p in line.split("=", 1)[1].split()]
    import tomllib

    watch = tomllib.loads((UNITS / "watcher.toml").read_text())["watch"]
    # one writable mount holding exactly the five folders (claims must be renames within it)
    assert writable == ["/var/lib/watcher"]
    folders = [watch[k] for k in ("inbox", "output", "archive", "quarantine", "work")]
    assert all(str(Path(f).parent) == "/var/lib/watcher" for f in folders)
    engine = tomllib.loads((UNITS / "watcher.toml").read_text())["engine"]
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    assert engine["grace"] < stop  # the drain fits before systemd kills
