"""The man page watcher(1), written from the real parser: every subcommand with its description
and every option with its help line, grouped as ``--help`` groups them, then the exit codes,
signals, environment and files.

    python -m watcher.manpage > docs/watcher.1      # tests/test_cli_help.py checks it is current
    man docs/watcher.1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from watcher import __version__
from watcher.commandline import EPILOG, WATCH_EPILOG, build_parser
from watcher.settings import schema
from watcher.settings.schema import READS_ENVIRONMENT


def _esc(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line starting with a control dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _help(action: argparse.Action) -> str:
    return (action.help or "").replace("%%", "%")


def _names(action: argparse.Action) -> str:
    """``\\fB\\-j\\fR \\fIN\\fR, \\fB\\-\\-workers\\fR \\fIN\\fR`` as the option's tag."""
    if not action.option_strings:
        return f"\\fI{_esc(str(action.metavar or action.dest))}\\fR"
    if action.nargs == 0:
        return ", ".join(f"\\fB{_esc(o)}\\fR" for o in action.option_strings)
    if action.choices and not action.metavar:
        arg = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        arg = str(action.metavar or action.dest.upper())
    return ", ".join(f"\\fB{_esc(o)}\\fR \\fI{_esc(arg)}\\fR" for o in action.option_strings)


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError("the parser has no subcommands")


def _options(p: argparse.ArgumentParser) -> Iterator[str]:
    for group in p._action_groups:
        actions = [a for a in group._group_actions
                   if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        yield f".PP\n\\fI{_esc(group.title or '')}\\fR"
        for a in actions:
            yield f".TP\n{_names(a)}\n{_esc(_help(a))}"


def _block(text: str) -> str:
    return f".nf\n{_esc(text.rstrip())}\n.fi"


def render() -> str:
    parser = build_parser()
    out = [f'.TH WATCHER 1 "" "watcher {__version__}" "User Commands"', ".ad l", ".nh",
           ".SH NAME", "watcher \\- " + _esc((parser.description or "").rstrip(".").lower()),
           ".SH SYNOPSIS"]
    sub = _subcommands(parser)
    summaries = {a.dest: a.help or "" for a in sub._choices_actions}
    usages = {name: " ".join(p.format_usage().replace("usage: ", "").split())
              for name, p in sub.choices.items()}
    out.append(_block("\n".join(["watcher --help | --version", *usages.values()])))
    out += [".SH DESCRIPTION", _esc(parser.description or ""),
            ".PP", "Every option below, and each setting's default, is also in "
            "\\fBwatcher COMMAND \\-\\-help\\fR.", ".SH COMMANDS"]
    for name, p in sub.choices.items():
        out += [f'.SS "{_esc(name)}"', f"\\fI{_esc(summaries.get(name, ''))}\\fR", ".PP",
                _block(usages[name]), ".PP", _esc(p.description or "")]
        out += list(_options(p))
    out += [".SH EXIT STATUS", _block(EPILOG.split("\n", 1)[1]),
            ".SH SIGNALS", _esc("watch:"),
            _block(WATCH_EPILOG.split("signals:\n", 1)[1].split("\n\n")[0]), ".PP",
            _esc("batch: SIGINT (Ctrl-C) or SIGTERM stops handing out work; running tasks may "
                 "finish within the grace period, the rest are reported cancelled; exit 130 or "
                 "143. A second signal stops at once: running tasks are killed and their temp "
                 "files removed."),
            ".SH ENVIRONMENT",
            _esc("The commands " + ", ".join(READS_ENVIRONMENT) + " read a WATCHER_* variable "
                 "for each setting (a flag wins over the variable, which wins over the config "
                 "file); an unknown WATCHER_* name is refused. A batch reads none."),
            ".TP\n\\fBWATCHER_CONFIG\\fR\n" + _esc("the config file, when -c/--config is not "
                                                 "given")]
    for s in schema.SETTINGS:
        if s.env:
            out.append(f".TP\n\\fB{_esc(s.env)}\\fR\n{_esc(s.key + ': ' + s.help)}")
    out += [".SH FILES", ".TP\n\\fI./watcher.toml\\fR\n" + _esc(
        "the config file read when no other is named; every key is in docs/configuration.md"),
            ".SH SEE ALSO", _esc("docs/cli.md, docs/operations.md, docs/configuration.md and "
                                 "docs/api.md in the watcher source; watcher transforms.")]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
