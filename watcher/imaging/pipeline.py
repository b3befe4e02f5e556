"""Pipelines: named transform steps with an output's options, and how one runs on an image.

A ``Pipeline`` is a frozen, picklable description (named steps with validated parameters, a name
suffix and output options). Where every pipeline of a task starts by shrinking, the input is
decoded at reduced scale (JPEG DCT scaling, ``plan_shrink``) and the shrinking step resizes
straight to the size it would have produced from the full image (``apply``). ``Prepared`` is a
task between the two halves of a ``processor.Processor``'s work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watcher import transforms
from watcher.errors import RejectedInput
from watcher.fs.staging import Staged
from watcher.imaging import codec
from watcher.imaging.formats import OUTPUT_EXTENSIONS
from watcher.imaging.pil import Image
from watcher.settings.schema import OutputOptions
from watcher.tasks import Result, Task

Size = tuple[int, int]
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """Named steps, the suffix its outputs' names get and how they are encoded."""

    name: str
    steps: tuple[Step, ...]
    suffix: str
    output: OutputOptions = field(default_factory=OutputOptions)


@dataclass(frozen=True, kw_only=True)
class Shrink:
    """Where a pipeline starts by shrinking: the step, and the decode it may start from."""

    index: int  # which step shrinks
    target: Size  # its output size, from the full-size (oriented) image
    need: Size  # the smallest decode it may start from, in stored orientation
    luma: bool  # only luminance is needed up to that step


def exif_orientation(im: Image.Image) -> int:
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


def plan_shrink(p: Pipeline, stored: Size, orientation: int) -> Shrink | None:
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
        return Shrink(index=i, target=target, need=(need[1], need[0]) if swap else need,
                      luma=luma)
    return None


def _exact(size: Size) -> Step:
    return Step(name="resize", params=(("width", size[0]), ("height", size[1]),
                                       ("scale", None), ("upscale", True)))


def output_format(path: str) -> str | None:
    """The encoder an output path's extension names, or None when none does."""
    return OUTPUT_EXTENSIONS.get(os.path.splitext(path)[1].lower())


def encoder_for(path: str, input_path: str) -> str:
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


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A task between ``Processor.prepare`` and ``commit`` (``processor``): its outputs staged
    in temp files, or the failure that ended it."""

    task: Task
    t0: float
    staged: tuple[Staged, ...]
    bytes_in: int
    notes: tuple[str, ...]
    failure: Result | None = None
    spent: float = 0.0  # seconds prepare took (a result's duration leaves out its wait)


class TransformError(Exception):
    """Step ``step`` of a pipeline raised (its cause)."""

    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step


def apply(p: Pipeline, im: Image.Image, shrink: Shrink | None = None) -> Image.Image:
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
            raise TransformError(step.name) from exc
    return im
