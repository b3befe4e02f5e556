"""The command's help, man page and shell completion, all from the one real parser: every
subcommand and option has help (the walker is itself shown to catch one without), the help says
what each command really does on SIGTERM, the man page in docs/ is current and renders, and
bash completes a subcommand, an option and a choice, in a real bash on a real terminal."""

from __future__ import annotations

import argparse
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import shtab

from tests.conftest import ROOT, run_cli
from watcher import commandline, manpage
from watcher.cli import build_parser


def missing_help(parser: argparse.ArgumentParser, prog: str = "watcher") -> list[str]:
    """Every option, positional and subcommand of ``parser`` (recursively) without help."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if not action.help:
                out.append(f"{prog} COMMAND")
            summaries = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not summaries.get(name):
                    out.append(f"{prog} {name} (no summary)")
                if not sub.description:
                    out.append(f"{prog} {name} (no description)")
                out += missing_help(sub, f"{prog} {name}")
        elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            out.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    return out


def test_every_option_and_subcommand_of_the_real_parser_has_help() -> None:
    assert missing_help(build_parser()) == []


def test_the_walker_finds_what_has_no_help() -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--fine", help="has help")
    parser.add_argument("--bare")
    sub = parser.add_subparsers(dest="cmd")
    quiet = sub.add_parser("quiet")
    quiet.add_argument("thing")
    sub.add_parser("told", help="told", description="told")
    assert missing_help(parser, "x") == ["x --bare", "x COMMAND", "x quiet (no summary)",
                                         "x quiet (no description)", "x quiet thing"]


def test_watch_help_lists_every_option_with_a_line_and_tells_the_sigterm_exit() -> None:
    proc = run_cli("watch", "--help")
    assert proc.returncode == 0
    for flag in ("--inbox DIR", "--output DIR", "-p NAME, --pipeline NAME", "-j N, --workers N",
                 "--observer", "--max-in-flight N", "--log-level"):
        assert flag in proc.stdout, flag
    assert "exit 0" in proc.stdout and "SIGTERM" in proc.stdout
    top = run_cli("--help").stdout
    assert "watch: stopped by SIGTERM or SIGINT after draining" in top
    assert "batch: interrupted by SIGINT (Ctrl-C); 143 by SIGTERM" in top
    for name in ("requeue", "health", "check-config", "transforms", "make-samples"):
        sub = run_cli(name, "--help")
        assert sub.returncode == 0
        description = sub.stdout.split("\n\n")[1]
        assert description.strip() and not description.startswith(("options", "positional"))


def test_the_file_and_folder_markers_are_shtabs() -> None:
    for ours, theirs in ((commandline.FILE, shtab.FILE),
                         (commandline.DIRECTORY, shtab.DIRECTORY)):
        assert {shell: theirs[shell] for shell in ours} == ours


def test_the_man_page_in_docs_is_current() -> None:
    current = (ROOT / "docs" / "watcher.1").read_text()
    assert current == manpage.render(), (
        "docs/watcher.1 is stale: python -m watcher.manpage > docs/watcher.1")


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_the_man_page_renders_every_command_and_option() -> None:
    proc = subprocess.run(["man", "-l", str(ROOT / "docs" / "watcher.1")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MANWIDTH": "100",
                                                      "MANPAGER": "cat", "PAGER": "cat"},
                          check=False)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("WATCHER(1)")
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"\n   {name}\n" in text, name
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, (name, option)
    assert "EXIT STATUS" in text and "WATCHER_WORKERS" in text


def completion_script(tmp_path: Path, shell: str) -> Path:
    proc = run_cli("completion", shell)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"watcher.{shell}"
    path.write_text(proc.stdout)
    return path


def complete(script: Path, *words: str, cwd: Path | None = None) -> list[str]:
    """What bash's completion for ``watcher`` offers for the command line ``words`` (the last
    one being typed), run the way bash runs it: the function ``complete -p`` names, with
    COMP_WORDS and COMP_CWORD set."""
    line = " ".join(words)
    program = f"""
source {script}
spec=$(complete -p watcher) || exit 9
func=$(sed -E 's/.* -F ([^ ]+) .*/\\1/' <<< "$spec")
COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE='{line}'
COMP_POINT={len(line)}
"$func" watcher '{words[-1]}' '{words[-2]}'
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True,
                          text=True, timeout=30, check=False, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.integration
def test_bash_completes_subcommands_options_choices_and_folders(tmp_path: Path) -> None:
    script = completion_script(tmp_path, "bash")
    assert complete(script, "watcher", "ba") == ["batch"]
    assert complete(script, "watcher", "c") == ["check-config", "completion"]
    assert complete(script, "watcher", "batch", "--on-c") == ["--on-conflict"]
    assert complete(script, "watcher", "batch", "--on-conflict", "") == ["skip", "overwrite",
                                                                          "rename"]
    assert "--max-in-flight" in complete(script, "watcher", "watch", "--max-")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photo.jpg").write_bytes(b"")
    assert complete(script, "watcher", "batch", "-o", "pho", cwd=tmp_path) == ["photos"]
    assert complete(script, "watcher", "batch", "pho", cwd=tmp_path) == ["photo.jpg", "photos"]


@pytest.mark.integration
def test_tab_in_an_interactive_bash_on_a_terminal_completes_the_subcommand(
        tmp_path: Path) -> None:
    script = completion_script(tmp_path, "bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "watcher").write_text(f"#!/bin/sh\nexec {sys.executable} -m watcher \"$@\"\n")
    (bin_dir / "watcher").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "dumb",
           "PS1": "$ ", "PYTHONPATH": str(ROOT), "INPUTRC": "/dev/null"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: a real interactive bash on the pty
        os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
    out = b""

    def read_until(needle: bytes, timeout: float = 20) -> bytes:
        nonlocal out
        deadline = time.monotonic() + timeout
        while needle not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return out

    try:
        os.write(fd, f"source {script}; echo sourced-$((6*7))\n".encode())
        assert b"sourced-42" in read_until(b"sourced-42"), out
        out = b""
        os.write(fd, b"watcher make-s\t")
        assert b"watcher make-samples " in read_until(b"make-samples "), out
        os.write(fd, b"\x15exit\n")  # Ctrl-U clears the line
    finally:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_the_zsh_script_is_a_compdef_for_watcher(tmp_path: Path) -> None:
    text = completion_script(tmp_path, "zsh").read_text()
    assert text.startswith("#compdef watcher")
    assert "make-samples" in text and "--on-conflict" in text
    if shutil.which("zsh"):
        proc = subprocess.run(["zsh", "-n", str(tmp_path / "watcher.zsh")], capture_output=True,
                              text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr


def test_a_shell_that_has_no_script_is_a_usage_error() -> None:
    proc = run_cli("completion", "fish")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: watcher completion")
