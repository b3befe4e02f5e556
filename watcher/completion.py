"""Shell completion for ``watcher``: bash and zsh scripts made from the real parser by shtab.

shtab writes a static script (subcommands, options, choices, and files or folders where an
argument names one), so pressing TAB runs no Python at all, unlike argcomplete, which starts the
program (and imports watcher) on every TAB and needs a hook in it. The script is made from the
installed version's parser by ``watcher completion bash|zsh``, so it matches the flags that the
settings schema gives this version.
"""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash: the function ``_shtab_watcher``)."""
    import shtab  # noqa: PLC0415 - only this command needs it

    if shell not in SHELLS:
        raise ValueError(f"no completion for {shell!r}; known: {', '.join(SHELLS)}")
    text = shtab.complete(parser, shell=shell)
    return text if text.endswith("\n") else text + "\n"
