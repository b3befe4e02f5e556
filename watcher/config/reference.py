"""docs/configuration.md, generated from the schema: every setting with its table, type,
default, environment variable, flag and help.

    python -m watcher.config.reference > docs/configuration.md
"""

from __future__ import annotations

import sys

from watcher.settings import schema
from watcher.settings.setting import Setting

_INTRO = {
    "engine": "How the pool of worker processes runs (batch and daemon).",
    "input": "What is decoded at all; anything else is refused with its reason.",
    "output": "Which pipelines make outputs, and what happens when an output exists.",
    "watch": "The inbox daemon: its five folders, how arrivals are noticed, retries, metrics.",
    "notify": "Notifications: on each fate chosen, a JSON document (see docs/operations.md, "
              "\"Notifications\") POSTed to `notify_url` and/or piped to `notify_command`, "
              "from a bounded queue drained by a thread of its own, retried with back-off.",
    "ops": "The status page (`/` and `/status`), served by the daemon when turned on; see "
           "docs/operations.md.",
    "pipeline": "How a pipeline's output is encoded: in `[defaults]` (for every pipeline the "
                "file defines; the built-in ones keep theirs) or "
                "in `[pipelines.NAME]` beside its `steps` and `suffix`; `output={...}` in the "
                "Python API; on the command line they override the pipelines' for one batch.",
}


def _default(s: Setting) -> str:
    if s.default_doc:
        return s.default_doc
    v = s.default_value()
    if isinstance(v, tuple):
        return ", ".join(f"`{x}`" for x in v) or "(none)"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    return f"`{v!r}`" if isinstance(v, str) else f"`{v}`"


def _flag(s: Setting) -> str:
    if not s.flag:
        return ""
    commands = "/".join(s.commands or schema.COMMANDS[s.section])
    names = f"`{s.short}` `{s.flag}`" if s.short else f"`{s.flag}`"
    if s.kind == "bool":
        names = f"`{s.flag}` / `--no-{s.flag[2:]}`"
    return f"{names} ({commands})"


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `watcher/settings/schema.py` by "
           "`python -m watcher.config.reference`; do not edit by hand.", "",
           "Settings come from, last one winning: the built-in defaults, the config file "
           "(`--config`, else `$WATCHER_CONFIG`, else `./watcher.toml` if present), the "
           "`WATCHER_*` environment (read by "
           + ", ".join(f"`{c}`" for c in schema.READS_ENVIRONMENT) + "; "
           "an unknown `WATCHER_*` name is refused), then the command line's flags or the "
           "keywords of `process_images` (`[engine]`, `[input]` and `[output]` keys). A bad "
           "value is refused at start naming the file and key, the variable or the flag. "
           "Relative folders in a config file are taken from the file's folder. "
           "`watcher check-config` prints the effective settings as a file that loads back.", "",
           "Pipelines are `[pipelines.NAME]` tables with `steps` (a list of step strings such "
           "as `\"thumbnail(256, 256)\"` or tables such as `{ op = \"resize\", width = 800 }`), "
           "an optional `suffix` and the output options below; `watcher transforms` lists the "
           "steps.", ""]
    for section in schema.SECTIONS:
        title = "`[defaults]` and `[pipelines.NAME]`: output options" if section == "pipeline" \
            else f"`[{section}]`"
        out += [f"## {title}", "", _INTRO[section], "",
                "| key | type | default | environment | flag | what it does |",
                "|---|---|---|---|---|---|"]
        for s in schema.in_section(section):
            name = f"`{s.name}`" + "".join(f" (`{a}`)" for a in s.aliases)
            env = f"`{s.env}`" if s.env else ""
            out.append(f"| {name} | {s.describe()} | {_default(s)} | {env} | {_flag(s)} | "
                       f"{s.help.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
