"""The engine: a supervisor that alone owns, feeds and reaps a fixed set of worker processes.

Both modes drive it the same way: ``submit(task)`` as paths become known, ``poll(timeout)`` in
their own loop (it returns finished results), ``stop_intake()`` to stop handing out work, and
``close(grace)`` to drain and end the workers. Each ``poll`` is one supervisor tick, in a fixed
order: wait for a result or a worker exit, collect results, reap dead workers (settling every
task they held), kill workers stuck past the timeout, top the pool back up, and feed the workers.

Each worker has two pipes of its own: tasks go down one (a few at a time, in one message) and
results come back on the other. No lock or queue is shared between workers, so a worker killed
at any moment can only break its own channels. The supervisor hands a worker at most a few tasks
ahead (enough to hide the round trip when tasks are short, one when they are long, so that a slow
file never holds others back), and so always knows which tasks each worker holds.

A worker takes its tasks in the order it got them and records, under its slot's lock, how many it
has taken and which one it is processing; the others it took wait for its committer thread. So
when a worker dies, each task it held is settled exactly: the one it was processing is charged
(retried once, then ``worker-crashed``), the one being committed is run again (it did not cause
the death), and the ones it had not started go back to the front of the line. The supervisor
kills a worker for a timeout only under that lock while the slot still shows the timed-out task.
Results are accepted once per task: a late duplicate (a task that ran twice) is dropped.

The timeout covers a task's decode and encode (from when the worker took it) and its commit
group's commit (from when the committer thread started it; the task whose output is being
written then is charged, or the whole group in a step they share). A worker that holds tasks and
shows no progress at all for longer than the timeout plus WEDGE_MARGIN (or whose committer
thread has stopped) is killed as wedged and its tasks given back. A task given back is counted:
held by dying workers ``crash_retries + 1`` times in all, it is charged ``worker-crashed`` instead
of run again. ``problems()`` says what is wrong right now (for health checks).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from watcher import log
from watcher.engine.executor import (
    EngineError,
    Executor,
    Stats,
    UnguardedMainError,
    WorkerState,
    failure,
)
from watcher.engine.handles import Handle, launch, locked, moved, problems, state, verdict
from watcher.engine.helpers import PRELOAD, resolve_start_method, start_helpers
from watcher.engine.ledger import Ledger
from watcher.engine.mainscript import refuse_in_bootstrap, unguarded_message
from watcher.engine.slot import (
    EXIT_COMMIT_FAILED,
    EXIT_INIT_FAILED,
    EXIT_TERMINATED,
    EXIT_UNGUARDED_MAIN,
    HALT,
)
from watcher.engine.worker import WorkerConfig
from watcher.imaging import memory
from watcher.imaging.pipeline import Pipeline
from watcher.settings.schema import DecodeLimits, EngineSettings
from watcher.tasks import Result, Task

EARLY_DEATHS = 5  # workers dying in a row before taking any task: they cannot start


class Engine(Executor):
    """The local executor: a fixed set of worker processes on this machine (module docstring)."""

    def __init__(self, settings: EngineSettings, pipelines: Mapping[str, Pipeline],
                 limits: DecodeLimits, *, log_format: str = "json",
                 log_level: str = "warning") -> None:
        self.settings = settings
        self.start_method = resolve_start_method(settings.start_method)
        self._ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            self._ctx.set_forkserver_preload(PRELOAD)
        if self.start_method != "fork":
            start_helpers(forkserver=False)  # the resource tracker, deaf to SIGHUP (helpers)
        self.memory_cap = memory.resolve(settings.max_worker_memory, settings.workers)
        cfg = WorkerConfig(dict(pipelines), limits, settings.max_tasks_per_worker, log_format,
                           log_level, os.getpid(), self.memory_cap)
        self._log_setup = (log_format, log_level)
        try:
            self._cfg = pickle.dumps(cfg)
        except Exception as exc:
            raise EngineError(f"the pipelines cannot be sent to worker processes: {exc}") from exc
        self._slots: dict[int, Handle] = {}
        self._started = False
        self._early_deaths = 0  # consecutive workers that died before sending any result
        self._respawn: set[int] = set()  # slots whose worker stopped on SIGTERM (see _reap)
        # One poll set for the whole run: each worker's result pipe and exit sentinel, and the
        # caller's wake descriptors (a tick then costs one system call, not a selector each).
        self._poller = select.poll()
        self._fds: dict[int, Handle | None] = {}
        self.stats = Stats()
        self._log = log.get("watcher.engine.supervisor")
        self._book = Ledger(settings, self.stats, self._log)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; each is handed its first tasks (submitted before) as it starts."""
        refuse_in_bootstrap()  # a worker re-running an unguarded script starts no engine
        self._started = True
        for i in range(self.settings.workers):
            self._spawn(i)
            self._feed()

    def _spawn(self, index: int) -> None:
        # A forked worker closes this side's pipe ends first, its siblings' too (see launch).
        ends = [c for h in self._slots.values() for c in (h.conn, h.tasks_conn)] \
            if self.start_method == "fork" else None
        slot = launch(self._ctx, index, self._cfg, self._log_setup, ends, self._log)
        self._slots[index] = slot
        for fd in (slot.conn.fileno(), slot.proc.sentinel):
            self._poller.register(fd, select.POLLIN)
            self._fds[fd] = slot
        self.stats.started += 1
        self._log.info("worker.started", worker_pid=slot.proc.pid, slot=index)

    @property
    def outstanding(self) -> int:
        return len(self._book.tasks)

    @property
    def workers_alive(self) -> int:
        return sum(1 for s in self._slots.values() if s.proc.is_alive())

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots.values()]

    def running(self) -> list[str]:
        tasks = self._book.tasks
        return [tasks[h.seq].path for h in self._slots.values() if h.seq in tasks]

    def worker_states(self) -> list[WorkerState]:
        return [state(h, self._book.tasks, time.monotonic()) for h in self._slots.values()]

    def submit(self, task: Task) -> None:
        if not self._book.intake:
            raise EngineError("the engine is stopping; no new tasks")
        self._book.tasks[task.seq] = task
        self._book.pending.append(task)
        self._feed()

    def stop_intake(self) -> list[Task]:
        """Stop handing out work; return the tasks that had not started (now withdrawn).

        Every worker is told to halt: it finishes (and commits) the task it is processing, takes
        no other, and exits. The tasks it held but had not taken are withdrawn here."""
        withdrawn = self._book.withdraw()
        for slot in self._slots.values():
            with locked(slot):
                slot.shared[HALT] = 1.0
                taken = slot.taken
            for seq, n in list(slot.held.items()):
                if n >= taken and seq in self._book.tasks:
                    withdrawn.append(self._book.tasks[seq])
                    del slot.held[seq]
        for t in withdrawn:
            self._book.tasks.pop(t.seq, None)
        return withdrawn

    def close(self, grace: float | None = None,
              abort: Callable[[], bool] | None = None) -> list[Result]:
        """Let running tasks finish for up to ``grace`` seconds, then end every worker.

        Returns the results that arrived meanwhile; a task still running at the deadline (or
        when ``abort()`` turns true: a second signal) is killed and reported as ``cancelled``.
        No worker process is left behind.
        """
        grace = self.settings.grace if grace is None else grace
        results: list[Result] = []
        if self._book.intake:
            self.stop_intake()
        deadline = time.monotonic() + grace
        while self._book.tasks and time.monotonic() < deadline and not (abort and abort()):
            results += self.poll(min(0.1, max(0.0, deadline - time.monotonic())), respawn=False)
        for slot in self._slots.values():
            with contextlib.suppress(OSError):
                slot.tasks_conn.close()  # EOF: an idle worker exits at once
        end = time.monotonic() + 2.0
        for slot in self._slots.values():
            slot.proc.join(max(0.0, end - time.monotonic()))
        for slot in list(self._slots.values()):
            if slot.proc.is_alive():
                seq = slot.seq
                slot.cleanup = [o for s in slot.held for o in self._book.outputs(s)]
                slot.proc.kill()
                slot.proc.join(5)
                if seq in self._book.tasks:
                    results.append(self._book.charge(slot, seq, "cancelled",
                                                f"still running after the {grace:g} s grace "
                                                "period at shutdown; stopped"))
            results += self._drain(slot)
            self._retire(slot)
        self._slots.clear()
        for t in list(self._book.tasks.values()):
            results.append(failure(t, "cancelled", "the run stopped before this input finished"))
        self._book.tasks.clear()
        return results

    # --- one supervisor tick --------------------------------------------------------------------

    def poll(self, timeout: float = 0.25, *, respawn: bool = True,
             wake: Sequence[Any] = ()) -> list[Result]:
        """Run one tick; return the results that became final during it. ``wake``: more things
        to wait on (a file descriptor the caller's own events write to)."""
        self._respawn_due(respawn)
        for w in wake:
            fd = w if isinstance(w, int) else w.fileno()
            if fd not in self._fds:
                self._poller.register(fd, select.POLLIN)
                self._fds[fd] = None
        if not self._fds:
            if timeout and not self._book.ready:
                time.sleep(timeout)
            events = []
        else:
            events = self._poller.poll(0 if self._book.ready else max(0, int(timeout * 1000)))
        exited = set()
        for fd, _ in events:
            slot = self._fds.get(fd)
            if slot is None:
                continue
            if fd == slot.proc.sentinel:
                exited.add(slot.index)
            elif slot.index in self._slots:
                self._book.ready += self._drain(slot)
        self._reap(respawn, exited)
        self._kill_stuck()
        self._feed()
        return self._book.take_ready()

    def _drain(self, slot: Handle) -> list[Result]:
        out = []
        fd = slot.conn.fileno() if not slot.conn.closed else -1
        while fd >= 0:
            try:
                if not select.select([fd], [], [], 0)[0]:
                    break
                message = slot.conn.recv()  # the results of one commit group
            except (EOFError, OSError, ValueError):
                break
            except Exception:  # noqa: BLE001 - a message torn by a kill mid-send
                self._log.warning("engine.result_unreadable", worker_pid=slot.proc.pid)
                break
            for result in message:
                slot.tasks += 1
                slot.held.pop(result.seq, None)
                self._early_deaths = 0
                accepted = self._book.accept(result)
                if accepted is not None:
                    out.append(accepted)
        return out

    def _reap(self, respawn: bool, exited: set[int]) -> None:
        """Settle the workers whose exit sentinel fired (``exited``: slot indexes)."""
        for slot in [self._slots[i] for i in sorted(exited) if i in self._slots]:
            if slot.proc.is_alive():
                continue
            slot.proc.join(0)
            self._book.ready += self._drain(slot)  # results sent just before it died
            code = slot.proc.exitcode
            seq = slot.seq
            self._book.settle(slot, code)
            if code == EXIT_UNGUARDED_MAIN:
                raise UnguardedMainError(unguarded_message(self.start_method))
            if code == EXIT_TERMINATED:
                self._log.info("worker.terminated", worker_pid=slot.proc.pid,
                               why="SIGTERM: it finished its task and stopped")
            elif code != 0:
                held = self._book.tasks.get(seq)
                self._log.warning("worker.died", worker_pid=slot.proc.pid, exitcode=code,
                                  held=held.path if held else None)
            self._retire(slot)
            del self._slots[slot.index]
            if code == EXIT_INIT_FAILED:
                raise EngineError("worker processes cannot start (see the error above); "
                                  "check the installation and the pipelines' imports")
            # A worker that died of a task it took is that task's business (charged, retried);
            # one that died before taking any cannot start at all.
            if code not in (0, EXIT_COMMIT_FAILED, EXIT_TERMINATED) and slot.tasks == 0 and \
                    slot.taken == 0 and not slot.killed:
                self._early_deaths += 1
                if self._early_deaths >= EARLY_DEATHS:
                    raise EngineError(
                        f"{self._early_deaths} worker processes in a row died before finishing "
                        f"any task (last exit code {code}); not respawning them (their "
                        "errors are above)")
            if code == EXIT_TERMINATED:
                # A SIGTERM: most often sent to the whole process group, this process too, which
                # acts on it when this tick returns. A worker started now would take a task no
                # one asked for; it is started at the next tick, if there is still intake.
                self._respawn.add(slot.index)
            elif respawn and self._book.intake and slot.index not in self._slots:
                self.stats.restarts += 1 if code != 0 else 0
                self._spawn(slot.index)

    def _respawn_due(self, respawn: bool) -> None:
        """Start the workers that stopped on SIGTERM at an earlier tick (see ``_reap``)."""
        due, self._respawn = self._respawn, set()
        if not (respawn and self._book.intake):
            return
        for index in sorted(due):
            if index not in self._slots:
                self.stats.restarts += 1
                self._spawn(index)

    def _kill_stuck(self) -> None:
        """Kill each worker past the timeout (charging ``timeout`` to the task(s) at fault) or
        wedged (``handles.verdict``); it is reaped, and the rest it held settled, at a later
        tick."""
        limit = self.settings.task_timeout
        now = time.monotonic()
        for slot in list(self._slots.values()):
            if slot.killed:
                continue
            moved(slot, now)
            why, late = verdict(slot, now, limit)
            if not why:
                continue
            with locked(slot):
                why, late = verdict(slot, now, limit)  # what it shows now, for sure
                if not why:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, signal.SIGKILL)
                slot.killed = why
                slot.cleanup = [o for s in slot.held for o in self._book.outputs(s)]
            if why == "timeout":
                self.stats.timeouts += 1
            else:
                self._log.warning("worker.killed", worker_pid=slot.proc.pid, why=why,
                                  tasks_held=len(slot.held),
                                  still_for_s=round(now - slot.progress, 1))
            for seq, error in late:
                if seq in self._book.tasks:
                    self._book.ready.append(self._book.charge(slot, seq, "timeout", error))

    def problems(self) -> list[str]:
        """What is wrong with the workers at this moment, one line each ([]: nothing): see
        ``handles.problems``. For health checks: the daemon's heartbeat reports them."""
        now = time.monotonic()
        return [line for h in self._slots.values()
                for line in problems(h, self._book.tasks, now, self.settings.task_timeout)]

    def _feed(self) -> None:
        if not self._book.intake or not self._started or not self._book.pending:
            return
        cap = self._book.capacity()
        batch = max(1, cap // 2)  # send a few at a time: one message, one wake-up
        while self._book.pending:
            live = [s for s in self._slots.values()
                    if not s.killed and cap - len(s.held) > 0]
            if not live:
                return
            slot = min(live, key=lambda s: (len(s.held), s.index))
            room = cap - len(slot.held)
            if slot.held and room < batch:
                return  # every worker has enough to do; send a fuller message later
            chunk: list[Task] = []
            while self._book.pending and len(chunk) < room:
                task = self._book.pending.popleft()
                if task.seq in self._book.tasks:
                    chunk.append(task)
            if not chunk:
                return
            try:
                slot.tasks_conn.send(chunk)
            except OSError:  # it died: reaped at the next tick, these go to another
                self._book.pending.extendleft(reversed(chunk))
                return
            for task in chunk:
                slot.held[task.seq] = slot.sent
                slot.sent += 1

    # --- helpers --------------------------------------------------------------------------------

    def _retire(self, slot: Handle) -> None:
        for fd in [fd for fd, s in self._fds.items() if s is slot]:
            self._poller.unregister(fd)
            del self._fds[fd]
        slot.close(self._log)
