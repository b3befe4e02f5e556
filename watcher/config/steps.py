"""Steps and pipelines from text and callables: ``--ops`` strings, TOML step lists, the API's
transforms, and the built-in pipelines.

A step is a registry name (``grayscale``), a call (``thumbnail(128, 128)``,
``resize(width=800)``) or ``package.module.function(args)`` (a user transform, imported here);
each mistake is refused naming where it is, e.g. ``--ops[thumbnail].width``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from watcher import transforms
from watcher.config.stepsyntax import NAME_SHOWN, read_step
from watcher.engine.mainscript import ByValue, main_importable
from watcher.errors import ConfigError
from watcher.imaging.pipeline import Pipeline, Step
from watcher.settings.schema import OutputOptions


def _steps(*ops: str) -> tuple[Step, ...]:
    return tuple(parse_step(op, "built-in") for op in ops)


def builtin_pipelines() -> dict[str, Pipeline]:
    return {
        "thumbnail": Pipeline(name="thumbnail", steps=_steps("thumbnail(128, 128)"),
                              suffix="thumbnail"),
        "web": Pipeline(name="web", steps=_steps("resize(width=1600, height=1600, upscale=False)"),
                        suffix="web",
                        output=OutputOptions(format="jpeg", quality=82, progressive=True)),
        "processed": Pipeline(name="processed", steps=_steps("grayscale", "resize_half"),
                              suffix="processed"),
    }


# --- steps and --ops strings --------------------------------------------------------------------

_SPLIT = re.compile(r"[|;]")
MAX_NAME = 200  # characters in a step's (dotted) name


def split_ops(text: str) -> list[str]:
    """Split ``"auto_orient, thumbnail(128,128) | blur(1)"`` at separators outside brackets."""
    return [item for item, _ in split_spans(text)]


def split_spans(text: str) -> list[tuple[str, int]]:
    """``split_ops``, each step with where it starts in ``text`` (for a caret under a fault)."""
    items: list[tuple[str, int]] = []
    depth, start, quote = 0, 0, ""
    for i in range(len(text) + 1):
        ch = text[i] if i < len(text) else ""
        if ch and quote:  # a separator inside quoted text separates nothing
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
            continue
        if ch in ("'", '"'):
            quote = ch
        elif ch in ("(", "["):
            depth += 1
        elif ch in (")", "]"):
            depth -= 1
        elif not ch or (depth <= 0 and (ch == "," or _SPLIT.match(ch))):
            piece = text[start:i]
            if piece.strip():
                items.append((piece.strip(), start + len(piece) - len(piece.lstrip())))
            start, depth = i + 1, 0
    return items


def parse_step(text: str, where: str, source: str | None = None, offset: int = 0) -> Step:
    """``"thumbnail(128, 128)"``, ``"resize(width=800)"`` or ``"grayscale"`` -> a bound Step.
    ``source``/``offset``: the whole ``--ops`` text and where this step starts in it."""
    call = read_step(text, where, source, offset)
    return make_step(call.name, call.args, call.kwargs, where)


def parse_ops(text: str, where: str) -> list[Step]:
    """Every step of an ``--ops`` string; a fault is shown in the whole string."""
    return [parse_step(item, where, text, at) for item, at in split_spans(text)]


def make_step(name: str, args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> Step:
    """A registry name, or ``package.module.function`` (a user transform, imported here)."""
    if len(name) > MAX_NAME:  # refused, cut: the name is not repeated whole in the message
        raise ConfigError(where or "step", f"a step name of {len(name)} characters (at most "
                                           f"{MAX_NAME}): {name[:NAME_SHOWN - 1] + '…'!r}")
    if "." in name and name not in transforms.REGISTRY:
        return _imported_step(name, args, kwargs, where)
    spec = transforms.lookup(name, f"{where}[{name}]" if where else name)
    return Step(name=spec.name, params=spec.bind(tuple(args), kwargs, where))


def _imported_step(name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                   where: str) -> Step:
    import importlib  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    where = f"{where}[{name}]" if where else name
    module, _, attr = name.rpartition(".")
    try:
        func = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ConfigError(where, f"cannot import module {module!r}: {exc}") from exc
    except AttributeError as exc:
        raise ConfigError(where, f"module {module!r} has no {attr!r}") from exc
    except Exception as exc:
        raise ConfigError(where, f"importing module {module!r} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
    spec = transforms.spec_for_callable(func)
    if spec is not None:  # a built-in after all: its arguments are checked as the name's are
        return make_step(spec.name, args, kwargs, where.rpartition("[")[0])
    step = step_from_callable(func, where)
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, f"{name}: its parameters cannot be read: {exc}") from exc
    for p in list(sig.parameters.values())[1:]:  # after the image
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ConfigError(where, f"{name}: a transform's parameters after the image must "
                                     f"be named ones (no *args, **kwargs or positional-only "
                                     f"parameters, which a config cannot give back as "
                                     f"written); {p.name!r} is {p.kind.description}")
    for key, value in [*((str(i), v) for i, v in enumerate(args)), *kwargs.items()]:
        _check_plain(value, f"{where}.{key}")
    try:
        bound = sig.bind(None, *args, **kwargs)
    except TypeError as exc:
        raise ConfigError(where, f"bad arguments for {name}: {exc}") from exc
    params = tuple((k, v) for k, v in list(bound.arguments.items())[1:])
    return Step(name=step.name, params=params, func=func)


def _check_plain(value: Any, where: str) -> None:
    """A step's argument is a plain value a config file can write back as it was given: a
    string, a whole or finite number, true/false, or a list of those (no NaN, no dates)."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(where, f"expected a finite number, got {value!r}")
    elif not isinstance(value, (str, int, float, bool)):
        raise ConfigError(where, f"expected a string, number, true/false or a list of them, "
                                 f"got {type(value).__name__} {value!r}")


def step_from_callable(func: Callable[..., Any], where: str) -> Step:
    """A Python callable as a step: built-ins map to their registry entry; others are checked
    to be importable top-level functions, so a worker process can load them."""
    spec = transforms.spec_for_callable(func)
    if spec is not None:
        return Step(name=spec.name, params=spec.bind((), {}, where))
    if isinstance(func, str):
        return parse_step(func, where)
    qual = getattr(func, "__qualname__", "")
    module = getattr(func, "__module__", None)
    hint = ("define it with 'def' at the top level of an importable module (not a lambda, a "
            "nested function or a method), or use a registered name such as 'grayscale'")
    if not callable(func) or not qual or "<" in qual or "." in qual or module is None:
        raise ConfigError(where, f"{func!r} cannot be sent to a worker process: {hint}")
    if module == "__main__" and not main_importable():
        return _by_value(func, qual, where, hint)
    import pickle  # noqa: PLC0415

    try:
        pickle.dumps(func)
    except Exception as exc:
        raise ConfigError(where, f"{qual} cannot be sent to a worker process ({exc}): "
                                 f"{hint}") from exc
    return Step(name=f"{module}.{qual}", func=func)


def _by_value(func: Callable[..., Any], qual: str, where: str, hint: str) -> Step:
    """A function of a ``__main__`` that workers cannot import (a notebook, ``python -c``,
    ``python -``): sent by value with cloudpickle, its code and the globals it uses."""
    import cloudpickle  # noqa: PLC0415

    try:
        cloudpickle.dumps(func)
    except Exception as exc:
        raise ConfigError(where, f"{qual} is defined in {_main_name()} and cannot be sent to a "
                                 f"worker process by value ({type(exc).__name__}: {exc}); "
                                 f"{hint}") from exc
    return Step(name=f"__main__.{qual}", func=ByValue(func))


def _main_name() -> str:
    import __main__  # noqa: PLC0415

    path = getattr(__main__, "__file__", None)
    return "a script read from stdin" if path == "<stdin>" else "an interactive session"


def check_suffix(suffix: Any, where: str) -> str:
    """An output name suffix: letters, digits, '_', '-', '.', '+' (never a path)."""
    if not isinstance(suffix, str) or not re.fullmatch(r"[\w.+-]*", suffix):
        raise ConfigError(where, f"letters, digits, '_', '-', '.', '+' only, got {suffix!r}")
    return suffix


def pipeline_from(items: Sequence[Any], name: str = "processed", suffix: str | None = None,
                  output: OutputOptions | None = None) -> Pipeline:
    """A pipeline from callables, registry names or step strings (the Python API and --ops)."""
    steps: list[Step] = []
    for i, item in enumerate(items):
        where = f"transforms[{i}]"
        if isinstance(item, Step):
            steps.append(item)
        elif isinstance(item, str):
            steps.extend(parse_ops(item, where))
        else:
            steps.append(step_from_callable(item, where))
    if not steps:
        raise ConfigError("transforms", "no transforms given")
    suffix = name if suffix is None else check_suffix(suffix, "suffix")
    return Pipeline(name=name, steps=tuple(steps), suffix=suffix,
                    output=output or OutputOptions())


