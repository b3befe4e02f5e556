"""The one place that chooses an executor: local worker processes, or a Dask cluster (whose
module, and the libraries it needs, is imported only when it is chosen)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from watcher import log
from watcher.engine.executor import Executor
from watcher.engine.supervisor import Engine
from watcher.imaging.pipeline import Pipeline
from watcher.settings.schema import DecodeLimits, EngineSettings


def create_executor(settings: EngineSettings, pipelines: Mapping[str, Pipeline],
                    limits: DecodeLimits, **kw: Any) -> Executor:
    """The executor for ``settings.executor`` ("local", "dask", "dask-local"), not started."""
    if settings.executor == "local":
        return Engine(settings, pipelines, limits, **kw)
    from watcher.engine.cluster import DaskEngine  # noqa: PLC0415 - Dask only when chosen

    executor = DaskEngine(settings, pipelines, limits, **kw)
    log.adopt_stream_handlers()  # distributed's own plain-text handlers: ours render its lines
    return executor
