"""One input -> safe decode -> transform chains -> atomic outputs. No processes here.

A ``Pipeline`` is a frozen, picklable description (named steps with validated parameters, a name
suffix and output options); a ``Processor`` holds the pipelines a worker was started with and turns
one ``Task`` into one ``Result``. Where every pipeline of a task starts by shrinking, the input is
decoded at reduced scale (JPEG DCT scaling) and the shrinking step resizes straight to the size it
would have produced from the full image.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from watcher import transforms
from watcher.errors import RejectedInput
from watcher.fs.files import Staged, fsync_dir, sync_files
from watcher.imaging import codec, memory
from watcher.imaging.codec import DecodeLimits, OutputOptions, Source
from watcher.imaging.pil import Image
from watcher.tasks import Result, Task

Size = tuple[int, int]
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


@dataclass(frozen=True)
class Step:
    """One transform with bound parameters: a registry name, or a user callable."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    func: Callable[..., Image.Image] | None = None  # user callables, pickled by reference

    @property
    def spec(self) -> transforms.TransformSpec | None:
        return None if self.func is not None else transforms.lookup(self.name)

    def __call__(self, im: Image.Image) -> Image.Image:
        fn = self.func if self.func is not None else transforms.lookup(self.name).func
        out = fn(im, **dict(self.params))
        if not isinstance(out, Image.Image):
            raise TypeError(f"transform {self.name} returned {type(out).__name__}, not an image "
                            "(in-place methods such as Image.thumbnail return None)")
        return out


@dataclass(frozen=True)
class Pipeline:
    name: str
    steps: tuple[Step, ...]
    suffix: str
    output: OutputOptions = field(default_factory=OutputOptions)


@dataclass(frozen=True)
class _Shrink:
    index: int  # which step shrinks
    target: Size  # its output size, from the full-size (oriented) image
    need: Size  # the smallest decode it may start from, in stored orientation
    luma: bool  # only luminance is needed up to that step


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from what the header gave, never loading pixels (PNG's getexif()
    would decode the whole image, and swallow its errors here)."""
    data = im.info.get("exif")
    if not isinstance(data, bytes):
        return 1
    try:
        exif = Image.Exif()
        exif.load(data)
        return int(exif.get(codec.ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is dealt with by auto_orient
        return 1


def plan_shrink(p: Pipeline, stored: Size, orientation: int) -> _Shrink | None:
    """Where ``p`` starts by shrinking (after orientation/grayscale steps only), say how much."""
    oriented = p.output.auto_orient or any(s.spec and s.spec.orients for s in p.steps)
    swap = oriented and orientation in _SWAPS_AXES
    size = (stored[1], stored[0]) if swap else stored
    luma = False
    for i, step in enumerate(p.steps):
        spec = step.spec
        if spec is None:
            return None
        if spec.orients:
            continue
        if spec.luma:
            luma = True
            continue
        if spec.size is None:
            return None
        target = spec.size(size, **dict(step.params))
        if target[0] >= size[0] and target[1] >= size[1]:
            return None
        need = (math.ceil(target[0] * spec.gap), math.ceil(target[1] * spec.gap))
        return _Shrink(i, target, (need[1], need[0]) if swap else need, luma)
    return None


def _exact(size: Size) -> Step:
    return Step("resize", (("width", size[0]), ("height", size[1]), ("scale", None),
                           ("upscale", True)))


_OUTPUT_EXT = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG",
               ".webp": "WEBP", ".avif": "AVIF", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
               ".gif": "GIF"}


def output_format(path: str) -> str | None:
    """The encoder an output path's extension names, or None when none does."""
    return _OUTPUT_EXT.get(os.path.splitext(path)[1].lower())


def _encoder_for(path: str, input_path: str) -> str:
    """The encoder of a planned output; an extension with no encoder is this input's failure.

    The planner names outputs (format "same" on an unusual extension asks the header), so an
    extension with no encoder only reaches here for an image the planner could not read but
    the worker could (it changed in between). It fails as ``encode-failed``: never transient
    (a retry would meet the same name), and no bytes are written under a name that says
    another format, nor under a name the planner did not choose.
    """
    fmt = output_format(path)
    if fmt is None:
        ext = os.path.splitext(path)[1]
        raise RejectedInput("encode-failed", f"{input_path}: no encoder for the planned "
                            f"output {path} (extension {ext!r})")
    return fmt


@dataclass(frozen=True)
class Prepared:
    """A task between ``Processor.prepare`` and ``commit``: its outputs staged in temp files,
    or the failure that ended it."""

    task: Task
    t0: float
    staged: tuple[Staged, ...]
    bytes_in: int
    notes: tuple[str, ...]
    failure: Result | None = None
    spent: float = 0.0  # seconds prepare took (a result's duration leaves out its wait)


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
            return Prepared(task, t0, (), bytes_in, tuple(notes),
                            self._failure(task, t0, exc, notes, bytes_in))
        return Prepared(task, t0, tuple(staged), bytes_in, tuple(notes), spent=_since(t0))

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
            results[i] = Result(task.seq, task.path, True, tuple(written),
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
        return Result(task.seq, task.path, True, (), duration=_since(prep.t0),
                      worker=os.getpid(), attempt=task.attempt, bytes_in=prep.bytes_in,
                      bytes_out=sum(st.size for st in prep.staged), warnings=tuple(notes),
                      staged=tuple(pairs))

    def _failure(self, task: Task, t0: float, exc: Exception, notes: list[str], bytes_in: int,
                 written: list[str] | None = None) -> Result:
        written = written or []
        if isinstance(exc, RejectedInput):
            return self._fail(task, t0, exc.reason, exc.detail, "RejectedInput", written, notes,
                              bytes_in)
        if _out_of_memory(exc):  # also raised inside a transform (a _TransformError's cause)
            cap = f" ({memory.mib(self.memory_cap)})" if self.memory_cap else ""
            return self._fail(task, t0, "too-large", f"{task.path}: processing it needed more "
                              f"memory than the worker's max_worker_memory{cap} allows",
                              "MemoryError", written, notes, bytes_in)
        if isinstance(exc, _TransformError):
            cause = exc.__cause__ or exc
            return self._fail(task, t0, "transform-failed",
                              f"{exc.step}: {type(cause).__name__}: {cause}",
                              type(cause).__name__, written, notes, bytes_in,
                              tb=traceback.format_exception(cause))
        if isinstance(exc, _EncodeError):
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
        return Result(task.seq, task.path, False, tuple(written), reason, error, etype,
                      _since(t0), os.getpid(), task.attempt, bytes_in, 0, tuple(notes))

    def _run(self, task: Task, notes: list[str], staged: list[Staged]) -> int:
        chosen = []
        for out in task.outputs:
            p = self.pipelines.get(out.pipeline)
            if p is None:
                raise RejectedInput("transform-failed", f"unknown pipeline {out.pipeline!r}")
            chosen.append((p, out.path))

        plans: list[_Shrink | None] = []

        def draft(im: Image.Image) -> tuple[str, Size] | None:
            orientation = _orientation(im)
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
            pipes = [(p, path, _encoder_for(path, task.path)) for p, path in chosen]
            colour = "srgb" if any(p.output.colour == "srgb" for p, _, _ in pipes) else "keep"
            base = _working(src, colour, task.path, notes)
            if src.n_frames > 1 and base is src.image:
                base = base.copy()  # seeking for later frames must not change it
            for (p, path, fmt), shrink in zip(pipes, plans, strict=True):
                images = self._frames(src, p, fmt, base, shrink, task.path, notes)
                oriented = p.output.auto_orient or any(s.spec and s.spec.orients for s in p.steps)
                staged.append(Staged(
                    path, lambda f, im=images, p=p, fmt=fmt, o=oriented, path=path: _encode(
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
            orientation=_orientation(im))
        budget = self.memory_cap - memory.BASELINE
        if need.peak > budget:
            raise RejectedInput("too-large", f"{path}: decoding and processing it would need "
                                f"about {memory.mib(need.peak)} ({need.describe()}); "
                                f"max_worker_memory is {memory.mib(self.memory_cap)}, of "
                                f"which {memory.mib(memory.BASELINE)} is the worker's own")
        if self.make_room is not None:
            self.make_room(need.peak)

    def _frames(self, src: Source, p: Pipeline, fmt: str, base: Image.Image,
                shrink: _Shrink | None, path: str,
                notes: list[str]) -> list[tuple[Image.Image, int]]:
        if src.n_frames > 1 and p.output.frames == "all" and fmt in codec.ANIMATED_FORMATS:
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
    """``frame`` (default: the decoded image) in a working mode (``codec.to_working``).

    The decoder may give a mode (or a palette, or a profile) that cannot be converted; that is
    this input's data, not a bug: ``corrupt``, naming the mode.
    """
    im = src.image if frame is None else frame
    try:
        return codec.to_working(im, src.icc, colour, notes)
    except (ValueError, OSError, TypeError, KeyError, IndexError) as exc:
        raise RejectedInput("corrupt", f"{path}: pixels in mode {im.mode!r} cannot be "
                            f"converted: {type(exc).__name__}: {exc}") from exc


class _Output:
    """The output file as an encoder sees it: keeps every ``OSError`` the file itself raised
    (``failure``), the evidence that a failed encode is the file system's fault."""

    def __init__(self, fp: Any) -> None:
        self._fp = fp
        self.failure: OSError | None = None

    def _system(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            if self.failure is None and not isinstance(exc, io.UnsupportedOperation):
                self.failure = exc
            raise

    def write(self, data: Any) -> int:
        return self._system(self._fp.write, data)  # type: ignore[no-any-return]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._system(self._fp.seek, offset, whence)  # type: ignore[no-any-return]

    def tell(self) -> int:
        return self._system(self._fp.tell)  # type: ignore[no-any-return]

    def read(self, n: int = -1) -> bytes:
        return self._system(self._fp.read, n)  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._system(self._fp.flush)

    def fileno(self) -> int:
        return self._system(self._fp.fileno)  # type: ignore[no-any-return]

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


def _encode(images: list[tuple[Image.Image, int]], f: Any, fmt: str, opts: OutputOptions,
            src: Source, oriented: bool, notes: list[str], path: str) -> None:
    """Encode to ``f``. An ``OSError`` that ``f`` raised (disk full, EIO) propagates: the
    output could not be written (``write-failed``). Anything else the encoder raises (Pillow's
    "encoder error -2", the animated WebP encoder's RuntimeError, a ValueError for a mode) is
    ``encode-failed``: this image cannot be written in ``fmt``."""
    out = _Output(f)
    try:
        codec.save(images, out, fmt, opts, src, oriented=oriented, notes=notes)
    except MemoryError:
        raise
    except Exception as exc:
        if out.failure is exc:
            raise
        if out.failure is not None:  # the encoder wrapped the file's error in its own
            raise out.failure from exc
        if _encoder_out_of_memory(fmt, exc):
            raise MemoryError(f"the {fmt} encoder ran out of memory ({exc})") from exc
        raise _EncodeError(path) from exc


def _encoder_out_of_memory(fmt: str, exc: Exception) -> bool:
    """Whether an encoder's own error says it could not allocate: libwebp's
    VP8_ENC_ERROR_OUT_OF_MEMORY and its bitstream twin (Pillow: "encoding error 1" / "2"), or
    a message that says so (libavif's "Out of memory")."""
    text = str(exc)
    if fmt == "WEBP" and text in ("encoding error 1", "encoding error 2"):
        return True
    return "out of memory" in text.lower()


class _EncodeError(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class _TransformError(Exception):
    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step


def apply(p: Pipeline, im: Image.Image, shrink: _Shrink | None = None) -> Image.Image:
    """Run ``p``'s steps on ``im`` (orientation first when the pipeline asks for it)."""
    steps = list(p.steps)
    if shrink is not None:
        steps[shrink.index] = _exact(shrink.target)
    if p.output.auto_orient:
        im = transforms.auto_orient(im)
        steps = [s for s in steps if not (s.spec and s.spec.orients)]
    for step in steps:
        try:
            im = step(im)
        except Exception as exc:
            raise _TransformError(step.name) from exc
    return im


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
