"""Output name templates: ``name_template`` of a pipeline, e.g. ``{taken:%Y/%m/%d}/{stem}{ext}``.

A template is text with four fields: ``{stem}`` (the input's name without its extension),
``{suffix}`` (the pipeline's), ``{ext}`` (the output's extension, with its dot; the template ends
with it, so the extension still names the encoder) and ``{taken:FORMAT}`` (when the photo was
taken: EXIF/XMP DateTimeOriginal, else the file's modification time, formatted with ``strftime``
codes). A ``/`` makes folders below the output folder that mirrors the input's; nothing may
climb out of it (no ``..``, no absolute path). An empty template keeps the plain
``{stem}_{suffix}{ext}``. Checked when the configuration is loaded; standard library only.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from datetime import datetime

from watcher.errors import ConfigError

FIELDS = ("stem", "suffix", "ext", "taken")
_SAMPLE = datetime(2024, 12, 31, 23, 59, 58)


def check(value: str, where: str) -> str:
    """``value`` if it is a valid template, else a ``ConfigError`` naming ``where``."""
    if value == "":
        return value
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ConfigError(where, f"not a valid template: {exc}") from exc
    for literal, field, spec, conversion in parts:
        if "\x00" in literal or "\\" in literal:
            raise ConfigError(where, "a template holds no NUL or backslash")
        if field is None:
            continue
        if field not in FIELDS:
            raise ConfigError(where, f"unknown field {{{field}}}; known: "
                              + ", ".join(f"{{{f}}}" for f in FIELDS))
        if conversion:
            raise ConfigError(where, f"{{{field}!{conversion}}}: no conversions")
        if spec and field != "taken":
            raise ConfigError(where, f"{{{field}:{spec}}}: only {{taken}} takes a format")
        if field == "taken" and spec and "%" not in spec:
            raise ConfigError(where, f"{{taken:{spec}}}: the format is strftime codes, "
                                     "e.g. {taken:%Y/%m/%d}")
    if not value.endswith("{ext}"):
        raise ConfigError(where, "a template ends with {ext} (the extension names the encoder)")
    sample = render(value, stem="photo", suffix="web", ext=".jpg", taken=lambda: _SAMPLE)
    _split(sample, where)
    return value


def uses_taken(value: str) -> bool:
    return any(field == "taken" for _, field, _, _ in string.Formatter().parse(value))


def render(value: str, *, stem: str, suffix: str, ext: str,
           taken: Callable[[], datetime]) -> str:
    """The relative path ``value`` names (``taken`` is only called when the template uses it)."""
    values: dict[str, object] = {"stem": stem, "suffix": suffix, "ext": ext}
    if uses_taken(value):
        values["taken"] = taken()
    return value.format(**values)


def _split(path: str, where: str) -> tuple[list[str], str]:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(where, f"the name {path!r} must stay below the output folder "
                                 "(no leading '/', no empty, '.' or '..' part)")
    return parts[:-1], parts[-1]


def place(folder: str, stem: str, suffix: str, ext: str, value: str,
          taken: Callable[[], datetime]) -> tuple[str, str, str]:
    """(folder, stem, suffix) to name an output with (``naming``): unchanged without a
    template, else the template's folders below ``folder`` and its name (the suffix is then
    part of the name)."""
    if not value:
        return folder, stem, suffix
    path = render(value, stem=stem, suffix=suffix, ext=ext, taken=taken)
    try:
        dirs, name = _split(path, "name_template")
    except ConfigError:  # a stem of its own cannot do this; say what, never climb out
        dirs, name = [], f"{stem}{ext}"
    return os.path.join(folder, *dirs), name[: len(name) - len(ext)], ""
