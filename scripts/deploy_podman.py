"""The container image for real: built and run under podman from a locally debootstrapped base."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy_common import CACHE, ROOT, SHARED, check, debootstrap, sh, wait_for


def podman(*args: str, check: bool = True, timeout: float = 300) -> str:
    return sh("podman", *args, check=check, timeout=timeout)


# What these machines need (shared/deploy/README.md): no CAP_SYS_RESOURCE for podman's default
# ulimits, runc for the hybrid cgroup layout, no systemd for the events log.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@contextlib.contextmanager
def podman_env() -> Iterator[None]:
    conf = SHARED / "containers.conf"
    if not conf.exists():
        conf = CACHE / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
    old = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CONTAINERS_CONF", None)
        else:
            os.environ["CONTAINERS_CONF"] = old


def base_image() -> str:
    name = "localhost/bookworm-py"
    if subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0:
        return name
    tree = debootstrap("rootfs-bookworm-py", "python3,python3-venv,python3-pip")
    tar = subprocess.Popen(["tar", "-C", str(tree), "--exclude=./.watcher-complete", "-c", "."],
                           stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", name], stdin=tar.stdout, check=True,
                   capture_output=True, timeout=300)
    tar.wait(60)
    return name


def layer_paths(image: str, top: str) -> list[str]:
    """Paths under /``top`` in any layer of ``image``, read from the layers' own tar files."""
    out = Path(tempfile.mkdtemp(prefix="watcher-save-", dir="/var/tmp"))
    try:
        podman("save", "--format", "oci-dir", "-o", str(out / "oci"), image, timeout=600)
        blobs = out / "oci" / "blobs"

        def blob(digest: str) -> Path:
            algo, _, hexa = digest.partition(":")
            return blobs / algo / hexa

        index = json.loads((out / "oci" / "index.json").read_text())
        manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
        found = []
        for layer in manifest["layers"]:
            with tarfile.open(blob(layer["digest"]), "r:*") as tar:
                found += [m.name for m in tar
                          if m.name.removeprefix("./").split("/", 1)[0] == top]
        return found
    finally:
        shutil.rmtree(out, ignore_errors=True)


def check_image_shape(image: str, meta: dict[str, Any]) -> None:
    """OCI labels, the exposed metrics port, and no layer left holding the build's sources."""
    config = meta.get("Config") or {}
    labels = meta.get("Labels") or config.get("Labels") or {}
    oci = {k.removeprefix("org.opencontainers.image."): v for k, v in labels.items()
           if k.startswith("org.opencontainers.image.")}
    check("OCI labels: title, description, licenses MIT, version; no invented source URL",
          oci.get("title") == "watcher" and bool(oci.get("description"))
          and oci.get("licenses") == "MIT" and bool(oci.get("version"))
          and not {"source", "url", "documentation"} & oci.keys(), json.dumps(oci))
    exposed = sorted(config.get("ExposedPorts") or {})
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    check("EXPOSE 9464, the metrics port the image serves on",
          exposed == ["9464/tcp"] and env.get("WATCHER_METRICS_PORT") == "9464", f"{exposed}, "
          f"WATCHER_METRICS_PORT={env.get('WATCHER_METRICS_PORT')}")
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    copies = [line[:160] for line in history.splitlines() if "COPY" in line]
    src = layer_paths(image, "src")
    check("no layer of the image holds the build context (/src): built in a build stage",
          not src and not any(" in /src" in line for line in copies),
          f"{len(src)} paths under /src in the layers; COPY steps: {copies}")


def test_podman(wheels: Path, imgs: Path) -> None:
    with podman_env():
        base = base_image()
        ctx = Path(tempfile.mkdtemp(prefix="watcher-ctx-", dir="/var/tmp"))
        data = Path(tempfile.mkdtemp(prefix="watcher-data-", dir="/var/tmp"))
        name = f"watcher-test-{os.getpid()}"
        try:
            shutil.copy(ROOT / "Containerfile", ctx / "Containerfile")
            shutil.copytree(wheels, ctx / "wheels")
            # The last run's image goes first, and no layer cache is kept (--layers=false): a
            # run leaves one image behind, not a growing heap of untagged ones.
            podman("rmi", "--force", "localhost/watcher:test", check=False)
            out = podman("build", "--format", "docker", "--layers=false", "--build-arg",
                         f"BASE={base}", "-t", "localhost/watcher:test", "-f",
                         str(ctx / "Containerfile"), str(ctx), timeout=600)
            check("podman build", "localhost/watcher:test" in podman("images", "--format",
                                                                     "{{.Repository}}:{{.Tag}}"),
                  out.strip().splitlines()[-1] if out.strip() else "")
            meta = json.loads(podman("image", "inspect", "localhost/watcher:test"))[0]
            hc = json.dumps(meta.get("Healthcheck") or meta.get("Config", {}).get("Healthcheck"))
            check("the image keeps its HEALTHCHECK", "health" in hc, hc)
            check_image_shape("localhost/watcher:test", meta)
            os.chown(data, 10001, 10001)  # one volume; the daemon creates its five folders
            vols = ["-v", f"{data}:/data"]
            podman("run", "-d", "--name", name, "--read-only", *vols, "-e",
                   "WATCHER_SETTLE=0.3", "localhost/watcher:test")
            started = wait_for(lambda: "daemon.started" in podman("logs", name), 60)
            check("the container starts the daemon", bool(started))
            status = podman("exec", name, "cat", "/proc/1/status")
            cmdline = podman("exec", name, "cat", "/proc/1/cmdline").replace("\0", " ")
            uid = re.search(r"Uid:\s*(\d+)", status)
            check("the daemon is PID 1, as the non-root user",
                  "watcher watch" in cmdline and bool(uid) and uid.group(1) == "10001",
                  f"pid 1: {cmdline.strip()!r}, uid {uid and uid.group(1)}")
            ro = subprocess.run(["podman", "exec", name, "touch", "/opt/probe"],
                                capture_output=True, text=True, timeout=60, check=False)
            check("the root file system is read-only", ro.returncode != 0, ro.stderr.strip())
            version = podman("exec", name, "watcher", "--version").strip()
            labels = meta.get("Labels") or meta.get("Config", {}).get("Labels") or {}
            check("the image's version label is the version it carries",
                  version == f"watcher {labels.get('org.opencontainers.image.version')}",
                  f"{version!r}, label {labels.get('org.opencontainers.image.version')!r}")
            scrape = wait_for(lambda: podman("exec", name, "/opt/watcher/bin/python", "-c",
                                             "import urllib.request as u; print(u.urlopen("
                                             "'http://127.0.0.1:9464/metrics', timeout=10)"
                                             ".read().decode())"), 30) or ""
            check("the exposed port 9464 serves /metrics", "watcher_" in scrape,
                  f"{sum(line.startswith('watcher_') for line in scrape.splitlines())} "
                  "watcher_ samples")

            wait_for((data / "inbox").is_dir, 30)
            n = 0
            for f in sorted(imgs.iterdir()):
                dest = data / "inbox" / f.name
                shutil.copy(f, data / "inbox" / f".{f.name}.part")
                os.chown(data / "inbox" / f".{f.name}.part", 10001, 10001)
                os.rename(data / "inbox" / f".{f.name}.part", dest)  # the drop-folder protocol
                n += 1
            done = wait_for(lambda: len(list((data / "archive").iterdir())) == n, 90)
            outs = list((data / "processed").iterdir())
            check("files dropped into the bind-mounted inbox are processed",
                  bool(done) and len(outs) == n, f"{len(outs)} outputs for {n} inputs")
            hc_run = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True,
                                    text=True, timeout=120, check=False)
            check("podman healthcheck run passes", hc_run.returncode == 0,
                  (hc_run.stdout + hc_run.stderr).strip() or "healthy")
            zombies = podman("exec", name, "sh", "-c",
                             "cat /proc/[0-9]*/stat 2>/dev/null | awk '$3==\"Z\"' | wc -l").strip()
            check("no zombie processes in the container", zombies == "0", f"{zombies} zombies")

            t0 = time.monotonic()
            podman("stop", "-t", "45", name, timeout=120)
            took = time.monotonic() - t0
            code = podman("inspect", name, "--format", "{{.State.ExitCode}}").strip()
            logs = podman("logs", name)
            check("podman stop (SIGTERM) drains and exits 0",
                  code == "0" and "daemon.stopped" in logs, f"exit {code} in {took:.1f} s")
            sick = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True,
                                  text=True, timeout=60, check=False)
            check("the healthcheck fails once the daemon is gone", sick.returncode != 0,
                  (sick.stdout + sick.stderr).strip()[:200])
        finally:
            podman("rm", "-f", name, check=False)
            shutil.rmtree(ctx, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
