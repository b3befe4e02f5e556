"""The checks behind scripts/test-deploy: systemd in systemd-nspawn, the image under podman.

Each check prints PASS/FAIL with what it saw; the last line is "deploy: N passed, N failed".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
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


def wheelhouse() -> Path:
    """Wheels of watcher and its dependencies, built here: installs inside need no network."""
    wheels = CACHE / "wheels"
    for old in wheels.glob("watcher-*.whl"):
        old.unlink()
    wheels.mkdir(parents=True, exist_ok=True)
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT),
       timeout=600)
    return wheels


def samples() -> Path:
    folder = CACHE / "samples"
    if not folder.exists():
        sh(str(ROOT / ".venv" / "bin" / "watcher"), "make-samples", str(folder), "-n", "12")
    return folder


# --- systemd in systemd-nspawn -------------------------------------------------------------

class Container:
    """A systemd booted in systemd-nspawn on a throw-away overlay of a cached tree."""

    def __init__(self, tree: Path, binds: dict[str, str]) -> None:
        run = Path("/run/systemd/nspawn")
        run.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(run):
            sh("mount", "-t", "tmpfs", "tmpfs", str(run))  # silences a cleanup warning
        args = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--volatile=overlay",
                "-D", str(tree), "-b", "--console=passive",
                *[f"--bind-ro={h}:{c}" for h, c in binds.items()]]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.leader = wait_for(self._leader, 30)
        if not self.leader:
            raise RuntimeError("the container's systemd did not start: "
                               + (self.proc.stderr.read() if self.proc.poll() is not None
                                  and self.proc.stderr else ""))

    def _leader(self) -> int | None:
        out = sh("pgrep", "-P", str(self.proc.pid), "-x", "systemd", check=False).split()
        return int(out[0]) if out else None

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> str:
        return sh("nsenter", "-t", str(self.leader), "-a", *cmd, check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).strip()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run("systemctl", "poweroff", check=False, timeout=10)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def test_systemd(wheels: Path, imgs: Path) -> None:
    tree = debootstrap("nspawn-bookworm", "systemd,systemd-sysv,dbus,python3,python3-venv")
    c = Container(tree, {str(ROOT): "/src", str(wheels): "/wheels", str(imgs): "/samples"})
    try:
        # Right after the container's systemd appears its bus may not be up yet: systemctl then
        # prints nothing (a failed connection). Ask again until it answers.
        state = wait_for(lambda: c.run("systemctl", "is-system-running", "--wait", check=False,
                                       timeout=90).strip(), 90, 0.5) or ""
        check("nspawn: systemd booted", state in ("running", "degraded"), state or "no answer")
        c.run("/src/scripts/install-systemd", "--wheelhouse", "/wheels", "--no-start",
              timeout=300)
        c.run("mkdir", "-p", "/etc/systemd/system/watcher.service.d")
        c.run("sh", "-c", "cat > /etc/systemd/system/watcher.service.d/test.conf <<'EOF'\n"
              "[Service]\nWatchdogSec=4\nEnvironment=WATCHER_SETTLE=0.3\n"
              "Environment=WATCHER_DEBUG_STALL_FILE=/var/lib/watcher/work/.stall\nEOF")
        c.run("systemctl", "daemon-reload")
        verify = c.run("systemd-analyze", "verify", "/etc/systemd/system/watcher.service",
                       check=False)
        check("nspawn: systemd-analyze verify inside", verify.strip() == "", verify.strip())

        t0 = time.monotonic()
        c.run("systemctl", "start", "watcher")
        took = time.monotonic() - t0
        active = c.show("watcher", "ActiveState")
        status = c.show("watcher", "StatusText")
        check("systemctl start returns once READY=1 arrived",
              active == "active" and "in flight" in status,
              f"{active}, StatusText={status!r}, start took {took:.1f} s")
        ready_logged = c.run("journalctl", "-u", "watcher", "-o", "cat", "--no-pager")
        check("daemon.started logged before start returned", "daemon.started" in ready_logged)
        started = next((json.loads(line) for line in ready_logged.splitlines()
                        if line.startswith("{") and '"daemon.started"' in line), {})
        workers = int(started.get("workers") or 1)
        cgroup = c.show("watcher", "ControlGroup")
        # MemoryMax=2G is enforced only where the container's systemd has the memory
        # controller (cgroup v2, or v1 delegated); on a host that mounts it read-only into the
        # container (this one, cgroup v1), the service has no limit but the machine's
        enforced = c.run("sh", "-c", f"cat /sys/fs/cgroup{cgroup}/memory.max "
                         f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes 2>/dev/null",
                         check=False).split()
        mem_total = int(re.search(r"MemTotal:\s+(\d+)", c.run("cat", "/proc/meminfo")).group(1))
        limit = 2 * 1024**3 if "2147483648" in enforced else mem_total * 1024
        expected = max(128 * 2**20, (limit - 256 * 2**20) // workers // 2**20 * 2**20)
        procs = c.run("sh", "-c", f"cat /sys/fs/cgroup{cgroup}/cgroup.procs "
                      f"/sys/fs/cgroup/*{cgroup}/cgroup.procs 2>/dev/null", check=False).split()

        def data_limit(pid: str) -> int:
            m = re.search(r"Max data size\s+(\d+)\s", c.run("cat", f"/proc/{pid}/limits",
                                                            check=False))
            return int(m.group(1)) if m else 0
        # the cap less the worker's mapped code (resident, but not data)
        capped = [p for p in dict.fromkeys(procs)
                  if expected - 160 * 2**20 <= data_limit(p) <= expected]
        check("memory: each worker's cap is the service's memory limit (MemoryMax where it is "
              "enforced, else the machine's) less the reserve, shared, and is its RLIMIT_DATA",
              started.get("max_worker_memory") == expected and len(capped) >= workers,
              f"MemoryMax {'enforced' if limit == 2 * 1024**3 else 'not enforced here'}; "
              f"max_worker_memory={started.get('max_worker_memory')} (expected {expected} for "
              f"{workers} workers), {len(capped)} of {len(set(procs))} processes capped")

        n = len(list(imgs.iterdir()))
        c.run("sh", "-c", "cp /samples/* /var/lib/watcher/inbox/")
        done = wait_for(lambda: len(c.run("ls", "/var/lib/watcher/archive").split()) == n, 60)
        outs = c.run("ls", "/var/lib/watcher/processed").split()
        check("files dropped in the inbox come out processed", bool(done) and len(outs) == 2 * n,
              f"{len(outs)} outputs for {n} inputs")

        pid = c.show("watcher", "MainPID")
        st = c.run("cat", f"/proc/{pid}/status")
        caps = re.search(r"CapEff:\s*(\w+)", st)
        nnp = re.search(r"NoNewPrivs:\s*(\d)", st)
        uid = re.search(r"Uid:\s*(\d+)", st)
        wuid = c.run("id", "-u", "watcher").strip()
        check("hardening: no capabilities, NoNewPrivs, the watcher user",
              bool(caps and int(caps.group(1), 16) == 0 and nnp and nnp.group(1) == "1"
                   and uid and uid.group(1) == wuid),
              f"CapEff={caps and caps.group(1)} NoNewPrivs={nnp and nnp.group(1)} "
              f"Uid={uid and uid.group(1)} (watcher={wuid})")
        # MainPID is a pid of the container's namespace: enter the service's mounts from there
        inside = ["nsenter", "-t", str(c.leader), "-a", "nsenter", "-t", pid, "-m"]
        probe = subprocess.run([*inside, "touch", "/usr/lib/watcher-probe"],
                               capture_output=True, text=True, timeout=30, check=False)
        rw = subprocess.run([*inside, "touch", "/var/lib/watcher/work/.probe"],
                            capture_output=True, text=True, timeout=30, check=False)
        check("hardening: read-only system, writable folders",
              probe.returncode != 0 and "Read-only" in probe.stderr and rw.returncode == 0,
              probe.stderr.strip() + f"; work folder writable: {rw.returncode == 0}")
        devs = c.run("nsenter", "-t", pid, "-m", "ls", "/dev", check=False).split()
        c.run("rm", "-f", "/var/lib/watcher/work/.probe")
        check("hardening: private /dev", "sda" not in devs and "null" in devs,
              f"{len(devs)} entries")

        restarts = int(c.show("watcher", "NRestarts"))
        c.run("touch", "/var/lib/watcher/work/.stall")
        restarted = wait_for(lambda: int(c.show("watcher", "NRestarts")) > restarts, 40)
        c.run("rm", "-f", "/var/lib/watcher/work/.stall")
        new_pid = wait_for(lambda: c.show("watcher", "ActiveState") == "active"
                           and c.show("watcher", "MainPID"), 40)
        journal = c.run("journalctl", "-u", "watcher", "--no-pager", "-o", "cat")
        check("a stalled supervisor is killed by the watchdog and restarted",
              bool(restarted) and new_pid not in (None, pid) and "atchdog" in journal,
              f"NRestarts {restarts} -> {c.show('watcher', 'NRestarts')}, "
              f"MainPID {pid} -> {new_pid}")
        c.run("sh", "-c", "cp /samples/sample_000.jpg /var/lib/watcher/inbox/again.jpg")
        again = wait_for(lambda: "again.jpg" in c.run("ls", "/var/lib/watcher/archive"), 30)
        check("the restarted service processes files", bool(again))

        lines = [json.loads(line) for line in c.run(
            "journalctl", "-u", "watcher", "-o", "json", "--no-pager").splitlines()]
        events = [json.loads(e["MESSAGE"]) for e in lines
                  if isinstance(e.get("MESSAGE"), str) and e["MESSAGE"].startswith("{")]
        check("journalctl -u watcher -o json carries the structured events",
              any(e.get("event") == "file.processed" for e in events), f"{len(events)} events")

        c.run("systemctl", "reload", "watcher")
        reloaded = wait_for(lambda: "config.reloaded" in c.run(
            "journalctl", "-u", "watcher", "-o", "cat", "--no-pager"), 20)
        check("systemctl reload (SIGHUP) reloads the config", bool(reloaded))

        c.run("systemctl", "stop", "watcher", timeout=90)
        result = c.show("watcher", "Result")
        code = c.show("watcher", "ExecMainStatus")
        check("systemctl stop drains and ends with Result=success", result == "success"
              and code == "0", f"Result={result} ExecMainStatus={code}")
    finally:
        c.close()


# --- the image under podman ----------------------------------------------------------------

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


def test_podman(wheels: Path, imgs: Path) -> None:
    with podman_env():
        base = base_image()
        ctx = Path(tempfile.mkdtemp(prefix="watcher-ctx-", dir="/var/tmp"))
        data = Path(tempfile.mkdtemp(prefix="watcher-data-", dir="/var/tmp"))
        name = f"watcher-test-{os.getpid()}"
        try:
            shutil.copy(ROOT / "Containerfile", ctx / "Containerfile")
            shutil.copytree(wheels, ctx / "wheels")
            out = podman("build", "--format", "docker", "--build-arg", f"BASE={base}", "-t",
                         "localhost/watcher:test", "-f", str(ctx / "Containerfile"), str(ctx),
                         timeout=600)
            check("podman build", "localhost/watcher:test" in podman("images", "--format",
                                                                     "{{.Repository}}:{{.Tag}}"),
                  out.strip().splitlines()[-1] if out.strip() else "")
            meta = json.loads(podman("image", "inspect", "localhost/watcher:test"))[0]
            hc = json.dumps(meta.get("Healthcheck") or meta.get("Config", {}).get("Healthcheck"))
            check("the image keeps its HEALTHCHECK", "health" in hc, hc)
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
