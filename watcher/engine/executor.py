"""What every executor is: the interface batch and watch mode drive, whatever runs the tasks.

An executor takes ``Task``s (``submit``), runs each in a worker somewhere, and hands back exactly
one ``Result`` per task (``poll``), however often the task actually ran. ``stop_intake`` withdraws
what has not started; ``close`` drains and ends the workers, reporting what it cut short as
``cancelled``. Two backends stand behind it, as watchdog's observers stand behind
``BaseObserver``: ``supervisor.Engine`` (local worker processes) and ``cluster.DaskEngine`` (a
Dask cluster); ``factory.create_executor`` picks one by ``settings.executor``.

``failure`` is the one way to build the result of a task that did not produce one (a crash, a
timeout, a cancellation), whichever backend decided it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from watcher.errors import WatcherError
from watcher.fs.files import HOST, running
from watcher.settings.schema import EngineSettings
from watcher.tasks import Result, Task


class EngineError(WatcherError):
    """The engine cannot run (workers fail to start, the cluster cannot be reached)."""


class UnguardedMainError(EngineError):
    """Workers re-running the main script met a call of watcher at its top level (no guard)."""


@dataclass
class Stats:
    """What an executor has done since it started (gauges and the batch report read these)."""

    started: int = 0
    restarts: int = 0
    crashes: int = 0
    timeouts: int = 0
    requeued: int = 0
    duplicates: int = 0


@dataclass(frozen=True, kw_only=True)
class WorkerState:
    """One worker as the status page shows it: what it is doing now and for how long."""

    worker: str  # its name: the pid here, the address on a cluster
    pid: int = 0
    alive: bool = True
    seq: int = -1  # the task it is decoding and encoding, or committing (-1: none)
    path: str = ""  # that task's input (the claimed file)
    phase: str = "idle"  # idle | processing | committing
    elapsed_s: float = 0.0  # since it started that phase
    tasks: int = 0  # results it has sent back


def failure(task: Task, reason: str, error: str, worker: int = 0) -> Result:
    """The result of ``task`` when its executor, not its worker, decided it failed."""
    return Result(seq=task.seq, path=task.path, ok=False, reason=reason, error=error,
                  error_type="", duration=0.0, worker=worker, attempt=task.attempt)


class Executor(abc.ABC):
    """The executor's interface (see the module's docstring). Subclasses set ``settings``,
    ``stats`` and, where they bound it, ``memory_cap`` (bytes a worker may use)."""

    settings: EngineSettings
    stats: Stats
    memory_cap: int | None = None

    @abc.abstractmethod
    def start(self) -> None:
        """Start the workers (or connect to them); submitted tasks go out as they are ready."""

    @abc.abstractmethod
    def submit(self, task: Task) -> None:
        """Queue a task; raises ``EngineError`` once intake has stopped."""

    @abc.abstractmethod
    def poll(self, timeout: float = 0.25, *, respawn: bool = True,
             wake: Sequence[Any] = ()) -> list[Result]:
        """One tick: wait up to ``timeout`` (or until a ``wake`` descriptor is readable) and
        return the results that became final."""

    @abc.abstractmethod
    def stop_intake(self) -> list[Task]:
        """Stop handing out work; return the tasks that had not started (now withdrawn)."""

    @abc.abstractmethod
    def close(self, grace: float | None = None,
              abort: Callable[[], bool] | None = None) -> list[Result]:
        """Let running tasks finish for up to ``grace`` seconds, then end every worker; return
        the results that arrived meanwhile and ``cancelled`` for the rest."""

    @abc.abstractmethod
    def running(self) -> list[str]:
        """The inputs being processed at this moment."""

    @abc.abstractmethod
    def problems(self) -> list[str]:
        """What is wrong right now, one line each ([]: nothing), for health checks."""

    def worker_states(self) -> list[WorkerState]:
        """Each worker and the task it holds at this moment, for the status page (read from
        what the executor already knows: no round trip to a worker). The default knows
        none."""
        return []

    @property
    @abc.abstractmethod
    def outstanding(self) -> int:
        """Tasks submitted whose result has not been returned yet."""

    @property
    @abc.abstractmethod
    def workers_alive(self) -> int:
        """Workers able to take a task now."""

    @property
    @abc.abstractmethod
    def pids(self) -> list[int]:
        """The process ids of this host's workers (PID 1 reaping leaves them alone)."""

    def writer_gone(self, host: str, pid: int) -> bool:
        """Whether the writer a temp file names is gone for good: here, a process of this host
        that no longer runs (another host's is never judged gone)."""
        return host == HOST and not running(pid)
