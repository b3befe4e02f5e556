"""Pillow's modules for watcher, each loaded on its first use (``importlib.util.LazyLoader``).

The supervisor of a batch or the daemon plans paths and pipelines and never touches pixels: it
need not pay for Pillow and its codecs (about 80 ms of every command's start-up). A worker loads
the default formats' plugins (``load_plugins``) before its first image: a forked batch worker
itself, in parallel with its siblings; the forkserver once, before any worker exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import PIL  # the package itself is a few lines
from PIL import UnidentifiedImageError

from watcher.imaging.formats import DEFAULT_FORMATS, DEFAULT_PLUGINS, EXTERNAL


def _lazy(name: str) -> ModuleType:
    """``name`` (a Pillow module), executed when one of its attributes is first used."""
    full = f"PIL.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec(full)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken Pillow install
        return importlib.import_module(full)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    setattr(PIL, name, module)
    return module


Image = _lazy("Image")
ImageCms = _lazy("ImageCms")
ImageColor = _lazy("ImageColor")
ImageEnhance = _lazy("ImageEnhance")
ImageFilter = _lazy("ImageFilter")
ImageOps = _lazy("ImageOps")


_loaded = False


def load_plugins() -> None:
    """Import Pillow and the default formats' plugins now (a worker, before its first image).

    Only those: all ~40 would cost a worker's start-up ~30 ms; ``codec.ensure_formats`` loads
    the rest when a configuration allows another format."""
    global _loaded
    if _loaded:
        return
    for name in ("Image", "ImageCms", "ImageColor", "ImageOps", *DEFAULT_PLUGINS):
        # reading any attribute of a lazy module executes it
        getattr(importlib.import_module(f"PIL.{name}"), "__name__", None)
    register_external(DEFAULT_FORMATS)
    _loaded = True


_registered: set[str] = set()


def register_external(formats: tuple[str, ...]) -> None:
    """Register with Pillow the plugins of ``formats`` that come from another library
    (``formats.EXTERNAL``: HEIF from pillow-heif, JXL and RAW through watcher's own plugin
    modules), each once."""
    for fmt in formats:
        target = EXTERNAL.get(fmt)
        if target is None or fmt in _registered:
            continue
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)()
        _registered.add(fmt)


__all__ = [
    "Image",
    "ImageCms",
    "ImageColor",
    "ImageEnhance",
    "ImageFilter",
    "ImageOps",
    "UnidentifiedImageError",
    "load_plugins",
    "register_external",
]
