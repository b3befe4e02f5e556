"""Every setting of watcher, declared once, and the frozen settings types built from them.

One ``Setting`` per key. Adding one here is the whole change: it is read from its TOML table,
its ``WATCHER_*`` variable and its flag, accepted by ``process_images``, printed by
``check-config`` and listed in docs/configuration.md (``python -m watcher.config.reference``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import field, make_dataclass
from typing import Any

from watcher.errors import ConfigError
from watcher.fs import template
from watcher.imaging.formats import DEFAULT_FORMATS, OUTPUT_FORMATS
from watcher.settings.setting import Setting, parse_size

# The TOML tables of settings, in the order the reference lists them; "pipeline" holds the
# output options of a pipeline ([defaults], [pipelines.NAME]).
SECTIONS = ("engine", "input", "output", "watch", "notify", "ops", "pipeline")
# The subcommands whose flags a section's settings get unless a setting names its own.
COMMANDS = {"engine": ("batch", "watch"), "input": ("batch", "watch"),
            "output": ("batch", "watch"), "watch": ("watch",), "notify": ("watch",),
            "ops": ("watch",), "pipeline": ("batch",)}
# WATCHER_* names that are not settings: the config file, the tokens (secrets: never settings,
# so check-config never prints them: the webhook's, the status page's), and test and tooling
# hooks.
OTHER_ENV = ("WATCHER_CONFIG", "WATCHER_NOTIFY_TOKEN", "WATCHER_STATUS_TOKEN")
OTHER_ENV_PREFIXES = ("WATCHER_TEST_", "WATCHER_DEBUG_", "WATCHER_FUZZ_", "WATCHER_DEPLOY_",
                      "WATCHER_SKIP_")

# Names editors, browsers and sync tools give files still being written (dot-files are always
# ignored too).
DEFAULT_IGNORE = ("*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.download",
                  "*.swp", "*.swx", "*~", "~$*", ".~lock*", "*.!ut", "*.filepart", "*.watcher-tmp")


def _workers() -> int:
    return len(os.sched_getaffinity(0))


def _scheduler(value: str, where: str) -> str:
    if value and not re.match(r"^(tcp|tls|inproc|ws|wss)://\S+$", value):
        raise ConfigError(where, f"expected a Dask scheduler address like tcp://HOST:8786, "
                                 f"got {value!r}")
    return value


MAX_WORKER_MEMORY = 2**60  # more than any machine; past 2**63 the address-space limit wraps


def worker_memory(value: Any, where: str) -> int:
    """``max_worker_memory``: a size (``"1.5 GiB"``, bytes) of at least memory.MIN_CAP, or
    ``"auto"`` / 0 for the default."""
    from watcher.imaging import memory  # noqa: PLC0415 - Pillow, only when one is set

    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    n = parse_size(value, where)
    if n > MAX_WORKER_MEMORY:
        raise ConfigError(where, f"must be at most {MAX_WORKER_MEMORY // 2**50} PiB, got {value!r}")
    if n and n < memory.MIN_CAP:
        raise ConfigError(where, f"must be 0 (auto) or at least {memory.mib(memory.MIN_CAP)}, "
                                 f"got {value!r}")
    return n


def _formats(value: tuple[str, ...], where: str) -> tuple[str, ...]:
    from watcher.imaging import codec  # noqa: PLC0415 - Pillow, only when formats are set

    out = []
    for i, v in enumerate(value):
        name = v.upper()
        name = {"JPG": "JPEG", "TIF": "TIFF", "HEIC": "HEIF", "JPEGXL": "JXL", "DNG": "RAW"}.get(
            name, name)
        codec.ensure_formats((name,))  # all ~40 plugins (about 0.1 s) only for a rare one
        if name not in codec.Image.OPEN:
            raise ConfigError(f"{where}[{i}]", f"unknown format {v!r}; known: "
                              + ", ".join(sorted(codec.Image.OPEN)))
        out.append(name)
    return tuple(out)


def _instance(value: str, where: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]*(\{host\}[A-Za-z0-9_.-]*)?", value) or \
            value in (".", ".."):
        raise ConfigError(where, "an instance name is letters, digits, '_', '-', '.' and "
                                 "an optional {host}")
    return value


def _colour(value: str, where: str) -> str:
    from PIL import ImageColor  # noqa: PLC0415

    try:
        ImageColor.getrgb(value)
    except ValueError as exc:
        raise ConfigError(where, f"not a colour: {value!r}") from exc
    return value


# The fates a notification can be sent for ([notify] notify_fates; "all" is every one).
NOTIFY_FATES = ("processed", "quarantined", "retried", "vanished")


def _webhook_url(value: str, where: str) -> str:
    if not value:
        return value
    m = re.fullmatch(r"(?i)(https?)://([^/?#\s]+)([^\s]*)", value)
    if not m:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        got = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ConfigError(where, f"expected an http:// or https:// URL, got {got}")
    return value


def _headers(value: tuple[str, ...], where: str) -> tuple[str, ...]:
    for i, v in enumerate(value):
        name, colon, rest = v.partition(":")
        if not colon or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name) or \
                any(ch in rest for ch in "\r\n"):
            raise ConfigError(f"{where}[{i}]", "expected \"Name: value\" (a header name, a colon, "
                                               "a value on one line)")
    return value


def _notify_fates(value: tuple[str, ...], where: str) -> tuple[str, ...]:
    for i, v in enumerate(value):
        if v not in (*NOTIFY_FATES, "all"):
            raise ConfigError(f"{where}[{i}]", f"expected one of {', '.join(NOTIFY_FATES)}, all; "
                                               f"got {v!r}")
    return value


S = Setting
FOLDER_COMMANDS = ("watch", "requeue", "quarantine")
# The commands that read WATCHER_* (a batch takes its file and flags only).
READS_ENVIRONMENT = ("watch", "requeue", "quarantine", "health", "status", "check-config")
SETTINGS: tuple[Setting, ...] = (
    # -- [engine]: the pool of worker processes ------------------------------------------------
    S(section="engine", name="workers", kind="int", default=_workers, lo=1, hi=1024, short="-j",
      metavar="N",
      default_doc="one per CPU", help="worker processes"),
    S(section="engine", name="timeout", attr="task_timeout", kind="float", default=300.0,
      lo=0.01, metavar="S", help="seconds one input may take before its worker is killed"),
    S(section="engine", name="max_tasks_per_worker", kind="int", default=0, lo=0, hi=10**9,
      metavar="N", help="recycle a worker after this many tasks (0: never)"),
    S(section="engine", name="crash_retries", kind="int", default=1, lo=0, hi=10, metavar="N",
      help="a task whose worker died is tried this many more times"),
    S(section="engine", name="grace", kind="float", default=30.0, lo=0, hi=86400, metavar="S",
      help="on stop (SIGTERM): how long running tasks may take to finish"),
    S(section="engine", name="start_method", kind="choice", default="auto",
      choices=("auto", "fork", "forkserver", "spawn"),
      help="how workers start: auto forks them in a batch that runs no other thread and uses "
           "a forkserver otherwise"),
    S(section="engine", name="executor", kind="choice", default="local",
      choices=("local", "dask", "dask-local"),
      help="where tasks run: this machine's workers, the Dask cluster at scheduler, or a Dask "
           "cluster of workers processes started here"),
    S(section="engine", name="scheduler", kind="str", default="", check=_scheduler,
      allow_empty=True,
      metavar="ADDR", help="the Dask scheduler for executor dask, e.g. tcp://10.0.0.5:8786 "
                           "(given alone, it implies executor dask)"),
    S(section="engine", name="tasks_per_worker", kind="int", default=4, lo=1, hi=1000,
      metavar="N", help="back-pressure: tasks handed to the executor per worker at most"),
    S(section="engine", name="max_worker_memory", kind="size", default=0,
      parse_with=worker_memory, metavar="SIZE", default_doc="auto",
      help="memory one worker may use, e.g. \"1.5 GiB\"; 0 or \"auto\": from the machine's or "
           "the cgroup's memory and the worker count"),
    S(section="engine", name="cluster_wait", kind="float", default=None, lo=0, metavar="S",
      default_doc="batch 300, daemon 0 (for ever)",
      help="seconds an unreachable Dask cluster is waited for, reconnecting, before the inputs "
           "in hand are given up (0: for ever)"),
    # -- [input]: what is decoded --------------------------------------------------------------
    S(section="input", name="formats", kind="list", default=DEFAULT_FORMATS, check=_formats,
      metavar="F,F", help="formats opened (Pillow names; jpg, tif, heic, jpegxl and dng accepted)"),
    S(section="input", name="pixel_limit", kind="int", default=89_478_485, lo=1, metavar="N",
      help="inputs with more pixels are refused as decompression-bomb"),
    S(section="input", name="raw", kind="choice", default="auto",
      choices=("auto", "preview", "demosaic"),
      help="a camera RAW (DNG, CR2, NEF...): its embedded preview (fast), a full demosaic, or "
           "auto: the preview where it is at least as large as every pipeline needs"),
    S(section="input", name="max_file_size", kind="size", default=0, metavar="SIZE",
      help="inputs larger than this are refused as too-large (0: no limit)"),
    # -- [output]: which pipelines, and existing outputs ---------------------------------------
    S(section="output", name="pipelines", attr="use", kind="list", default=("thumbnail",),
      short="-p", flag="--pipeline", metavar="NAME",
      help="the pipelines applied (each makes an output; repeatable)"),
    S(section="output", name="on_conflict", kind="choice", default="skip",
      choices=("skip", "overwrite", "rename"),
      help="an output file already exists: skip the input's output, overwrite it, or rename "
           "the new one (name_2.ext)"),
    # -- [watch]: the inbox daemon -------------------------------------------------------------
    S(section="watch", name="inbox", kind="path", default="inbox", metavar="DIR",
      commands=FOLDER_COMMANDS, help="the folder files are dropped into"),
    S(section="watch", name="output", kind="path", default="processed", metavar="DIR",
      commands=FOLDER_COMMANDS, help="where outputs are written"),
    S(section="watch", name="archive", kind="path", default="archive", metavar="DIR",
      commands=FOLDER_COMMANDS, help="where processed inputs go (on_success = archive)"),
    S(section="watch", name="quarantine", kind="path", default="quarantine", metavar="DIR",
      commands=FOLDER_COMMANDS, help="where bad inputs go, each with a reason"),
    S(section="watch", name="work", kind="path", default="work", metavar="DIR",
      commands=FOLDER_COMMANDS, help="claimed files wait here (same file system as the inbox)"),
    S(section="watch", name="recursive", kind="bool", default=True,
      help="watch the inbox's sub-folders too"),
    S(section="watch", name="observer", kind="choice", default="auto",
      choices=("auto", "inotify", "polling"), help="how arrivals are noticed"),
    S(section="watch", name="poll_interval", kind="float", default=1.0, lo=0.05, hi=3600,
      metavar="S", help="seconds between polls (observer polling)"),
    S(section="watch", name="settle", kind="float", default=2.0, lo=0, hi=3600, metavar="S",
      help="a file unchanged this long is complete (polling, scans, files made in place)"),
    S(section="watch", name="on_success", kind="choice", default="archive",
      choices=("archive", "delete", "keep"), help="what happens to a processed input"),
    S(section="watch", name="reconcile_interval", kind="float", default=30.0, lo=0.5,
      hi=86400, metavar="S", help="seconds between scans that catch a missed event"),
    S(section="watch", name="ignore", kind="list", default=DEFAULT_IGNORE, allow_empty=True,
      metavar="GLOB,GLOB", help="file name patterns never taken (dot-files never are)"),
    S(section="watch", name="max_in_flight", kind="int", default=0, lo=0, hi=1_000_000,
      metavar="N", help="claimed, unfinished files at once (0: 4 per worker)"),
    S(section="watch", name="retry_backoff", kind="float", default=1.0, lo=0.01, hi=3600,
      metavar="S", help="first wait after a failure that is not the input's fault (doubles, "
                        "with jitter)"),
    S(section="watch", name="retry_backoff_max", kind="float", default=300.0, lo=0.01,
      hi=86400, metavar="S", help="the longest wait between such retries"),
    S(section="watch", name="retry_max", kind="int", default=10, lo=0, hi=1000, metavar="N",
      help="tries after failures not the input's fault, then it is quarantined as gave-up"),
    S(section="watch", name="retry_max_age", kind="float", default=3600.0, lo=1,
      hi=30 * 86400, metavar="S", help="seconds after the first such failure to keep trying"),
    S(section="watch", name="duplicates", kind="choice", default="skip",
      choices=("skip", "process"),
      help="an input whose bytes and pipeline configuration were processed before: skip it "
           "(archived as on_success says, with a file.duplicate line naming the earlier "
           "input) or process it again"),
    S(section="watch", name="duplicates_max_age", kind="float", default=90 * 86400.0, lo=60,
      hi=100 * 365 * 86400.0, metavar="S",
      help="seconds a processed input is remembered (older records are pruned)"),
    S(section="watch", name="metrics_port", kind="int", default=0, lo=0, hi=65535,
      metavar="PORT", help="serve /metrics, /healthz, /readyz on this port (0: off)"),
    S(section="watch", name="metrics_host", kind="str", default="127.0.0.1", metavar="ADDR",
      help="the address /metrics is served on"),
    S(section="watch", name="instance", kind="str", default="", allow_empty=True,
      check=_instance, metavar="NAME", commands=FOLDER_COMMANDS,
      help="this daemon's name when several share one inbox ({host}: the host name); it "
           "claims into WORK/NAME"),
    S(section="watch", name="stale_claims_after", kind="float", default=600.0, lo=1,
      hi=30 * 86400, metavar="S", commands=FOLDER_COMMANDS,
      help="claims of another instance whose heartbeat is older go back to the inbox"),
    S(section="watch", name="hard_links", kind="choice", default="quarantine",
      choices=("quarantine", "process"),
      help="an input with other hard links (its data may be a file elsewhere)"),
    # -- [notify]: a JSON document per fate, POSTed to a webhook and/or piped to a command -------
    S(section="notify", name="notify_url", kind="str", default="", allow_empty=True,
      check=_webhook_url, metavar="URL",
      help="POST each fate's JSON document here (http:// or https://; \"\": no webhook)"),
    S(section="notify", name="notify_headers", kind="list", default=(), allow_empty=True,
      check=_headers, metavar="'NAME: VALUE'",
      help="extra HTTP headers of the webhook's POST (the token goes in WATCHER_NOTIFY_TOKEN or "
           "notify_token_file, never here)"),
    S(section="notify", name="notify_token_file", kind="path", default="", allow_empty=True,
      metavar="FILE", default_doc="none",
      help="a file holding the webhook's token, sent as Authorization: Bearer (else "
           "$WATCHER_NOTIFY_TOKEN); never logged"),
    S(section="notify", name="notify_command", kind="list", default=(), allow_empty=True,
      metavar="ARG", help="run this command (argv, no shell) with each document on stdin; "
                          "a non-zero exit is a failed delivery"),
    S(section="notify", name="notify_fates", kind="list", default=("quarantined",),
      check=_notify_fates, metavar="FATE,FATE",
      help="the fates notified: processed, quarantined (gave-up included), retried, "
           "vanished, or all"),
    S(section="notify", name="notify_timeout", kind="float", default=10.0, lo=0.1, hi=3600,
      metavar="S", help="seconds one POST (connect, each read) or command run may take"),
    S(section="notify", name="notify_tries", kind="int", default=5, lo=1, hi=1000, metavar="N",
      help="tries per delivery before its documents are dropped"),
    S(section="notify", name="notify_backoff", kind="float", default=1.0, lo=0.01, hi=3600,
      metavar="S", help="first wait after a failed delivery (doubles each try)"),
    S(section="notify", name="notify_backoff_max", kind="float", default=60.0, lo=0.01,
      hi=86400, metavar="S", help="the longest wait between tries"),
    S(section="notify", name="notify_queue", kind="int", default=1000, lo=1, hi=1_000_000,
      metavar="N", help="documents waiting at most; when full the oldest is dropped"),
    S(section="notify", name="notify_batch", kind="int", default=1, lo=1, hi=10_000,
      metavar="N", help="up to this many documents per POST or run, as a JSON array (1: one "
                        "document, not an array)"),
    S(section="notify", name="notify_batch_delay", kind="float", default=1.0, lo=0, hi=3600,
      metavar="S", help="notify_batch > 1: how long the first document waits for others"),
    S(section="notify", name="notify_flush", kind="float", default=5.0, lo=0, hi=3600,
      metavar="S", help="on stop: seconds to deliver what is queued; the rest is dropped, "
                        "counted"),
    # -- [ops]: what an operator watches and steers the daemon by -----------------------------
    S(section="ops", name="status_page", kind="bool", default=False,
      help="serve the status page (/) and its JSON (/status) beside /metrics, /healthz, /readyz "
           "(giving status_port alone turns it on)"),
    S(section="ops", name="status_port", kind="int", default=8470, lo=0, hi=65535,
      metavar="PORT", help="the status page's port (0: any free one; the heartbeat names it)"),
    S(section="ops", name="status_host", kind="str", default="127.0.0.1", metavar="ADDR",
      help="the status page's address; any but loopback needs a token (WATCHER_STATUS_TOKEN "
           "or status_token_file)"),
    S(section="ops", name="status_token_file", kind="str", default="", allow_empty=True,
      metavar="FILE", help="a file holding the status page's token (its first line)"),
    # -- [defaults] and [pipelines.NAME]: how a pipeline's output is encoded -------------------
    S(section="pipeline", name="format", kind="choice", default="same", env=None,
      choices=("same", *OUTPUT_FORMATS), help="output format (same: the input's)"),
    S(section="pipeline", name="quality", kind="int", default=85, lo=1, hi=100, env=None,
      metavar="1-100", help="JPEG, WebP and AVIF quality"),
    S(section="pipeline", name="metadata", kind="choice", default="strip", env=None,
      choices=("strip", "keep", "copyright"), help="EXIF/XMP kept, stripped or only the "
                                                   "copyright and artist"),
    S(section="pipeline", name="colour", kind="choice", default="srgb", env=None,
      aliases=("color",), choices=("srgb", "keep"),
      help="convert to sRGB (embedded profiles applied) or keep the profile"),
    S(section="pipeline", name="background", kind="str", default="#ffffff", env=None,
      check=_colour, metavar="COLOUR", help="what transparency is flattened onto"),
    S(section="pipeline", name="frames", kind="choice", default="first", env=None,
      choices=("first", "all"), help="animated inputs: the first frame, or all"),
    S(section="pipeline", name="max_frames", kind="int", default=100, lo=1, hi=100_000,
      env=None, metavar="N", help="frames = all: the most frames kept"),
    S(section="pipeline", name="auto_orient", kind="bool", default=True, env=None,
      help="apply the EXIF orientation"),
    S(section="pipeline", name="optimize", kind="bool", default=False, env=None,
      help="spend more time for smaller files"),
    S(section="pipeline", name="progressive", kind="bool", default=False, env=None,
      help="progressive JPEG"),
    S(section="pipeline", name="lossless", kind="bool", default=False, env=None,
      help="lossless WebP/AVIF/HEIF/JPEG XL"),
    S(section="pipeline", name="name_template", kind="str", default="", env=None,
      check=template.check, allow_empty=True, metavar="TEMPLATE",
      help="the output's name below the output folder, from {stem}, {suffix}, {ext} and "
           "{taken:%Y/%m/%d} (EXIF/XMP capture time, else the file's time), e.g. "
           "\"{taken:%Y/%m}/{stem}_{suffix}{ext}\"; empty: {stem}_{suffix}{ext}"),
    # (end of declarations)
)


def in_section(section: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.section == section)


def by_name(section: str) -> dict[str, Setting]:
    """A section's settings by TOML name, aliases included."""
    out = {}
    for s in in_section(section):
        out.update(dict.fromkeys((s.name, *s.aliases), s))
    return out


def _check_unique() -> None:
    for what in ("name", "env", "flag", "attr"):
        seen: dict[Any, Setting] = {}
        for s in SETTINGS:
            value = getattr(s, what) if what != "attr" else (s.section, s.attr)
            if value is not None and value in seen:
                raise ValueError(f"settings {seen[value].key} and {s.key} share {what} {value!r}")
            seen[value] = s


def _dask_needs_scheduler(engine: Any) -> str | None:
    if engine.executor == "dask" and not engine.scheduler:
        return 'executor "dask" needs the scheduler\'s address, e.g. tcp://10.0.0.5:8786'
    return None


# Rules between settings, checked on the effective settings once every layer (file, environment,
# flags) is applied: (section, the key named when broken, the key whose choice broke it, rule).
RULES: tuple[tuple[str, str, str, Callable[[Any], str | None]], ...] = (
    ("engine", "scheduler", "executor", _dask_needs_scheduler),
)


def _instance_name(self: Any) -> str:
    from watcher.fs.files import HOST  # noqa: PLC0415

    return self.instance.replace("{host}", HOST)


def _folders(self: Any) -> dict[str, str]:
    work = os.path.join(self.work, self.instance_name) if self.instance else self.work
    return {"inbox": self.inbox, "output": self.output, "archive": self.archive,
            "quarantine": self.quarantine, "work": work}


def section_type(section: str, name: str, doc: str, **namespace: Any) -> type:
    """A frozen, keyword-only dataclass with one field per setting of ``section``."""
    fields = []
    for s in in_section(section):
        default = field(default_factory=s.default) if callable(s.default) else \
            field(default=s.default)
        fields.append((s.attr, Any, default))
    cls = make_dataclass(name, fields, frozen=True, kw_only=True,
                         namespace={"__doc__": doc, **namespace})
    cls.__module__ = __name__
    return cls


_check_unique()
EngineSettings = section_type("engine", "EngineSettings", "How the pool of workers runs.")
DecodeLimits = section_type("input", "DecodeLimits", "What inputs are decoded at all.")
OutputSettings = section_type("output", "OutputSettings", "Which pipelines; existing outputs.")
WatchSettings = section_type("watch", "WatchSettings", "The inbox daemon's folders and ways.",
                             instance_name=property(_instance_name), folders=_folders)
NotifySettings = section_type("notify", "NotifySettings", "What is sent on each fate, and how.")
OutputOptions = section_type("pipeline", "OutputOptions", "How a pipeline's output is encoded.")
TYPES = {"engine": EngineSettings, "input": DecodeLimits, "output": OutputSettings,
         "watch": WatchSettings, "notify": NotifySettings, "pipeline": OutputOptions}
OpsSettings = section_type("ops", "OpsSettings", "The status page: where, and its token.")
OutputOptions = section_type("pipeline", "OutputOptions", "How a pipeline's output is encoded.")
TYPES = {"engine": EngineSettings, "input": DecodeLimits, "output": OutputSettings,
         "watch": WatchSettings, "ops": OpsSettings, "pipeline": OutputOptions}
