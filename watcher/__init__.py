"""watcher: a parallel image-processing pipeline, as a batch tool and as an inbox daemon.

    from watcher import process_images
    from watcher.transforms import to_grayscale, resize_half
    report = process_images(["a/image1.jpg", "b/image2.png"], "processed_images/",
                            [to_grayscale, resize_half])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from watcher.errors import ConfigError, ExitCode, RejectedInput, WatcherError

if TYPE_CHECKING:
    from watcher.batch import ItemReport, Report
    from watcher.settings.schema import OutputOptions
else:
    def __getattr__(name: str) -> Any:
        """Lazy exports: a worker process imports watcher.engine.worker without the batch stack."""
        if name in ("ItemReport", "Report"):
            from watcher import batch  # noqa: PLC0415

            return getattr(batch, name)
        if name == "OutputOptions":
            from watcher.settings.schema import OutputOptions  # noqa: PLC0415

            return OutputOptions
        raise AttributeError(name)

__version__ = "0.1.0"
__all__ = ["ConfigError", "ExitCode", "ItemReport", "OutputOptions", "RejectedInput", "Report",
           "WatcherError", "process_images"]

Transform = Callable[..., Any] | str


def process_images(inputs: Iterable[str | os.PathLike[str]], output_dir: str | os.PathLike[str],
                   transforms: Sequence[Transform] | None = None, *,
                   pipeline: str | Sequence[str] | None = None,
                   config: str | os.PathLike[str] | None = None,
                   suffix: str | None = None,
                   output: OutputOptions | Mapping[str, Any] | None = None,
                   progress: bool = False, **settings: Any) -> Report:
    """Apply transforms to every input in parallel worker processes; write results to
    ``output_dir`` as ``{stem}_{suffix}{ext}``; return a report (never raises for a bad image).

    ``transforms``: callables (top-level functions ``Image -> Image``, built-in or your own),
    registry names (``"grayscale"``) or step strings (``"thumbnail(256, 256)"``); the output
    suffix is ``suffix`` or ``"processed"``. Without ``transforms``, the named ``pipeline``(s)
    from ``config`` (or the built-ins) are applied. ``inputs`` may be files, folders or globs.
    ``output``: output options (``{"format": "webp", "quality": 80}``). ``settings``: any
    ``[engine]``, ``[input]`` or ``[output]`` key of docs/configuration.md, e.g. ``workers=4``,
    ``timeout=60``, ``on_conflict="rename"``, ``max_worker_memory="1 GiB"``.
    Raises ``ConfigError`` before any work starts for anything that cannot run (a lambda, an
    unknown transform, a bad parameter).
    """
    from dataclasses import asdict, replace  # noqa: PLC0415

    from watcher.engine.executor import UnguardedMainError  # noqa: PLC0415
    from watcher.engine.mainscript import refuse_in_bootstrap  # noqa: PLC0415

    refuse_in_bootstrap()  # in a worker re-running a script that has no __main__ guard

    from watcher import batch, log  # noqa: PLC0415
    from watcher import config as cfg  # noqa: PLC0415
    from watcher.settings.schema import OutputOptions  # noqa: PLC0415

    if not log.is_configured():
        log.configure("main", "auto", "warning")
    effective = cfg.load(config, **settings)
    # An OutputOptions replaces a pipeline's options (checked as a table would be); a mapping
    # changes only the options it names.
    table = asdict(output) if isinstance(output, OutputOptions) else dict(output or {})
    whole = isinstance(output, OutputOptions)
    cfg.output_options(table, "output")  # refused before anything runs
    if suffix is not None:
        cfg.check_suffix(suffix, "suffix")
    if transforms is not None:
        if pipeline is not None:
            raise ConfigError("pipeline", "give transforms or pipeline, not both")
        pipes = (cfg.pipeline_from(list(transforms), "processed", suffix,
                                   cfg.output_options(table, "output")),)
    else:
        names = [pipeline] if isinstance(pipeline, str) else list(pipeline or ())
        if len(set(names)) != len(names):
            raise ConfigError("pipeline", "a pipeline is named twice")
        pipes = tuple(replace(p, suffix=p.suffix if suffix is None else suffix,
                              output=cfg.output_options(table, "output",
                                                        None if whole else p.output))
                      for p in effective.select(names))
    found, missing = batch.expand(os.fspath(i) for i in inputs)
    try:
        return batch.run(found, os.fspath(output_dir), pipes, effective, progress=progress,
                         failures=missing, log_format=log.resolve_format("auto"))
    except UnguardedMainError as exc:  # the fix is at the caller's line: show that, not ours
        raise UnguardedMainError(str(exc)) from None
