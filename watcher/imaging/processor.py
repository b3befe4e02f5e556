"""The Processor: a ``Task`` -> safe decode -> transform chains -> atomic outputs -> a ``Result``.

A ``Processor`` holds the pipelines a worker was started with. ``prepare`` decodes the input,
runs each pipeline and encodes its output into a staged file; ``commit`` (or ``commit_many`` for
several tasks at once) makes them durable and publishes them; ``stage`` leaves them under their
temp names for a coordinator to publish. No processes here.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence

from watcher.errors import RejectedInput
from watcher.fs.durable import fsync_dir, sync_files
from watcher.fs.staging import Staged
from watcher.imaging import codec, memory
from watcher.imaging.codec import Source
from watcher.imaging.colour import to_working
from watcher.imaging.encode import EncodeError, encode
from watcher.imaging.formats import ANIMATED_FORMATS
from watcher.imaging.pil import Image
from watcher.imaging.pipeline import (
    Pipeline,
    Prepared,
    Shrink,
    TransformError,
    apply,
    encoder_for,
    exif_orientation,
    output_format,
    plan_shrink,
)
from watcher.settings.schema import DecodeLimits
from watcher.tasks import Result, Task

Size = tuple[int, int]


class Processor:
    """Turns tasks into results with a fixed set of pipelines (what a worker holds).

    ``memory_cap`` (bytes, 0: none) is the worker's ``max_worker_memory``: an input whose
    estimate (``memory``) does not fit in it is refused as ``too-large`` before it is
    decoded. ``exhausted`` is set once a task ran out of memory (the worker should end).
    """

    def __init__(self, pipelines: Mapping[str, Pipeline], limits: DecodeLimits,
                 memory_cap: int = 0) -> None:
        self.pipelines = dict(pipelines)
        self.limits = limits
        self.memory_cap = memory_cap
        self.exhausted = False
        # called with an admitted input's estimate before it is decoded (a worker makes room)
        self.make_room: Callable[[int], None] | None = None
        # called before a task's outputs are published; raising there publishes none of them
        # (a worker whose daemon is gone ends instead: see ``worker``)
        self.before_publish: Callable[[], None] | None = None

    def run(self, task: Task) -> Result:
        """Process ``task`` start to end: its outputs are published when this returns."""
        return self.commit(self.prepare(task))

    def prepare(self, task: Task) -> Prepared:
        """Decode, transform and encode every output of ``task`` to its temp file; a failure
        here is final (nothing was published). ``commit`` makes the outputs durable and public."""
        t0 = time.perf_counter()
        notes: list[str] = []
        staged: list[Staged] = []
        bytes_in = 0
        try:
            with warnings.catch_warnings(record=True) as caught:
                # Pillow reports a malformed EXIF block as a UserWarning and skips it; the
                # file's log line should say so.
                warnings.simplefilter("always", UserWarning)
                bytes_in = self._run(task, notes, staged)
            notes.extend(dict.fromkeys(str(w.message).strip() for w in caught
                                       if issubclass(w.category, UserWarning)))
        except BaseException as exc:
            for st in staged:
                st.discard()
            if not isinstance(exc, Exception):
                raise
            if _out_of_memory(exc):
                self.exhausted = True
            return Prepared(task=task, t0=t0, staged=(), bytes_in=bytes_in, notes=tuple(notes),
                            failure=self._failure(task, t0, exc, notes, bytes_in))
        return Prepared(task=task, t0=t0, staged=tuple(staged), bytes_in=bytes_in,
                        notes=tuple(notes), spent=_since(t0))

    def commit(self, prep: Prepared) -> Result:
        """Make the staged outputs durable and publish them (in order); the task's result."""
        return self.commit_many([prep])[0]

    def commit_many(self, preps: Sequence[Prepared]) -> list[Result]:
        """Commit several prepared tasks together; their results, in order.

        Every output is written to its temp file, all of them are made durable at once
        (``sync_files``), then each task's outputs are published in order and each folder that
        needs it is fsynced once. Each task still succeeds or fails on its own, as alone.
        """
        t0 = time.perf_counter()
        results: list[Result | None] = [p.failure for p in preps]
        errors: dict[int, Exception] = {}  # by task: what kept its outputs from being written
        fds: list[int] = []
        owners: list[int] = []
        size = 0
        for i, prep in enumerate(preps):
            if prep.failure is not None:
                continue
            mine: list[int] = []
            try:
                for st in prep.staged:
                    mine.append(st.write_temp())
            except (RejectedInput, OSError) as exc:
                errors[i] = exc
                continue
            fds += mine
            owners += [i] * len(mine)
            size += sum(st.size for st in prep.staged)
        for i, error in zip(owners, sync_files(fds, size), strict=True):
            if error is not None:
                errors.setdefault(i, error)
        folders: dict[str, set[int]] = {}
        for i, prep in enumerate(preps):
            if prep.failure is not None:
                continue
            task, notes = prep.task, list(prep.notes)
            if i in errors:
                for st in prep.staged:
                    st.discard()
                results[i] = self._failure(task, prep.t0, errors[i], notes, prep.bytes_in)
                continue
            written: list[str] = []
            bytes_out = 0
            pending = list(prep.staged)
            if self.before_publish is not None:
                try:
                    self.before_publish()
                except BaseException:
                    for other in preps[i:]:
                        for st in other.staged:
                            st.discard()
                    raise
            try:
                while pending:
                    st = pending.pop(0)
                    bytes_out += st.publish(overwrite=task.overwrite)
                    written.append(st.final)
            except (RejectedInput, OSError) as exc:
                for st in pending:
                    st.discard()
                results[i] = self._failure(task, prep.t0, exc, notes, prep.bytes_in, written)
                continue
            if task.sync_dir:
                for path in written:
                    folders.setdefault(os.path.dirname(path) or ".", set()).add(i)
            results[i] = Result(seq=task.seq, path=task.path, ok=True, outputs=tuple(written),
                                duration=prep.spent + _since(t0), worker=os.getpid(),
                                attempt=task.attempt, bytes_in=prep.bytes_in,
                                bytes_out=bytes_out, warnings=tuple(notes))
        for folder, owners_of in folders.items():
            try:
                fsync_dir(folder)
            except OSError as exc:
                for i in sorted(owners_of):
                    done = results[i]
                    if done is not None and done.ok:
                        results[i] = self._failure(preps[i].task, preps[i].t0, exc,
                                                   list(preps[i].notes), preps[i].bytes_in,
                                                   list(done.outputs))
        if any(r is None for r in results):
            raise RuntimeError("a prepared task was left without a result")
        return results  # type: ignore[return-value]

    def stage(self, prep: Prepared) -> Result:
        """fsync the staged outputs but leave them under their temp names: the result lists
        them in ``staged`` for a coordinator to publish (a task on a cluster)."""
        if prep.failure is not None:
            return prep.failure
        task, notes = prep.task, list(prep.notes)
        pairs: list[tuple[str, str]] = []
        pending = list(prep.staged)
        try:
            while pending:
                st = pending.pop(0)
                pairs.append((st.sync(), st.final))
        except OSError as exc:
            for st in pending:
                st.discard()
            for tmp, _ in pairs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return self._failure(task, prep.t0, exc, notes, prep.bytes_in)
        return Result(seq=task.seq, path=task.path, ok=True, duration=_since(prep.t0),
                      worker=os.getpid(), attempt=task.attempt, bytes_in=prep.bytes_in,
                      bytes_out=sum(st.size for st in prep.staged), warnings=tuple(notes),
                      staged=tuple(pairs))

    def _failure(self, task: Task, t0: float, exc: Exception, notes: list[str], bytes_in: int,
                 written: list[str] | None = None) -> Result:
        written = written or []
        if isinstance(exc, RejectedInput):
            return self._fail(task, t0, exc.reason, exc.detail, "RejectedInput", written, notes,
                              bytes_in)
        if _out_of_memory(exc):  # also raised inside a transform (a TransformError's cause)
            cap = f" ({memory.mib(self.memory_cap)})" if self.memory_cap else ""
            return self._fail(task, t0, "too-large", f"{task.path}: processing it needed more "
                              f"memory than the worker's max_worker_memory{cap} allows",
                              "MemoryError", written, notes, bytes_in)
        if isinstance(exc, TransformError):
            cause = exc.__cause__ or exc
            return self._fail(task, t0, "transform-failed",
                              f"{exc.step}: {type(cause).__name__}: {cause}",
                              type(cause).__name__, written, notes, bytes_in,
                              tb=traceback.format_exception(cause))
        if isinstance(exc, EncodeError):
            cause = exc.__cause__ or exc
            return self._fail(task, t0, "encode-failed", f"{exc.path}: {type(cause).__name__}: "
                              f"{cause}", type(cause).__name__, written, notes, bytes_in)
        if isinstance(exc, OSError):
            return self._fail(task, t0, "write-failed", f"{exc}", type(exc).__name__, written,
                              notes, bytes_in)
        # A bug must fail this input, not the worker.
        return self._fail(task, t0, "internal-error", f"{type(exc).__name__}: {exc}",
                          type(exc).__name__, written, notes, bytes_in,
                          tb=traceback.format_exception(exc))

    def _fail(self, task: Task, t0: float, reason: str, error: str, etype: str,
              written: list[str], notes: list[str], bytes_in: int,
              tb: list[str] | None = None) -> Result:
        if tb:
            notes = [*notes, "".join(tb[-6:]).strip()]
        return Result(seq=task.seq, path=task.path, ok=False, outputs=tuple(written),
                      reason=reason, error=error, error_type=etype, duration=_since(t0),
                      worker=os.getpid(), attempt=task.attempt, bytes_in=bytes_in, bytes_out=0,
                      warnings=tuple(notes))

    def _run(self, task: Task, notes: list[str], staged: list[Staged]) -> int:
        chosen = []
        for out in task.outputs:
            p = self.pipelines.get(out.pipeline)
            if p is None:
                raise RejectedInput("transform-failed", f"unknown pipeline {out.pipeline!r}")
            chosen.append((p, out.path))

        plans: list[Shrink | None] = []

        def draft(im: Image.Image) -> tuple[str, Size] | None:
            orientation = exif_orientation(im)
            plans.extend(plan_shrink(p, im.size, orientation) for p, _ in chosen)
            if not plans or any(s is None for s in plans):
                return None
            need = (max(s.need[0] for s in plans if s), max(s.need[1] for s in plans if s))
            return ("L" if all(s and s.luma for s in plans) else "RGB", need)

        def admit(im: Image.Image, fmt: str, n_frames: int) -> None:
            if self.memory_cap:
                self._admit(task.path, im, fmt, n_frames, chosen)

        # Decode first: what the input is decides its fate before what its outputs are named.
        src = codec.decode(task.path, limits=self.limits, nofollow=task.nofollow, plan=draft,
                           max_links=task.max_links, admit=admit)
        if src.image.size == src.size:
            # No reduced-scale decode happened: run every step as written on the real image.
            plans = [None] * len(chosen)
        try:
            pipes = [(p, path, encoder_for(path, task.path)) for p, path in chosen]
            colour = "srgb" if any(p.output.colour == "srgb" for p, _, _ in pipes) else "keep"
            base = _working(src, colour, task.path, notes)
            if src.n_frames > 1 and base is src.image:
                base = base.copy()  # seeking for later frames must not change it
            for (p, path, fmt), shrink in zip(pipes, plans, strict=True):
                images = self._frames(src, p, fmt, base, shrink, task.path, notes)
                oriented = p.output.auto_orient or any(s.spec and s.spec.orients for s in p.steps)
                staged.append(Staged(
                    path, lambda f, im=images, p=p, fmt=fmt, o=oriented, path=path: encode(
                        im, f, fmt, p.output, src, o, notes, path), task.root))
        finally:
            src.close()
        return src.bytes_in

    def _admit(self, path: str, im: Image.Image, fmt: str, n_frames: int,
               chosen: list[tuple[Pipeline, str]]) -> None:
        """Refuse ``path`` (``too-large``) when its estimate does not fit in the memory cap."""
        pipes = [(p, output_format(out) or "") for p, out in chosen]
        need = memory.estimate(
            im.size, im.mode, fmt, n_frames, pipes,
            progressive=bool(im.info.get("progressive") or im.info.get("progression")),
            colour_copy=bool(im.info.get("icc_profile"))
            and any(p.output.colour == "srgb" for p, _ in chosen),
            alpha="A" in im.mode or "transparency" in im.info,
            orientation=exif_orientation(im))
        budget = self.memory_cap - memory.BASELINE
        if need.peak > budget:
            raise RejectedInput("too-large", f"{path}: decoding and processing it would need "
                                f"about {memory.mib(need.peak)} ({need.describe()}); "
                                f"max_worker_memory is {memory.mib(self.memory_cap)}, of "
                                f"which {memory.mib(memory.BASELINE)} is the worker's own")
        if self.make_room is not None:
            self.make_room(need.peak)

    def _frames(self, src: Source, p: Pipeline, fmt: str, base: Image.Image,
                shrink: Shrink | None, path: str,
                notes: list[str]) -> list[tuple[Image.Image, int]]:
        if src.n_frames > 1 and p.output.frames == "all" and fmt in ANIMATED_FORMATS:
            if src.n_frames > p.output.max_frames:
                notes.append(f"animation has {src.n_frames} frames; kept the first "
                             f"{p.output.max_frames} (max_frames)")
            out = []
            for frame, duration in codec.frames(src, path, p.output.max_frames):
                im = _working(src, p.output.colour, path, [], frame)
                out.append((apply(p, im, shrink), duration))
            return out
        duration = codec.frame_duration(src.image.info.get("duration"), 0)
        return [(apply(p, base, shrink), duration)]


def _working(src: Source, colour: str, path: str, notes: list[str],
             frame: Image.Image | None = None) -> Image.Image:
    """``frame`` (default: the decoded image) in a working mode (``colour.to_working``).

    The decoder may give a mode (or a palette, or a profile) that cannot be converted; that is
    this input's data, not a bug: ``corrupt``, naming the mode.
    """
    im = src.image if frame is None else frame
    try:
        return to_working(im, src.icc, colour, notes)
    except (ValueError, OSError, TypeError, KeyError, IndexError) as exc:
        raise RejectedInput("corrupt", f"{path}: pixels in mode {im.mode!r} cannot be "
                            f"converted: {type(exc).__name__}: {exc}") from exc


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a ``MemoryError``."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        if isinstance(e, MemoryError):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 6)
