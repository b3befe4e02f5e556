"""Test transforms that misbehave on purpose: importable top-level functions, so real worker
processes can run them. Each acts only on images whose top-left pixel is pure magenta (255,0,255)
("poison"), so one batch can mix them with normal images."""

from __future__ import annotations

import os
import signal
import time

from PIL import Image

POISON = (255, 0, 255)


def _poisoned(im: Image.Image) -> bool:
    return im.convert("RGB").getpixel((0, 0)) == POISON


def kill_on_poison(im: Image.Image) -> Image.Image:
    """SIGKILL the worker itself (a segfaulting decoder, the OOM killer)."""
    if _poisoned(im):
        os.kill(os.getpid(), signal.SIGKILL)
    return im


def kill_first_time(im: Image.Image) -> Image.Image:
    """SIGKILL the worker on the first attempt only (a marker file records the attempt)."""
    if _poisoned(im):
        marker = os.environ["WATCHER_TEST_MARKER"]
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    return im


def hang_on_poison(im: Image.Image) -> Image.Image:
    """Sleep far past any test timeout (a decoder stuck in C)."""
    if _poisoned(im):
        time.sleep(600)
    return im


def raise_on_poison(im: Image.Image) -> Image.Image:
    if _poisoned(im):
        raise RuntimeError("poisoned pixel")
    return im


def slow(im: Image.Image) -> Image.Image:
    """Take about a second: used to interrupt a batch while tasks run."""
    time.sleep(float(os.environ.get("WATCHER_TEST_SLOW", "1.0")))
    return im


def in_place_thumbnail(im: Image.Image) -> Image.Image:
    """The classic mistake: Image.thumbnail works in place and returns None."""
    return im.thumbnail((8, 8))  # type: ignore[func-returns-value]


def invert(im: Image.Image) -> Image.Image:
    """A user-defined transform: invert the colours."""
    from PIL import ImageOps

    return ImageOps.invert(im.convert("RGB"))
