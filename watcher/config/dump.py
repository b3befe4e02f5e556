"""The effective settings as a ``watcher.toml`` (``watcher check-config``): every section key
and every pipeline, written so that loading the text back gives the same settings."""

from __future__ import annotations

import json
import os
from typing import Any

from watcher.config.loader import _FIELD, Settings
from watcher.imaging.pipeline import Step
from watcher.settings import schema


def value(v: Any) -> str:
    """One TOML value: a string, number, boolean or list of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):  # JSON's escapes are TOML's; DEL must be escaped too in TOML
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, tuple | list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def step_text(step: Step) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in step.params if v is not None)
    return f"{step.name}({args})" if args else step.name


def to_toml(s: Settings) -> str:
    lines = [f"# effective settings of {s.source} (environment included)"]
    for section, attr in _FIELD.items():
        lines.append(f"\n[{section}]")
        obj = getattr(s, attr)
        for setting in schema.in_section(section):
            v = getattr(obj, setting.attr)
            if v is None:
                lines.append(f"# {setting.name}: not set ({setting.default_doc or 'default'})")
                continue
            if setting.kind == "path" and v:
                v = os.path.abspath(v)
            lines.append(f"{setting.name} = {value(v)}")
    for name, p in s.pipelines.items():
        lines.append(f"\n[pipelines.{json.dumps(name)}]")
        lines.append(f"suffix = {value(p.suffix)}")
        lines.append(f"steps = {value([step_text(st) for st in p.steps])}")
        for setting in schema.in_section("pipeline"):
            lines.append(f"{setting.name} = {value(getattr(p.output, setting.attr))}")
    return "\n".join(lines) + "\n"
