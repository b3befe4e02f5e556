"""systemd for real: the service installed and driven in a systemd booted in systemd-nspawn."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from deploy_common import ROOT, check, debootstrap, sh, wait_for

# Runs its arguments as on a host whose /etc has no machine-id (a freshly made machine: images
# often ship without one, for each clone to get its own at first boot): in a private mount
# namespace, /etc becomes an overlay in which machine-id is deleted; the real /etc is untouched.
WITHOUT_MACHINE_ID = ('mkdir -p "$0/upper" "$0/work" && mount -t overlay overlay -o '
                      'lowerdir=/etc,upperdir="$0/upper",workdir="$0/work" /etc && '
                      'rm -f /etc/machine-id && exec "$@"')


class Container:
    """A systemd booted in systemd-nspawn on a throw-away overlay of a cached tree.

    ``host_machine_id=False`` starts systemd-nspawn as on a host without /etc/machine-id."""

    def __init__(self, tree: Path, binds: dict[str, str], *, host_machine_id: bool = True) -> None:
        run = Path("/run/systemd/nspawn")
        run.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(run):
            sh("mount", "-t", "tmpfs", "tmpfs", str(run))  # silences a cleanup warning
        # --link-journal=no: the default (auto) links the container's journal into the host's
        # /var/log/journal, for which systemd-nspawn reads the HOST's machine ID first and
        # refuses to start without one ("Failed to retrieve machine ID: No such file or
        # directory" on a fresh machine whose image has no /etc/machine-id). The checks read
        # the journal inside the container; nothing needs it on the host.
        args = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--volatile=overlay",
                "--link-journal=no", "-D", str(tree), "-b", "--console=passive",
                *[f"--bind-ro={h}:{c}" for h, c in binds.items()]]
        self.scratch: Path | None = None
        if not host_machine_id:
            self.scratch = Path(tempfile.mkdtemp(prefix="watcher-host-etc-", dir="/var/tmp"))
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    WITHOUT_MACHINE_ID, str(self.scratch), *args]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.leader = wait_for(self._leader, 30)
        if not self.leader:
            self.proc.terminate()  # systemd-nspawn halts the container on SIGTERM
            try:
                err = self.proc.communicate(timeout=30)[1]
            except subprocess.TimeoutExpired:
                self.proc.kill()
                err = self.proc.communicate(timeout=30)[1]
            self._clean()
            raise RuntimeError(f"the container's systemd did not start: {err.strip()}")

    def host_has_machine_id(self) -> bool:
        """Whether /etc/machine-id exists as systemd-nspawn sees the host."""
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "test", "-e",
                               "/etc/machine-id"], check=False, timeout=30).returncode == 0

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
        self._clean()

    def _clean(self) -> None:
        if self.scratch:  # the overlay went with the mount namespace, its last process gone
            shutil.rmtree(self.scratch, ignore_errors=True)


def booted(c: Container) -> str:
    """The container's system state once boot is over ("running"), or "" when it never says."""
    # Right after the container's systemd appears its bus may not be up yet: systemctl then
    # prints nothing (a failed connection). Ask again until it answers.
    return wait_for(lambda: c.run("systemctl", "is-system-running", "--wait", check=False,
                                  timeout=90).strip(), 90, 0.5) or ""


def test_fresh_host(tree: Path) -> None:
    """The first run on a new machine: the container boots though the host has no machine ID."""
    try:
        c = Container(tree, {}, host_machine_id=False)
    except RuntimeError as exc:
        check("nspawn: boots on a host without /etc/machine-id (a fresh machine)", False,
              str(exc))
        return
    try:
        absent = not c.host_has_machine_id()
        state = booted(c)
        check("nspawn: boots on a host without /etc/machine-id (a fresh machine)",
              absent and state in ("running", "degraded"),
              f"host's /etc/machine-id {'absent' if absent else 'PRESENT'} for systemd-nspawn; "
              f"container {state or 'no answer'}")
    finally:
        c.close()


def test_systemd(wheels: Path, imgs: Path) -> None:
    tree = debootstrap("nspawn-bookworm", "systemd,systemd-sysv,dbus,python3,python3-venv")
    test_fresh_host(tree)
    c = Container(tree, {str(ROOT): "/src", str(wheels): "/wheels", str(imgs): "/samples"})
    try:
        state = booted(c)
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
