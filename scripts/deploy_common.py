"""What the deployment checks share: running commands, recording checks, waiting, and the
debootstrapped Debian trees cached under /var/tmp/watcher-deploy."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WATCHER_DEPLOY_CACHE", "/var/tmp/watcher-deploy"))
SHARED = ROOT.parent / "shared" / "deploy"
RESULTS: list[tuple[str, bool, str]] = []


def sh(*cmd: str, check: bool = True, timeout: float = 300, **kw: Any) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-2000:]}")
    return proc.stdout


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def wait_for(cond: Callable[[], Any], timeout: float, step: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = cond()
            if value:
                return value
        time.sleep(step)
    return None


def mirror() -> str:
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        with contextlib.suppress(OSError):
            m = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b", f.read_text())
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def debootstrap(name: str, include: str) -> Path:
    tree = CACHE / name
    stamp = tree / ".watcher-complete"
    if stamp.exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"debootstrap {name} (cached under {CACHE} for next time) ...", flush=True)
    sh("debootstrap", "--variant=minbase", f"--include={include}", "bookworm", str(tree),
       mirror(), timeout=900)
    stamp.touch()
    return tree
