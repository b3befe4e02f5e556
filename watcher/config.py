"""Frozen settings: built-in pipelines, ``watcher.toml``, ``--ops`` strings, validated once.

Every mistake is refused at load with the file, pipeline, step and key named, e.g.
``watcher.toml: pipelines.web.steps[1][resize].width: expected int, got str '800px'``.
"""

from __future__ import annotations

import ast
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from watcher import transforms
from watcher.errors import ConfigError
from watcher.imaging import codec
from watcher.imaging.codec import DecodeLimits, OutputOptions
from watcher.imaging.formats import OUTPUT_FORMATS
from watcher.imaging.pipeline import Pipeline, Step
from watcher.transforms import join

CONFLICT_POLICIES = ("skip", "overwrite", "rename")
START_METHODS = ("auto", "fork", "forkserver", "spawn")


@dataclass(frozen=True)
class EngineSettings:
    """How the pool of worker processes runs."""

    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    task_timeout: float = 300.0  # seconds one input may take before its worker is killed
    max_tasks_per_worker: int = 0  # recycle a worker after this many tasks (0: never)
    crash_retries: int = 1  # a task whose worker died is tried this many more times
    grace: float = 30.0  # on stop: how long running tasks may take to finish
    # How worker processes start: "auto" forks them from a batch that runs no other thread (the
    # quickest start) and uses a forkserver otherwise and in watch mode (the observer's threads
    # make a plain fork unsafe); "fork", "forkserver" or "spawn" ask for one.
    start_method: str = "auto"
    # Where tasks run: "local" (this machine's worker processes), "dask" (the Dask scheduler at
    # ``scheduler``), or "dask-local" (a Dask LocalCluster of ``workers`` processes started here).
    executor: str = "local"
    scheduler: str = ""  # tcp://HOST:8786 for executor = "dask"
    tasks_per_worker: int = 4  # back-pressure: tasks handed to the executor per worker at most
    # Bytes one worker process may use (see watcher.imaging.memory); 0: derived from the memory this
    # service may use (the machine's or its cgroup's limit, less a reserve) and ``workers``.
    max_worker_memory: int = 0
    # Seconds a Dask cluster that cannot be reached (its scheduler gone, or no worker left) is
    # waited for, reconnecting with back-off, before the inputs in hand are given up; 0: for
    # ever. None: the mode's default (a batch 300 s, the daemon for ever).
    cluster_wait: float | None = None

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError("executor", f"expected one of {', '.join(EXECUTORS)}, got "
                                          f"{self.executor!r}")
        if self.executor == "dask" and not self.scheduler:
            raise ConfigError("scheduler", 'executor "dask" needs the scheduler\'s address, '
                                           "e.g. tcp://10.0.0.5:8786")


EXECUTORS = ("local", "dask", "dask-local")


# Names editors, browsers and sync tools give files still being written (dot-files are always
# ignored too).
DEFAULT_IGNORE = ("*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.download",
                  "*.swp", "*.swx", "*~", "~$*", ".~lock*", "*.!ut", "*.filepart", "*.watcher-tmp")


@dataclass(frozen=True)
class WatchSettings:
    """The inbox daemon: folders, how arrivals are noticed, what happens to processed inputs."""

    inbox: str = "inbox"
    output: str = "processed"
    archive: str = "archive"
    quarantine: str = "quarantine"
    work: str = "work"  # claimed files wait here; same file system as the inbox
    recursive: bool = True
    observer: str = "auto"  # auto | inotify | polling
    poll_interval: float = 1.0
    settle: float = 2.0  # unchanged this long = complete (polling, scans, files created in place)
    on_success: str = "archive"  # archive | delete | keep
    reconcile_interval: float = 30.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    max_in_flight: int = 0  # claimed, unfinished files at once (0: 4 per worker)
    retry_backoff: float = 1.0  # first wait after a transient failure (doubles, with jitter)
    retry_backoff_max: float = 300.0
    # A failure that is not the input's fault is retried at most this many times, and no
    # longer than this many seconds after the first; then the input is quarantined "gave-up".
    retry_max: int = 10
    retry_max_age: float = 3600.0
    metrics_port: int = 0  # 0: no HTTP endpoint
    metrics_host: str = "127.0.0.1"
    # Several daemons on one inbox (a shared folder): each names itself ("{host}" is this
    # machine's name) and claims into work/<instance>; "" is a daemon alone on its inbox.
    instance: str = ""
    # Claims of another instance whose heartbeat is older than this go back to the inbox.
    stale_claims_after: float = 600.0
    # An input with other hard links (its data may be a file elsewhere): quarantine | process
    hard_links: str = "quarantine"

    @property
    def instance_name(self) -> str:
        from watcher.fs.files import HOST  # noqa: PLC0415

        return self.instance.replace("{host}", HOST)

    def folders(self) -> dict[str, str]:
        work = os.path.join(self.work, self.instance_name) if self.instance else self.work
        return {"inbox": self.inbox, "output": self.output, "archive": self.archive,
                "quarantine": self.quarantine, "work": work}


# key: (type, lowest, highest, choices) -- shared by [watch], WATCHER_* variables and flags
WATCH_KEYS: dict[str, tuple[type, float | None, float | None, tuple[str, ...] | None]] = {
    "inbox": (str, None, None, None), "output": (str, None, None, None),
    "archive": (str, None, None, None), "quarantine": (str, None, None, None),
    "work": (str, None, None, None), "recursive": (bool, None, None, None),
    "observer": (str, None, None, ("auto", "inotify", "polling")),
    "poll_interval": (float, 0.05, 3600, None), "settle": (float, 0.0, 3600, None),
    "on_success": (str, None, None, ("archive", "delete", "keep")),
    "reconcile_interval": (float, 0.5, 86400, None), "ignore": (list, None, None, None),
    "max_in_flight": (int, 0, 1_000_000, None), "retry_backoff": (float, 0.01, 3600, None),
    "retry_backoff_max": (float, 0.01, 86400, None),
    "retry_max": (int, 0, 1000, None), "retry_max_age": (float, 1.0, 30 * 86400, None),
    "metrics_port": (int, 0, 65535, None), "metrics_host": (str, None, None, None),
    "instance": (str, None, None, None), "stale_claims_after": (float, 1.0, 30 * 86400, None),
    "hard_links": (str, None, None, ("quarantine", "process")),
}


@dataclass(frozen=True)
class Settings:
    pipelines: Mapping[str, Pipeline]
    use: tuple[str, ...]  # the pipelines applied when none is named
    engine: EngineSettings = field(default_factory=EngineSettings)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    on_conflict: str = "skip"
    source: str = "<built-in>"
    watch: WatchSettings = field(default_factory=WatchSettings)

    def select(self, names: Sequence[str]) -> tuple[Pipeline, ...]:
        out = []
        for name in names or self.use:
            if name not in self.pipelines:
                raise ConfigError(f"pipeline {name!r}", "no such pipeline; defined: "
                                  + ", ".join(sorted(self.pipelines)))
            out.append(self.pipelines[name])
        return tuple(out)


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


def default_settings() -> Settings:
    p = builtin_pipelines()
    return Settings(MappingProxyType(p), ("thumbnail",))


# --- steps and --ops strings --------------------------------------------------------------------

_SPLIT = re.compile(r"[|;]")


def split_ops(text: str) -> list[str]:
    """Split ``"auto_orient, thumbnail(128,128) | blur(1)"`` at separators outside brackets."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if depth == 0 and (ch == "," or _SPLIT.match(ch)):
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur).strip())
    return [i for i in items if i]


def parse_step(text: str, where: str) -> Step:
    """``"thumbnail(128, 128)"``, ``"resize(width=800)"`` or ``"grayscale"`` -> a bound Step."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ConfigError(where, f"cannot parse step {text!r}: {exc.msg}") from exc
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if isinstance(node, ast.Call):
        func = node.func
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError as exc:
            raise ConfigError(where, f"step {text!r}: arguments must be literals") from exc
        node = func
    name = _dotted(node)
    if name is None:
        raise ConfigError(where, f"step {text!r}: expected NAME, NAME(args) or "
                                 "package.module.function(args)")
    return make_step(name, args, kwargs, where)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def make_step(name: str, args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> Step:
    """A registry name, or ``package.module.function`` (a user transform, imported here)."""
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
    step = step_from_callable(func, where)
    if step.func is None:
        return step  # it was a built-in after all
    try:
        bound = inspect.signature(func).bind(None, *args, **kwargs)
    except TypeError as exc:
        raise ConfigError(where, f"bad arguments for {name}: {exc}") from exc
    params = tuple((k, v) for k, v in list(bound.arguments.items())[1:])
    return Step(name=step.name, params=params, func=func)


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
    if module == "__main__":
        import __main__  # noqa: PLC0415

        if not getattr(__main__, "__file__", None):
            raise ConfigError(where, f"{qual} is defined in an interactive session, which worker "
                                     f"processes cannot import: {hint}")
    import pickle  # noqa: PLC0415

    try:
        pickle.dumps(func)
    except Exception as exc:
        raise ConfigError(where, f"{qual} cannot be sent to a worker process ({exc}): "
                                 f"{hint}") from exc
    return Step(name=f"{module}.{qual}", func=func)


def pipeline_from(items: Sequence[Any], name: str = "processed", suffix: str | None = None,
                  output: OutputOptions | None = None) -> Pipeline:
    """A pipeline from callables, registry names or step strings (the Python API and --ops)."""
    steps: list[Step] = []
    for i, item in enumerate(items):
        where = f"transforms[{i}]"
        if isinstance(item, Step):
            steps.append(item)
        elif isinstance(item, str):
            steps.extend(parse_step(s, where) for s in split_ops(item))
        else:
            steps.append(step_from_callable(item, where))
    if not steps:
        raise ConfigError("transforms", "no transforms given")
    return Pipeline(name=name, steps=tuple(steps), suffix=name if suffix is None else suffix,
                    output=output or OutputOptions())


# --- watcher.toml -------------------------------------------------------------------------------

_OUTPUT_KEYS = {f.name for f in fields(OutputOptions)}
_CHOICES = {"format": ("same", *OUTPUT_FORMATS), "metadata": ("strip", "keep", "copyright"),
            "colour": ("srgb", "keep"), "frames": ("first", "all")}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


def parse_size(value: Any, where: str) -> int:
    """Bytes from an int or a string like ``"200 MB"`` / ``"1GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(where, f"expected a size such as 50000000 or \"50 MB\", got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def worker_memory(value: Any, where: str) -> int:
    """``max_worker_memory``: a size (``"1.5 GiB"``, bytes) of at least memory.MIN_CAP, or
    ``"auto"`` / 0 for the default."""
    from watcher.imaging import memory  # noqa: PLC0415

    if value == "auto":
        return 0
    n = parse_size(value, where)
    if n and n < memory.MIN_CAP:
        raise ConfigError(where, f"must be 0 (auto) or at least {memory.mib(memory.MIN_CAP)}, "
                                 f"got {value!r}")
    return n


def _typed(value: Any, kind: type, where: str, lo: float | None = None,
           hi: float | None = None) -> Any:
    """Check one scalar setting; ``where`` is its full location."""
    return transforms.Param(name="", kind=kind, min=lo, max=hi).check(value, where)


def _reject_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(join(where, key), "unknown key; known: " + ", ".join(sorted(known)))


def output_options(table: Mapping[str, Any], where: str,
                   base: OutputOptions | None = None) -> OutputOptions:
    base = base or OutputOptions()
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _OUTPUT_KEYS:
            continue
        w = join(where, key)
        if key in _CHOICES:
            v = value.lower() if isinstance(value, str) else value
            if v not in _CHOICES[key]:
                raise ConfigError(w, f"expected one of {', '.join(_CHOICES[key])}, got {value!r}")
            values[key] = v
        elif key == "quality":
            values[key] = _typed(value, int, w, 1, 100)
        elif key == "max_frames":
            values[key] = _typed(value, int, w, 1, 100_000)
        elif key == "background":
            values[key] = _typed(value, str, w)
            try:
                from PIL import ImageColor  # noqa: PLC0415

                ImageColor.getrgb(value)
            except ValueError as exc:
                raise ConfigError(w, f"not a colour: {value!r}") from exc
        else:
            values[key] = _typed(value, bool, w)
    return replace(base, **values)


def _pipeline(name: str, table: Any, where: str, defaults: OutputOptions) -> Pipeline:
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a table")
    _reject_unknown(table, {"steps", "suffix", *_OUTPUT_KEYS}, where)
    raw = table.get("steps")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.steps", "expected a non-empty list of steps")
    steps: list[Step] = []
    for i, item in enumerate(raw):
        w = f"{where}.steps[{i}]"
        if isinstance(item, str):
            parts = split_ops(item)
            if len(parts) != 1:
                raise ConfigError(w, f"one step per list item, got {item!r}")
            steps.append(parse_step(parts[0], w))
        elif isinstance(item, dict):
            op = item.get("op")
            if not isinstance(op, str):
                raise ConfigError(f"{w}.op", "each step table needs op = \"name\"")
            steps.append(make_step(op, (), {k: v for k, v in item.items() if k != "op"}, w))
        else:
            raise ConfigError(w, f"expected a string or a table, got {type(item).__name__}")
    suffix = table.get("suffix", name)
    if not isinstance(suffix, str) or not re.fullmatch(r"[\w.+-]*", suffix):
        raise ConfigError(f"{where}.suffix", f"letters, digits, '_', '-', '.', '+' only, "
                                             f"got {suffix!r}")
    return Pipeline(name=name, steps=tuple(steps), suffix=suffix,
                    output=output_options(table, where, defaults))


def load(path: str | os.PathLike[str] | None, **overrides: Any) -> Settings:
    """Settings from a TOML file (or the built-ins), with keyword overrides applied last."""
    settings = default_settings() if path is None else parse(_read(str(path)), str(path))
    return apply_overrides(settings, **overrides)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(path, "config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from exc


def parse(doc: Mapping[str, Any], name: str = "watcher.toml") -> Settings:
    def where(key: str) -> str:
        return f"{name}: {key}"

    _reject_unknown(doc, {"pipelines", "defaults", "engine", "input", "output", "watch"},
                    f"{name}:")
    defaults = output_options(_table(doc, "defaults", where), where("defaults"))
    _reject_unknown(_table(doc, "defaults", where), _OUTPUT_KEYS, where("defaults"))
    pipelines = builtin_pipelines()
    for pname, ptable in _table(doc, "pipelines", where).items():
        if not re.fullmatch(r"[A-Za-z0-9_][\w.-]*", pname):
            raise ConfigError(where(f"pipelines.{pname}"), "pipeline names are letters, digits, "
                                                           "'_', '-' and '.'")
        pipelines[pname] = _pipeline(pname, ptable, where(f"pipelines.{pname}"), defaults)

    eng = _table(doc, "engine", where)
    _reject_unknown(eng, {"workers", "timeout", "max_tasks_per_worker", "crash_retries", "grace",
                          "start_method", "executor", "scheduler", "tasks_per_worker",
                          "max_worker_memory", "cluster_wait"},
                    where("engine"))
    engine = EngineSettings()
    e: dict[str, Any] = {}
    if "workers" in eng:
        e["workers"] = _typed(eng["workers"], int, where("engine.workers"), 1, 1024)
    if "timeout" in eng:
        e["task_timeout"] = _typed(eng["timeout"], float, where("engine.timeout"), 0.01)
    if "max_tasks_per_worker" in eng:
        e["max_tasks_per_worker"] = _typed(eng["max_tasks_per_worker"], int,
                                           where("engine.max_tasks_per_worker"), 0)
    if "crash_retries" in eng:
        e["crash_retries"] = _typed(eng["crash_retries"], int, where("engine.crash_retries"), 0,
                                    10)
    if "grace" in eng:
        e["grace"] = _typed(eng["grace"], float, where("engine.grace"), 0.0)
    if "cluster_wait" in eng:
        e["cluster_wait"] = _typed(eng["cluster_wait"], float, where("engine.cluster_wait"),
                                   0.0)
    if "start_method" in eng:
        if eng["start_method"] not in START_METHODS:
            raise ConfigError(where("engine.start_method"),
                              f"expected one of {', '.join(START_METHODS)}")
        e["start_method"] = eng["start_method"]
    if "executor" in eng:
        if eng["executor"] not in EXECUTORS:
            raise ConfigError(where("engine.executor"), f"expected one of {', '.join(EXECUTORS)}")
        e["executor"] = eng["executor"]
    if "scheduler" in eng:
        e["scheduler"] = _scheduler(eng["scheduler"], where("engine.scheduler"))
    if "tasks_per_worker" in eng:
        e["tasks_per_worker"] = _typed(eng["tasks_per_worker"], int,
                                       where("engine.tasks_per_worker"), 1, 1000)
    if "max_worker_memory" in eng:
        e["max_worker_memory"] = worker_memory(eng["max_worker_memory"],
                                               where("engine.max_worker_memory"))
    try:
        engine = replace(engine, **e)
    except ConfigError as exc:
        raise ConfigError(where(f"engine.{exc.where}"), exc.message) from None

    inp = _table(doc, "input", where)
    _reject_unknown(inp, {"formats", "pixel_limit", "max_file_size"}, where("input"))
    limits = DecodeLimits()
    if "formats" in inp:
        limits = replace(limits, formats=_formats(inp["formats"], where("input.formats")))
    if "pixel_limit" in inp:
        limits = replace(limits, pixel_limit=_typed(inp["pixel_limit"], int,
                                                    where("input.pixel_limit"), 1))
    if "max_file_size" in inp:
        limits = replace(limits, max_file_size=parse_size(inp["max_file_size"],
                                                          where("input.max_file_size")))

    out = _table(doc, "output", where)
    _reject_unknown(out, {"pipelines", "on_conflict"}, where("output"))
    use = out.get("pipelines", ["thumbnail"])
    if isinstance(use, str):
        use = [use]
    if not isinstance(use, list) or not all(isinstance(u, str) for u in use) or not use:
        raise ConfigError(where("output.pipelines"), "expected a list of pipeline names")
    for i, u in enumerate(use):
        if u not in pipelines:
            raise ConfigError(where(f"output.pipelines[{i}]"),
                              f"no pipeline {u!r}; defined: {', '.join(sorted(pipelines))}")
    conflict = out.get("on_conflict", "skip")
    if conflict not in CONFLICT_POLICIES:
        raise ConfigError(where("output.on_conflict"),
                          f"expected one of {', '.join(CONFLICT_POLICIES)}, got {conflict!r}")
    watch = _table(doc, "watch", where)
    _reject_unknown(watch, set(WATCH_KEYS), where("watch"))
    base = os.path.dirname(os.path.abspath(name)) if os.path.isfile(name) else None
    ws = watch_settings(WatchSettings(), {k: (v, where(f"watch.{k}")) for k, v in watch.items()},
                        base)
    return Settings(MappingProxyType(pipelines), tuple(use), engine, limits, conflict, name, ws)


def watch_value(key: str, value: Any, where: str) -> Any:
    """Check one [watch] value (from the file, a WATCHER_* variable or a flag)."""
    kind, lo, hi, choices = WATCH_KEYS[key]
    if kind is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(where, "expected a list of file name patterns")
        return tuple(value)
    if kind is bool and isinstance(value, str):
        low = value.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError(where, f"expected true or false, got {value!r}")
        value = low in ("1", "true", "yes", "on")
    elif kind in (int, float) and isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise ConfigError(where, f"expected a number, got {value!r}") from None
    value = transforms.Param(name="", kind=kind, min=lo, max=hi).check(value, where)
    if choices and value not in choices:
        raise ConfigError(where, f"expected one of {', '.join(choices)}, got {value!r}")
    if kind is str and not choices and not value.strip():
        raise ConfigError(where, "must not be empty")
    return value


def watch_settings(ws: WatchSettings, values: Mapping[str, tuple[Any, str]],
                   base: str | None = None) -> WatchSettings:
    """``ws`` with ``values`` (key -> (value, where)) applied; relative folders from a config file
    are taken from the file's folder (``base``)."""
    changes = {}
    for key, (value, where) in values.items():
        v = watch_value(key, value, where)
        if key == "instance" and not re.fullmatch(r"[A-Za-z0-9_.-]*(\{host\}[A-Za-z0-9_.-]*)?",
                                                  v):
            raise ConfigError(where, "an instance name is letters, digits, '_', '-', '.' and "
                                     "an optional {host}")
        if key in ("inbox", "output", "archive", "quarantine", "work") and base:
            v = os.path.join(base, v)
        changes[key] = v
    return replace(ws, **changes)


ENV_PREFIX = "WATCHER_"
# WATCHER_* variables for the engine and input limits (the [watch] keys are WATCHER_<KEY>).
ENV_OTHER = {"WORKERS": "workers", "TIMEOUT": "timeout", "MAX_TASKS_PER_WORKER":
             "max_tasks_per_worker", "PIXEL_LIMIT": "pixel_limit", "MAX_FILE_SIZE":
             "max_file_size", "GRACE": "grace", "EXECUTOR": "executor",
             "SCHEDULER": "scheduler", "MAX_WORKER_MEMORY": "max_worker_memory",
             "CLUSTER_WAIT": "cluster_wait"}


def from_environment(s: Settings, env: Mapping[str, str]) -> Settings:
    """Apply WATCHER_* variables (for containers): [watch] keys, engine and input limits, and
    WATCHER_PIPELINES (comma-separated names)."""
    watch = {k: (env[ENV_PREFIX + k.upper()], ENV_PREFIX + k.upper()) for k in WATCH_KEYS
             if ENV_PREFIX + k.upper() in env}
    s = replace(s, watch=watch_settings(s.watch, watch))
    other: dict[str, Any] = {}
    for var, key in ENV_OTHER.items():
        raw = env.get(ENV_PREFIX + var)
        if raw is None:
            continue
        name = ENV_PREFIX + var
        if key == "max_file_size":
            other[key] = parse_size(raw, name)
            continue
        if key == "max_worker_memory":
            other[key] = worker_memory(raw.strip(), name)
            continue
        if key in ("executor", "scheduler"):
            other[key] = raw.strip()
            continue
        kind = float if key in ("timeout", "grace", "cluster_wait") else int
        try:
            other[key] = kind(raw.strip())
        except ValueError:
            raise ConfigError(name, f"expected a number, got {raw!r}") from None
        transforms.Param(name="", kind=kind, min=0).check(other[key], name)
    if other:
        try:
            s = apply_overrides(s, **other)
        except ConfigError as exc:
            var = next(v for v, k in ENV_OTHER.items() if exc.where.endswith(k))
            raise ConfigError(ENV_PREFIX + var, exc.message) from None
    if ENV_PREFIX + "PIPELINES" in env:
        names = tuple(n.strip() for n in env[ENV_PREFIX + "PIPELINES"].split(",") if n.strip())
        for n in names:
            if n not in s.pipelines:
                raise ConfigError(ENV_PREFIX + "PIPELINES", f"no pipeline {n!r}; defined: "
                                  + ", ".join(sorted(s.pipelines)))
        if not names:
            raise ConfigError(ENV_PREFIX + "PIPELINES", "no pipeline named")
        s = replace(s, use=names)
    return s


def _formats(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(where, "expected a non-empty list of format names")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ConfigError(f"{where}[{i}]", f"expected a format name, got {v!r}")
        name = v.upper()
        name = {"JPG": "JPEG", "TIF": "TIFF"}.get(name, name)
        codec.ensure_formats((name,))  # all ~40 plugins (about 0.1 s) only for a rare one
        if name not in codec.Image.OPEN:
            known = set(codec.Image.OPEN)
            raise ConfigError(f"{where}[{i}]", f"unknown format {v!r}; known: "
                              + ", ".join(sorted(known)))
        out.append(name)
    return tuple(out)


def _scheduler(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.match(r"^(tcp|tls|inproc|ws|wss)://\S+$", value):
        raise ConfigError(where, f"expected a Dask scheduler address like tcp://HOST:8786, "
                                 f"got {value!r}")
    return value


def _table(doc: Mapping[str, Any], key: str, where: Callable[[str], str]) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(where(key), "expected a table")
    return value


def apply_overrides(s: Settings, *, workers: int | None = None, timeout: float | None = None,
                    on_conflict: str | None = None, max_tasks_per_worker: int | None = None,
                    grace: float | None = None, pixel_limit: int | None = None,
                    max_file_size: int | None = None, start_method: str | None = None,
                    executor: str | None = None, scheduler: str | None = None,
                    max_worker_memory: int | str | None = None,
                    cluster_wait: float | None = None) -> Settings:
    engine, limits = s.engine, s.limits
    if cluster_wait is not None:
        engine = replace(engine, cluster_wait=_typed(cluster_wait, float, "cluster_wait", 0.0))
    if max_worker_memory is not None:
        engine = replace(engine, max_worker_memory=worker_memory(max_worker_memory,
                                                                 "max_worker_memory"))
    if executor is not None or scheduler is not None:
        if executor is not None and executor not in EXECUTORS:
            raise ConfigError("executor", f"expected one of {', '.join(EXECUTORS)}")
        engine = replace(engine, executor=executor or ("dask" if scheduler else engine.executor),
                         scheduler=_scheduler(scheduler, "scheduler") if scheduler is not None
                         else engine.scheduler)
    if workers is not None:
        engine = replace(engine, workers=_typed(workers, int, "workers", 1, 1024))
    if timeout is not None:
        engine = replace(engine, task_timeout=_typed(timeout, float, "timeout", 0.01))
    if max_tasks_per_worker is not None:
        engine = replace(engine, max_tasks_per_worker=max_tasks_per_worker)
    if grace is not None:
        engine = replace(engine, grace=_typed(grace, float, "grace", 0.0))
    if start_method is not None:
        if start_method not in START_METHODS:
            raise ConfigError("start_method", f"expected one of {', '.join(START_METHODS)}")
        engine = replace(engine, start_method=start_method)
    if pixel_limit is not None:
        limits = replace(limits, pixel_limit=_typed(pixel_limit, int, "pixel_limit", 1))
    if max_file_size is not None:
        limits = replace(limits, max_file_size=max_file_size)
    if on_conflict is not None:
        if on_conflict not in CONFLICT_POLICIES:
            raise ConfigError("on_conflict", f"expected one of {', '.join(CONFLICT_POLICIES)}")
        s = replace(s, on_conflict=on_conflict)
    return replace(s, engine=engine, limits=limits)
