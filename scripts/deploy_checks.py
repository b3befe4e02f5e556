"""The checks behind scripts/test-deploy: systemd in systemd-nspawn (deploy_nspawn), the image
under podman (deploy_podman).

Each check prints PASS/FAIL with what it saw; the last line is "deploy: N passed, N failed".
"""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path

from deploy_common import CACHE, RESULTS, ROOT, check, sh
from deploy_nspawn import test_systemd
from deploy_podman import test_podman


def wheelhouse() -> Path:
    """Wheels of watcher and its dependencies, built here: installs inside need no network."""
    wheels = CACHE / "wheels"
    for old in [*wheels.glob("watcher_images-*.whl"), *wheels.glob("watcher-*.whl")]:
        old.unlink()  # this tree's wheel is built anew (watcher-*: before the rename)
    wheels.mkdir(parents=True, exist_ok=True)
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT),
       timeout=600)
    return wheels


def samples() -> Path:
    folder = CACHE / "samples"
    if not folder.exists():
        sh(str(ROOT / ".venv" / "bin" / "watcher"), "make-samples", str(folder), "-n", "12")
    return folder


def main(argv: list[str]) -> int:
    parts = argv or ["systemd", "podman"]
    wheels, imgs = wheelhouse(), samples()
    for part, fn in (("systemd", test_systemd), ("podman", test_podman)):
        if part not in parts:
            continue
        try:
            fn(wheels, imgs)
        except Exception as exc:  # report, go on with the other part
            traceback.print_exc()
            check(f"{part}: the run itself", False, f"{type(exc).__name__}: {exc}"[:500])
    passed = sum(ok for _, ok, _ in RESULTS)
    failed = len(RESULTS) - passed
    print(f"deploy: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main(sys.argv[1:]))
