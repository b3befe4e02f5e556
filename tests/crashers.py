"""Test transforms that misbehave on purpose: importable top-level functions, so real worker
processes can run them. Each acts only on images marked by their top-left pixel (magenta
"poison", or cyan "slow"), so one batch can mix them with normal images. Their knobs are in the
pixels too: workers come from a forkserver started earlier, so the test's environment at the time
of the call does not reach them."""

from __future__ import annotations

import os
import signal
import tempfile
import time

from PIL import Image

POISON = (255, 0, 255)
SLOW = (0, 255, 255)


def _poisoned(im: Image.Image) -> bool:
    return im.convert("RGB").getpixel((0, 0)) == POISON


def kill_on_poison(im: Image.Image) -> Image.Image:
    """SIGKILL the worker itself (a segfaulting decoder, the OOM killer)."""
    if _poisoned(im):
        os.kill(os.getpid(), signal.SIGKILL)
    return im


def marker_path(token: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"watcher-test-marker-{token}")


def poison_image(path: str, token: int = 0) -> None:
    """A poisoned image; ``token`` (0-255) names its marker file for kill_first_time."""
    im = Image.new("RGB", (16, 16), POISON)
    im.putpixel((1, 0), (token, 0, 0))
    im.save(path)


def slow_image(path: str, seconds: float) -> None:
    """An image that ``slow`` holds for ``seconds`` (0.1 s steps, at most 25 s)."""
    im = Image.new("RGB", (16, 16), (120, 120, 120))
    im.putpixel((0, 0), SLOW)
    im.putpixel((1, 0), (round(seconds * 10), 0, 0))
    im.save(path)


def kill_first_time(im: Image.Image) -> Image.Image:
    """SIGKILL the worker on the first attempt only (a marker file records the attempt)."""
    if _poisoned(im):
        marker = marker_path(im.convert("RGB").getpixel((1, 0))[0])
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
    """Hold a "slow" image for the seconds written in it (used to interrupt running tasks)."""
    rgb = im.convert("RGB")
    if rgb.getpixel((0, 0)) == SLOW:
        time.sleep(rgb.getpixel((1, 0))[0] / 10)
    return im


def in_place_thumbnail(im: Image.Image) -> Image.Image:
    """The classic mistake: Image.thumbnail works in place and returns None."""
    return im.thumbnail((8, 8))  # type: ignore[func-returns-value]


def invert(im: Image.Image) -> Image.Image:
    """A user-defined transform: invert the colours."""
    from PIL import ImageOps

    return ImageOps.invert(im.convert("RGB"))


SLOW_DISK = (255, 255, 0)


def slow_disk_image(path: str) -> None:
    """An image that ``slow_disk_once`` turns into a slow disk for its own commit."""
    im = Image.new("RGB", (16, 16), (90, 90, 90))
    im.putpixel((0, 0), SLOW_DISK)
    im.save(path)


def slow_disk_on_marker(im: Image.Image) -> Image.Image:
    """Make this worker's next fsync take 3 s (a slow disk), so that the image's commit is still
    pending in the worker's committer thread while the main thread takes the next task."""
    if im.convert("RGB").getpixel((0, 0)) == SLOW_DISK:
        real = os.fsync

        def slow_fsync(fd: int) -> None:
            os.fsync = real
            time.sleep(3)
            real(fd)

        os.fsync = slow_fsync
    return im


def slow_marked_image(path: str, seconds: float, token: int) -> None:
    """A "slow" image whose start ``slow_marked`` records under ``marker_path(token)``."""
    slow_image(path, seconds)
    with Image.open(path) as src:
        im = src.convert("RGB")
    im.putpixel((2, 0), (token, 0, 0))
    im.save(path)


def slow_marked(im: Image.Image) -> Image.Image:
    """``slow``, after writing a marker file that says this task started (tests wait on it)."""
    rgb = im.convert("RGB")
    if rgb.getpixel((0, 0)) == SLOW:
        token = rgb.getpixel((2, 0))[0]
        with open(f"{marker_path(token)}.started.{os.getpid()}.{time.monotonic_ns()}", "w"):
            pass
    return slow(im)


def started_markers(token: int) -> list[str]:
    folder = tempfile.gettempdir()
    prefix = os.path.basename(marker_path(token)) + ".started."
    return [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(prefix)]


def note_parent(im: Image.Image) -> Image.Image:
    """Record which process runs this worker and its parent: a file named for this worker's pid
    holding its parent's pid, in $WATCHER_TEST_NOTES (a forked worker has the batch's
    environment)."""
    folder = os.environ.get("WATCHER_TEST_NOTES")
    if folder:
        with open(os.path.join(folder, str(os.getpid())), "w") as f:
            f.write(str(os.getppid()))
    return im
