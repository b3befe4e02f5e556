"""Configuration: the effective settings of a run, from the one schema.

``loader`` layers the built-ins, ``watcher.toml``, ``WATCHER_*`` and keywords; ``steps`` turns
step strings and callables into pipelines; ``flags`` makes the command line's setting flags;
``dump`` prints the settings as TOML (``check-config``); ``reference`` writes
docs/configuration.md. The settings themselves are declared in ``watcher.settings.schema``.
"""

from watcher.config.loader import (
    Settings,
    apply_overrides,
    default_settings,
    from_environment,
    load,
    output_options,
    parse,
)
from watcher.config.steps import (
    builtin_pipelines,
    check_suffix,
    parse_ops,
    parse_step,
    pipeline_from,
    split_ops,
    step_from_callable,
)
from watcher.settings.schema import (
    DEFAULT_IGNORE,
    DecodeLimits,
    EngineSettings,
    OutputOptions,
    WatchSettings,
)
from watcher.settings.setting import parse_size

__all__ = ["DEFAULT_IGNORE", "DecodeLimits", "EngineSettings", "OutputOptions", "Settings",
           "WatchSettings", "apply_overrides", "builtin_pipelines", "check_suffix",
           "default_settings", "from_environment", "load", "output_options", "parse",
           "parse_ops", "parse_size", "parse_step", "pipeline_from", "split_ops",
           "step_from_callable"]
