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
import math
import multiprocessing
import os
import pickle
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from watcher import log
from watcher.engine import runlock
from watcher.engine.committer import GROUP_MAX, GROUP_WAIT
from watcher.engine.executor import EngineError, Executor, Stats, failure
from watcher.engine.helpers import PRELOAD, start_helpers
from watcher.engine.slot import (
    COMMIT_FROM,
    COMMIT_SEQ,
    COMMIT_STARTED,
    COMMIT_TO,
    COMMITTER_BEAT,
    EXIT_COMMIT_FAILED,
    EXIT_INIT_FAILED,
    EXIT_TERMINATED,
    HALT,
    IDLE,
    SEQ,
    SLOT_SIZE,
    STARTED,
    TAKEN,
)
from watcher.engine.worker import WorkerConfig, worker_main
from watcher.fs.files import remove_temps
from watcher.imaging import memory
from watcher.imaging.pipeline import Pipeline
from watcher.settings.schema import DecodeLimits, EngineSettings
from watcher.tasks import Result, Task

# How many tasks a worker holds at once: the one it processes, the ones its committer thread
# gathers into a commit group (about GROUP_WAIT seconds of work, at most GROUP_MAX) and
# publishes, and enough queued behind them to cover about LOOKAHEAD seconds of work (when tasks
# are short, so the supervisor, sharing the cores, never leaves it idle), at most MAX_AHEAD.
# Tasks of LONG_TASK or more get one at a time: a slow file must not hold back another that an
# idle worker could take.
LOOKAHEAD = 0.1
MAX_AHEAD = 8
LONG_TASK = 0.1
EARLY_DEATHS = 5  # workers dying in a row before reporting anything: they cannot start
WEDGE_MARGIN = 10.0  # seconds past the timeout a worker may hold tasks without any progress
COMMITTER_STALE = 5.0  # seconds without a beat from an idle committer thread: it is gone
LOCK_WAIT = 1.0  # seconds to wait for a worker's slot lock (a worker killed holding it)



@dataclass
class _Slot:
    """One worker as the supervisor sees it."""

    index: int
    proc: Any
    conn: Connection
    shared: Any
    lock: Any
    tasks_conn: Connection  # the supervisor's end of the worker's task pipe
    # Why the supervisor killed it ("timeout": what it was charged for is settled; "wedged",
    # "committer-gone": nothing was charged), "" if it did not.
    killed: str = ""
    # (output, root) of the outputs whose temp files it may leave
    cleanup: list[tuple[str, str]] = field(default_factory=list)
    tasks: int = 0  # results received from it
    # Tasks sent to it and not yet settled, with their position in the order it got them.
    held: dict[int, int] = field(default_factory=dict)
    sent: int = 0  # tasks ever sent to it
    progress: float = field(default_factory=time.monotonic)  # when it last changed (see _moved)
    mark: tuple[float, ...] = ()  # what its slot showed then

    @property
    def seq(self) -> int:
        return int(self.shared[SEQ])

    @property
    def taken(self) -> int:
        return int(self.shared[TAKEN])


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
        self._slots: dict[int, _Slot] = {}
        self._tasks: dict[int, Task] = {}  # outstanding: submitted, no result accepted yet
        self._pending: deque[Task] = deque()  # not yet sent to a worker
        self._intake = True
        self._started = False
        self._early_deaths = 0  # consecutive workers that died before sending any result
        self._respawn: set[int] = set()  # slots whose worker stopped on SIGTERM (see _reap)
        self._given_back: dict[int, int] = {}  # seq -> deaths of workers that had taken it
        self._ready: list[Result] = []
        self._avg: float | None = None  # moving average of a task's duration, seconds
        # One poll set for the whole run: each worker's result pipe and exit sentinel, and the
        # caller's wake descriptors (a tick then costs one system call, not a selector each).
        self._poller = select.poll()
        self._fds: dict[int, _Slot | None] = {}
        self.stats = Stats()
        self._log = log.get("watcher.engine.supervisor")

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; each is handed its first tasks (submitted before) as it starts."""
        self._started = True
        for i in range(self.settings.workers):
            self._spawn(i)
            self._feed()

    def _spawn(self, index: int) -> None:
        shared = self._ctx.RawArray("d", SLOT_SIZE)
        shared[SEQ] = shared[COMMIT_STARTED] = shared[COMMIT_SEQ] = IDLE
        lock = self._new_lock()
        recv, send = self._ctx.Pipe(duplex=False)
        task_recv, task_send = self._ctx.Pipe(duplex=False)
        # A forked worker starts with copies of this process's descriptors: it closes this
        # side's pipe ends first, its own and its siblings' (held open, a task pipe's writing
        # end would hide its closing from the worker that reads it).
        inherited: tuple[int, ...] = ()
        if self.start_method == "fork":
            ends = [c for s in self._slots.values() for c in (s.conn, s.tasks_conn)]
            inherited = (*(c.fileno() for c in ends if not c.closed), recv.fileno(),
                         task_send.fileno())
        proc = self._ctx.Process(target=worker_main, name=f"watcher-worker-{index}",
                                 args=(index, task_recv, send, shared, lock, self._cfg,
                                       inherited, self._log_setup, runlock.held()),
                                 daemon=True)
        proc.start()
        send.close()  # the worker holds the only writing end: EOF means it is gone
        task_recv.close()
        self._slots[index] = slot = _Slot(index, proc, recv, shared, lock, task_send)
        for fd in (recv.fileno(), proc.sentinel):
            self._poller.register(fd, select.POLLIN)
            self._fds[fd] = slot
        self.stats.started += 1
        self._log.info("worker.started", worker=proc.pid, slot=index)

    def _new_lock(self) -> Any:
        """A slot lock. Outside ``fork`` it is registered with multiprocessing's resource
        tracker; a tracker that died (killed) between its liveness probe and the registration
        makes that fail once with a broken pipe, and the next try starts a new tracker."""
        try:
            return self._ctx.Lock()
        except OSError:
            self._log.warning("engine.resource_tracker_gone", why="it is started again")
            return self._ctx.Lock()

    @property
    def outstanding(self) -> int:
        return len(self._tasks)

    @property
    def workers_alive(self) -> int:
        return sum(1 for s in self._slots.values() if s.proc.is_alive())

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots.values()]

    def running(self) -> list[str]:
        """The inputs being processed at this moment."""
        return [self._tasks[s.seq].path for s in self._slots.values() if s.seq in self._tasks]

    def submit(self, task: Task) -> None:
        if not self._intake:
            raise EngineError("the engine is stopping; no new tasks")
        self._tasks[task.seq] = task
        self._pending.append(task)
        self._feed()

    def stop_intake(self) -> list[Task]:
        """Stop handing out work; return the tasks that had not started (now withdrawn).

        Every worker is told to halt: it finishes (and commits) the task it is processing, takes
        no other, and exits. The tasks it held but had not taken are withdrawn here."""
        self._intake = False
        withdrawn = list(self._pending)
        self._pending.clear()
        for slot in self._slots.values():
            with _locked(slot):
                slot.shared[HALT] = 1.0
                taken = slot.taken
            for seq, n in list(slot.held.items()):
                if n >= taken and seq in self._tasks:
                    withdrawn.append(self._tasks[seq])
                    del slot.held[seq]
        for t in withdrawn:
            self._tasks.pop(t.seq, None)
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
        if self._intake:
            self.stop_intake()
        deadline = time.monotonic() + grace
        while self._tasks and time.monotonic() < deadline and not (abort and abort()):
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
                slot.cleanup = [o for s in slot.held for o in self._outputs(s)]
                slot.proc.kill()
                slot.proc.join(5)
                if seq in self._tasks:
                    results.append(self._charge(slot, seq, "cancelled",
                                                f"still running after the {grace:g} s grace "
                                                "period at shutdown; stopped"))
            results += self._drain(slot)
            self._retire(slot)
        self._slots.clear()
        for t in list(self._tasks.values()):
            results.append(failure(t, "cancelled", "the run stopped before this input finished"))
        self._tasks.clear()
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
            if timeout and not self._ready:
                time.sleep(timeout)
            events = []
        else:
            events = self._poller.poll(0 if self._ready else max(0, int(timeout * 1000)))
        exited = set()
        for fd, _ in events:
            slot = self._fds.get(fd)
            if slot is None:
                continue
            if fd == slot.proc.sentinel:
                exited.add(slot.index)
            elif slot.index in self._slots:
                self._ready += self._drain(slot)
        self._reap(respawn, exited)
        self._kill_stuck()
        self._feed()
        out, self._ready = self._ready, []
        return out

    def _drain(self, slot: _Slot) -> list[Result]:
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
                self._log.warning("engine.result_unreadable", worker=slot.proc.pid)
                break
            for result in message:
                slot.tasks += 1
                slot.held.pop(result.seq, None)
                self._early_deaths = 0
                accepted = self._accept(result)
                if accepted is not None:
                    out.append(accepted)
        return out

    def _accept(self, result: Result) -> Result | None:
        task = self._tasks.get(result.seq)
        if task is None:
            self.stats.duplicates += 1
            self._log.debug("engine.duplicate_result", path=result.path, seq=result.seq)
            return None
        del self._tasks[result.seq]
        self._given_back.pop(result.seq, None)
        if result.ok and result.duration > 0:
            self._avg = result.duration if self._avg is None else \
                0.8 * self._avg + 0.2 * result.duration
        return result

    def _reap(self, respawn: bool, exited: set[int]) -> None:
        """Settle the workers whose exit sentinel fired (``exited``: slot indexes)."""
        for slot in [self._slots[i] for i in sorted(exited) if i in self._slots]:
            if slot.proc.is_alive():
                continue
            slot.proc.join(0)
            self._ready += self._drain(slot)  # results sent just before it died
            code = slot.proc.exitcode
            seq = slot.seq
            self._settle_held(slot, code)
            if code == EXIT_TERMINATED:
                self._log.info("worker.terminated", worker=slot.proc.pid,
                               why="SIGTERM: it finished its task and stopped")
            elif code != 0:
                self._log.warning("worker.died", worker=slot.proc.pid, exitcode=code,
                                  held=self._tasks[seq].path if seq in self._tasks else None)
            self._retire(slot)
            del self._slots[slot.index]
            if code == EXIT_INIT_FAILED:
                raise EngineError("worker processes cannot start (see the error above); "
                                  "check the installation and the pipelines' imports")
            if code not in (0, EXIT_COMMIT_FAILED, EXIT_TERMINATED) and slot.tasks == 0 and \
                    slot.killed != "timeout":
                self._early_deaths += 1
                if self._early_deaths >= EARLY_DEATHS:
                    raise EngineError(
                        f"{self._early_deaths} worker processes in a row died before finishing "
                        f"any task (last exit code {code}); not respawning them. If a script "
                        "calls watcher, guard its top level with "
                        "`if __name__ == \"__main__\":` (workers import the main module)")
            if code == EXIT_TERMINATED:
                # A SIGTERM: most often sent to the whole process group, this process too, which
                # acts on it when this tick returns. A worker started now would take a task no
                # one asked for; it is started at the next tick, if there is still intake.
                self._respawn.add(slot.index)
            elif respawn and self._intake and slot.index not in self._slots:
                self.stats.restarts += 1 if code != 0 else 0
                self._spawn(slot.index)

    def _respawn_due(self, respawn: bool) -> None:
        """Start the workers that stopped on SIGTERM at an earlier tick (see ``_reap``)."""
        due, self._respawn = self._respawn, set()
        if not (respawn and self._intake):
            return
        for index in sorted(due):
            if index not in self._slots:
                self.stats.restarts += 1
                self._spawn(index)

    def _settle_held(self, slot: _Slot, code: int | None) -> None:
        """Settle every task a dead worker held, exactly once each: the one it was processing is
        charged with the crash; the ones it had taken but not finished (being committed) and the
        ones it had not taken go back to the front of the line (they did not cause the death;
        their temp files are removed). A worker the supervisor killed was charged already (a
        timeout) or not at all (wedged): every task it still held goes back. A taken task given
        back where the death may be its own doing is counted (``_suspect``, ``_give_back``)."""
        seq = -1 if slot.killed else slot.seq
        taken = slot.taken
        # Someone answers for the death: the task it processed, the one(s) it was killed for,
        # or those a failed commit reported before the worker ended itself (it then shows no
        # group; a group still shown had no known culprit).
        charged = slot.killed == "timeout" or seq in self._tasks or (
            code == EXIT_COMMIT_FAILED and slot.shared[COMMIT_STARTED] < 0)
        back: list[Task] = []
        for s, n in sorted(slot.held.items(), key=lambda kv: kv[1]):
            task = self._tasks.get(s)
            if task is None:
                continue  # settled already (a result, a timeout, a withdrawal)
            if s == seq:
                self._crashed(slot, s, code)
            elif not self._intake:
                self._ready.append(self._charge(slot, s, "cancelled", "its worker ended during "
                                                "shutdown before finishing this input"))
            elif n < taken:  # taken, not the one it processed, no result: being committed
                _remove_temps(self._outputs(s), slot.proc.pid)
                if not _suspect(slot, s, n, charged) or self._give_back(slot, task, code):
                    self._log.info("file.requeued", path=task.path, worker=slot.proc.pid,
                                   why="its worker died before committing its outputs")
                    back.append(task)
            else:
                back.append(task)  # never started there: handed to the next worker
        slot.held.clear()
        self.stats.requeued += len(back)
        self._pending.extendleft(reversed(back))

    def _give_back(self, slot: _Slot, task: Task, code: int | None) -> bool:
        """Count one more death of a worker that may have died of ``task``; True if it may run
        again, False if it was charged ``worker-crashed`` (crash_retries + 1 deaths in all)."""
        deaths = self._given_back.get(task.seq, 0) + 1
        self._given_back[task.seq] = deaths
        total = task.attempt - 1 + deaths
        if total <= self.settings.crash_retries:
            return True
        self.stats.crashes += 1
        self._ready.append(self._charge(
            slot, task.seq, "worker-crashed",
            f"{total} worker(s) died ({_how(code, slot.killed)}) while committing this input or "
            "holding it; not run again"))
        return False

    def _crashed(self, slot: _Slot, seq: int, code: int | None) -> None:
        task = self._tasks[seq]
        self.stats.crashes += 1
        how = _how(code, slot.killed)
        _remove_temps(self._outputs(seq), slot.proc.pid)
        deaths = task.attempt + self._given_back.get(seq, 0)
        if deaths <= self.settings.crash_retries and self._intake:
            self._log.warning("file.retried", path=task.path, worker=slot.proc.pid,
                              reason="worker-crashed", how=how, attempt=task.attempt)
            retry = task.retry()
            self._tasks[seq] = retry
            self._pending.appendleft(retry)
        else:
            self._ready.append(self._charge(slot, seq, "worker-crashed",
                                            f"the worker died ({how}) processing this input, "
                                            f"{deaths} time(s)"))

    def _kill_stuck(self) -> None:
        """Kill each worker past the timeout (charging ``timeout`` to the task(s) at fault) or
        wedged (see ``_verdict``); it is reaped, and the rest it held settled, at a later tick."""
        limit = self.settings.task_timeout
        now = time.monotonic()
        for slot in list(self._slots.values()):
            if slot.killed:
                continue
            self._moved(slot, now)
            why, overdue = self._verdict(slot, now, limit)
            if not why:
                continue
            with _locked(slot):
                why, overdue = self._verdict(slot, now, limit)  # what it shows now, for sure
                if not why:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, signal.SIGKILL)
                slot.killed = why
                slot.cleanup = [o for s in slot.held for o in self._outputs(s)]
            if why == "timeout":
                self.stats.timeouts += 1
            else:
                self._log.warning("worker.killed", worker=slot.proc.pid, why=why,
                                  held=len(slot.held), still_for=round(now - slot.progress, 1))
            for seq, error in overdue:
                if seq in self._tasks:
                    self._ready.append(self._charge(slot, seq, "timeout", error))

    def _verdict(self, slot: _Slot, now: float,
                 limit: float) -> tuple[str, list[tuple[int, str]]]:
        """Whether to kill this worker: ("timeout", the tasks to charge and why), ("wedged",
        []) or ("committer-gone", []); ("", []) to leave it."""
        overdue = self._overdue(slot, now, limit)
        if overdue:
            return "timeout", overdue
        if slot.held and now - slot.progress > limit + WEDGE_MARGIN:
            return "wedged", []
        if slot.held and self._committer_gone(slot, now):
            return "committer-gone", []
        return "", []

    def _overdue(self, slot: _Slot, now: float, limit: float) -> list[tuple[int, str]]:
        """The tasks of this worker past the timeout, with the error to charge each: the one
        it prepares, and in the group being committed the one being written (else all of
        them: a step they share, such as syncing, is stuck)."""
        sh = slot.shared
        out: list[tuple[int, str]] = []
        seq = int(sh[SEQ])
        if seq >= 0 and now - sh[STARTED] > limit:
            out.append((seq, f"still running after {limit:g} s; worker killed"))
        started = sh[COMMIT_STARTED]
        if started >= 0 and now - started > limit:
            writing = int(sh[COMMIT_SEQ])
            if writing >= 0:
                out.append((writing, f"writing its outputs took longer than {limit:g} s; "
                                     "worker killed"))
            else:
                lo, hi = sh[COMMIT_FROM], sh[COMMIT_TO]
                out += [(s, f"its commit group (syncing its outputs together) took longer than "
                            f"{limit:g} s; worker killed")
                        for s, n in slot.held.items() if lo <= n < hi]
        return out

    def _committer_gone(self, slot: _Slot, now: float) -> bool:
        """A live worker whose committer thread has not beaten lately, neither committing nor
        beside a main thread that prepares a task (which may hold the interpreter a while: the
        timeout governs that)."""
        sh = slot.shared
        beat = sh[COMMITTER_BEAT]
        return beat > 0 and sh[COMMIT_STARTED] < 0 and sh[SEQ] < 0 and \
            now - beat > COMMITTER_STALE

    def _moved(self, slot: _Slot, now: float) -> None:
        """Note when this worker last changed (took a task, started or finished a commit step,
        sent a result), or held nothing."""
        sh = slot.shared
        mark = (sh[TAKEN], sh[SEQ], sh[COMMIT_STARTED], sh[COMMIT_SEQ], float(slot.tasks))
        if mark != slot.mark or not slot.held:
            slot.mark, slot.progress = mark, now

    def problems(self) -> list[str]:
        """What is wrong with the workers at this moment, one line each ([]: nothing).

        A worker whose task or commit is past the timeout and not killed yet (the next tick
        kills it), one wedged (holding tasks without any progress for longer than the
        timeout), one whose committer thread has stopped, and one killed but not yet gone.
        For health checks: the daemon's heartbeat reports them."""
        limit = self.settings.task_timeout
        now = time.monotonic()
        out: list[str] = []
        for slot in self._slots.values():
            pid = slot.proc.pid
            if slot.killed:
                out.append(f"worker {pid} was killed ({slot.killed}) and has not exited yet")
                continue
            self._moved(slot, now)
            for seq, _ in self._overdue(slot, now, limit):
                task = self._tasks.get(seq)
                out.append(f"worker {pid} is past the {limit:g} s timeout on "
                           f"{task.path if task else seq}")
            if slot.held and now - slot.progress > limit:
                out.append(f"worker {pid} holds {len(slot.held)} task(s) and has made no "
                           f"progress for {now - slot.progress:.0f} s (timeout {limit:g} s)")
            if self._committer_gone(slot, now):
                out.append(f"worker {pid}'s committer thread has not run for "
                           f"{now - slot.shared[COMMITTER_BEAT]:.0f} s")
        return out

    def capacity(self) -> int:
        """Tasks one worker may hold now (see LOOKAHEAD)."""
        if self._avg is None:
            return 2
        if self._avg >= LONG_TASK:
            return 1
        avg = max(self._avg, 1e-4)
        # plus the tasks a commit group gathers while the next ones are decoded
        return 2 + min(MAX_AHEAD, math.ceil(LOOKAHEAD / avg)) + \
            min(GROUP_MAX, math.ceil(GROUP_WAIT / avg))

    def _feed(self) -> None:
        if not self._intake or not self._started or not self._pending:
            return
        cap = self.capacity()
        batch = max(1, cap // 2)  # send a few at a time: one message, one wake-up
        while self._pending:
            live = [s for s in self._slots.values()
                    if not s.killed and cap - len(s.held) > 0]
            if not live:
                return
            slot = min(live, key=lambda s: (len(s.held), s.index))
            room = cap - len(slot.held)
            if slot.held and room < batch:
                return  # every worker has enough to do; send a fuller message later
            chunk: list[Task] = []
            while self._pending and len(chunk) < room:
                task = self._pending.popleft()
                if task.seq in self._tasks:
                    chunk.append(task)
            if not chunk:
                return
            try:
                slot.tasks_conn.send(chunk)
            except OSError:  # it died: reaped at the next tick, these go to another
                self._pending.extendleft(reversed(chunk))
                return
            for task in chunk:
                slot.held[task.seq] = slot.sent
                slot.sent += 1

    # --- helpers --------------------------------------------------------------------------------

    def _outputs(self, seq: int) -> list[tuple[str, str]]:
        """(path, root) of each output of task ``seq``."""
        task = self._tasks.get(seq)
        return [(o.path, task.root) for o in task.outputs] if task else []

    def _charge(self, slot: _Slot, seq: int, reason: str, error: str) -> Result:
        task = self._tasks.pop(seq)
        slot.held.pop(seq, None)
        self._given_back.pop(seq, None)
        return failure(task, reason, error, worker=slot.proc.pid)

    def _retire(self, slot: _Slot) -> None:
        for fd in [fd for fd, s in self._fds.items() if s is slot]:
            self._poller.unregister(fd)
            del self._fds[fd]
        with contextlib.suppress(OSError):
            slot.conn.close()
        with contextlib.suppress(OSError):
            slot.tasks_conn.close()
        if slot.cleanup:
            slot.proc.join(5)  # a killed process may still be exiting
            removed = _remove_temps(slot.cleanup, slot.proc.pid)
            if removed:
                self._log.info("worker.temp_removed", worker=slot.proc.pid, files=removed)
        with contextlib.suppress(ValueError):
            slot.proc.close()


@contextlib.contextmanager
def _locked(slot: _Slot) -> Iterator[None]:
    """Hold a worker's slot lock, waiting at most LOCK_WAIT: a worker killed (from outside)
    while it held the lock never releases it, and its slot is not changing any more."""
    got = slot.lock.acquire(timeout=LOCK_WAIT)
    try:
        yield
    finally:
        if got:
            slot.lock.release()


def _suspect(slot: _Slot, seq: int, position: int, charged: bool) -> bool:
    """Whether the death of ``slot``'s worker may be the doing of ``seq``, a task it had taken
    and not finished: its output was being written then; or, none being written and no task
    charged for the death, ``seq`` was in the group being committed (or none was)."""
    sh = slot.shared
    writing = int(sh[COMMIT_SEQ])
    if writing >= 0:
        return writing == seq
    if charged:
        return False
    return sh[COMMIT_STARTED] < 0 or sh[COMMIT_FROM] <= position < sh[COMMIT_TO]


def _remove_temps(outputs: list[tuple[str, str]], pid: int) -> list[str]:
    """Remove the temp files worker ``pid`` may have left for these (output, root) pairs."""
    return [t for path, root in outputs for t in remove_temps([path], pid, root)]


def _how(code: int | None, killed: str = "") -> str:
    """How a worker ended, for an error message."""
    if killed:
        return f"killed: {killed}"
    if code and code < 0:
        return f"signal {-code} ({signal.Signals(-code).name})"
    if code == EXIT_COMMIT_FAILED:
        return "a worker thread failed"
    return f"exit code {code}"


def resolve_start_method(method: str) -> str:
    """The start method ``method`` ("auto" or one by name) stands for in this process now.

    "auto" is "fork" where this process runs no other thread (a forked worker then starts at
    once, with nothing held by a thread it did not inherit), else "forkserver". A caller that
    starts threads of its own later (the daemon) asks for "forkserver" instead.
    """
    if method != "auto":
        return method
    forkable = "fork" in multiprocessing.get_all_start_methods()
    return "fork" if forkable and threading.active_count() == 1 else "forkserver"
