"""Transforms for the benchmark (importable by dotted path: scripts/ is on PYTHONPATH there)."""

from __future__ import annotations

import time

from PIL import Image


def burn(im: Image.Image, seconds: float = 1.0) -> Image.Image:
    """Spend ``seconds`` of CPU time (job C: the seed's 100 tasks of ~1 s CPU each)."""
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        for i in range(2000):
            x = (x * 31 + i) % 1_000_003
    return im
