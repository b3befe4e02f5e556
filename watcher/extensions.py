"""Output extensions: which file extension each output of an input gets, in batch and watch mode
alike (the rest of its name is ``watcher.fs.naming``'s).

A pipeline that names a format gets that format's extension; with format "same" an output keeps
the input's extension when it is a known image extension, else the one of the format its header
says (no pixels decoded), else its own (or ".png"). ``place`` applies a pipeline's
``name_template`` (``watcher.fs.template``), reading the capture time only when it is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from watcher.fs import template
from watcher.imaging import formats
from watcher.imaging.pil import Image, register_external
from watcher.settings.schema import OutputOptions


def output_ext(opts: OutputOptions, path: str, allowed: Sequence[str]) -> str:
    if opts.format != "same":
        return formats.OUTPUTS[formats.OUTPUT_FORMATS[opts.format]].extension
    ext = os.path.splitext(path)[1]
    if ext.lower() in formats.OUTPUT_EXTENSIONS:
        return ext
    read_only = formats.READ_ONLY_EXTENSIONS.get(ext.lower())
    if read_only is not None:  # a camera's RAW: written as the format it reads as (JPEG)
        return formats.extension(read_only) or ".png"
    register_external(tuple(allowed))
    limit = Image.MAX_IMAGE_PIXELS
    try:  # an unusual or missing extension: ask the header (no pixels are decoded, so no
        Image.MAX_IMAGE_PIXELS = None  # pixel limit: the worker applies the run's own)
        with Image.open(path, formats=allowed) as im:
            return formats.extension(im.format or "") or ".png"
    except Exception:  # noqa: BLE001 - the worker will report what is wrong with it
        return ext or ".png"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def place(opts: OutputOptions, folder: str, stem: str, suffix: str, ext: str, path: str,
          allowed: Sequence[str]) -> tuple[str, str, str]:
    """(folder, stem, suffix) of an output of the input at ``path``, after the pipeline's
    ``name_template``; its ``{taken}`` is the input's capture time."""
    from watcher.imaging.taken import capture_time  # noqa: PLC0415 - only with {taken}

    return template.place(folder, stem, suffix, ext, opts.name_template,
                          lambda: capture_time(path, allowed))
