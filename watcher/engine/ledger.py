"""The supervisor's ledger: every task it was given and has not answered for, and the one
answer each gets.

A task is outstanding from ``add`` until exactly one result for it leaves through ``ready``:
its worker's (``accept``; a late duplicate of a task answered already is dropped), or one the
supervisor decides (``charge``: a timeout, a crash, a cancellation). When a worker dies,
``settle`` deals with every task it held, once each: the one it was processing is charged with
the crash or run again (``crash_retries``), the ones it was committing go back to the front of
the line unless the death may be theirs too often, and the ones it had not taken go back as
they were. ``pending`` is the line of tasks not yet sent to a worker.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from watcher.engine.committer import GROUP_MAX, GROUP_WAIT
from watcher.engine.executor import Stats, failure
from watcher.engine.handles import Handle, how, remove_worker_temps, suspect
from watcher.engine.slot import COMMIT_STARTED, EXIT_COMMIT_FAILED
from watcher.settings.schema import EngineSettings
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


class Ledger:
    def __init__(self, settings: EngineSettings, stats: Stats, logger: Any) -> None:
        self.settings = settings
        self.stats = stats
        self._log = logger
        self.tasks: dict[int, Task] = {}  # outstanding: submitted, no result accepted yet
        self.pending: deque[Task] = deque()  # not yet sent to a worker
        self.ready: list[Result] = []  # final, not yet handed to the caller
        self.intake = True
        self.avg: float | None = None  # moving average of a task's duration, seconds
        self._given_back: dict[int, int] = {}  # seq -> deaths of workers that had taken it

    def add(self, task: Task) -> None:
        self.tasks[task.seq] = task
        self.pending.append(task)

    def take_ready(self) -> list[Result]:
        out, self.ready = self.ready, []
        return out

    def capacity(self) -> int:
        """Tasks one worker may hold now (see LOOKAHEAD)."""
        if self.avg is None:
            return 2
        if self.avg >= LONG_TASK:
            return 1
        avg = max(self.avg, 1e-4)
        # plus the tasks a commit group gathers while the next ones are decoded
        return 2 + min(MAX_AHEAD, math.ceil(LOOKAHEAD / avg)) + \
            min(GROUP_MAX, math.ceil(GROUP_WAIT / avg))

    def outputs(self, seq: int) -> list[tuple[str, str]]:
        """(path, root) of each output of task ``seq``."""
        task = self.tasks.get(seq)
        return [(o.path, task.root) for o in task.outputs] if task else []

    def accept(self, result: Result) -> Result | None:
        """A worker's result: the task's answer, or None for a duplicate (it ran twice)."""
        task = self.tasks.get(result.seq)
        if task is None:
            self.stats.duplicates += 1
            self._log.debug("engine.duplicate_result", input=result.path, seq=result.seq)
            return None
        del self.tasks[result.seq]
        self._given_back.pop(result.seq, None)
        if result.ok and result.duration > 0:
            self.avg = result.duration if self.avg is None else \
                0.8 * self.avg + 0.2 * result.duration
        return result

    def charge(self, h: Handle, seq: int, reason: str, error: str) -> Result:
        """The supervisor's answer for task ``seq``, held by ``h``'s worker."""
        task = self.tasks.pop(seq)
        h.held.pop(seq, None)
        self._given_back.pop(seq, None)
        return failure(task, reason, error, worker=h.proc.pid)

    def withdraw(self) -> list[Task]:
        """Every task not sent to a worker, taken off the books (intake stops)."""
        self.intake = False
        out = list(self.pending)
        self.pending.clear()
        return out

    def settle(self, h: Handle, code: int | None) -> None:
        """Settle every task a dead worker held, exactly once each: the one it was processing is
        charged with the crash; the ones it had taken but not finished (being committed) and the
        ones it had not taken go back to the front of the line (they did not cause the death;
        their temp files are removed). A worker the supervisor killed was charged already (a
        timeout) or not at all (wedged): every task it still held goes back. A taken task given
        back where the death may be its own doing is counted (``suspect``, ``_give_back``)."""
        seq = -1 if h.killed else h.seq
        taken = h.taken
        # Someone answers for the death: the task it processed, the one(s) it was killed for,
        # or those a failed commit reported before the worker ended itself (it then shows no
        # group; a group still shown had no known culprit).
        charged = h.killed == "timeout" or seq in self.tasks or (
            code == EXIT_COMMIT_FAILED and h.shared[COMMIT_STARTED] < 0)
        back: list[Task] = []
        for s, n in sorted(h.held.items(), key=lambda kv: kv[1]):
            task = self.tasks.get(s)
            if task is None:
                continue  # settled already (a result, a timeout, a withdrawal)
            if s == seq:
                self._crashed(h, s, code)
            elif not self.intake:
                self.ready.append(self.charge(h, s, "cancelled", "its worker ended during "
                                              "shutdown before finishing this input"))
            elif n < taken:  # taken, not the one it processed, no result: being committed
                remove_worker_temps(self.outputs(s), h.proc.pid)
                if not suspect(h, s, n, charged) or self._give_back(h, task, code):
                    self._log.info("file.requeued", input=task.path, worker_pid=h.proc.pid,
                                   why="its worker died before committing its outputs")
                    back.append(task)
            else:
                back.append(task)  # never started there: handed to the next worker
        h.held.clear()
        self.stats.requeued += len(back)
        self.pending.extendleft(reversed(back))

    def _give_back(self, h: Handle, task: Task, code: int | None) -> bool:
        """Count one more death of a worker that may have died of ``task``; True if it may run
        again, False if it was charged ``worker-crashed`` (crash_retries + 1 deaths in all)."""
        deaths = self._given_back.get(task.seq, 0) + 1
        self._given_back[task.seq] = deaths
        total = task.attempt - 1 + deaths
        if total <= self.settings.crash_retries:
            return True
        self.stats.crashes += 1
        self.ready.append(self.charge(
            h, task.seq, "worker-crashed",
            f"{total} worker(s) died ({how(code, h.killed)}) while committing this input or "
            "holding it; not run again"))
        return False

    def _crashed(self, h: Handle, seq: int, code: int | None) -> None:
        task = self.tasks[seq]
        self.stats.crashes += 1
        died = how(code, h.killed)
        remove_worker_temps(self.outputs(seq), h.proc.pid)
        deaths = task.attempt + self._given_back.get(seq, 0)
        if deaths <= self.settings.crash_retries and self.intake:
            self._log.warning("file.retried", input=task.path, worker_pid=h.proc.pid,
                              reason="worker-crashed", how=died, attempt=task.attempt)
            retry = task.retry()
            self.tasks[seq] = retry
            self.pending.appendleft(retry)
        else:
            self.ready.append(self.charge(h, seq, "worker-crashed",
                                          f"the worker died ({died}) processing this input, "
                                          f"{deaths} time(s)"))
