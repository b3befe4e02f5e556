"""The quarantine at hand (issue 16): `watcher quarantine list/show`, `requeue` from the
sidecar's own command, `--dry-run` for batch and watch, and samples with a broken file.

Real daemons, real files, the real command in subprocesses; the hostile cases (a sidecar that is
a link, a quarantine sub-folder swapped for a link) on the real file system.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image, run_cli
from tests.test_watch import files
from watcher.samples import picture

pytestmark = pytest.mark.integration


def _broken_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    picture(300, 200).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:-3000])
    return path


def _config(root: Path) -> Path:
    cfg = root / "watcher.toml"
    cfg.write_text('[watch]\ninbox = "in"\noutput = "out"\narchive = "done"\n'
                   'quarantine = "bad"\nwork = "work"\nsettle = 0.3\n'
                   '[output]\npipelines = ["thumbnail"]\n')
    return cfg


def _quarantine_some(root: Path) -> None:
    """A daemon from ``root/watcher.toml`` quarantines three files, one in a sub-folder."""
    for d in ("in", "out", "done", "bad", "work"):
        (root / d).mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "watch", "-c", "watcher.toml",
                             "--log-format", "json"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        (root / "in" / "notes.jpg").write_text("not an image")
        _broken_jpeg(root / "in" / "cut.jpg")
        (root / "in" / "sub").mkdir()
        (root / "in" / "sub" / "empty.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        make_image(root / "in" / "fine.png")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(files(root / "bad")) < 6:
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (root / "done" / "fine.png").exists():
            time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert files(root / "bad") == ["cut.jpg", "cut.jpg.error.json", "notes.jpg",
                                   "notes.jpg.error.json", "sub/empty.png",
                                   "sub/empty.png.error.json"]


def test_quarantine_list_and_show_read_the_daemons_config(tmp_path: Path) -> None:
    _config(tmp_path)
    _quarantine_some(tmp_path)
    r = run_cli("quarantine", "list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "REASON", "AGE", "SIZE", "ERROR"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows == {"cut.jpg": "truncated", "notes.jpg": "not-an-image",
                    "sub/empty.png": rows["sub/empty.png"]}
    assert rows["sub/empty.png"] in ("truncated", "corrupt")
    assert all(len(line) <= 120 for line in lines)
    assert "3 file(s) in the quarantine" in r.stderr and str(tmp_path / "bad") in r.stderr
    # for scripts
    doc = json.loads(run_cli("quarantine", "list", "--json", cwd=tmp_path).stdout)
    assert [e["name"] for e in doc] == ["cut.jpg", "notes.jpg", "sub/empty.png"]
    assert doc[1]["size"] == len("not an image") and doc[1]["age_s"] >= 0
    only = json.loads(run_cli("quarantine", "list", "--json", "--reason", "not-an-image",
                              cwd=tmp_path).stdout)
    assert [e["name"] for e in only] == ["notes.jpg"]
    # one file, by name or by path, from anywhere given the config
    shown = run_cli("quarantine", "show", "cut.jpg", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "reason: truncated" in shown.stdout and "attempts: 1" in shown.stdout
    by_path = run_cli("quarantine", "show", "--json", "-c", str(tmp_path / "watcher.toml"),
                      str(tmp_path / "bad" / "sub" / "empty.png"), cwd="/")
    assert json.loads(by_path.stdout)["name"] == "sub/empty.png"
    missing = run_cli("quarantine", "show", "nope.jpg", cwd=tmp_path)
    assert missing.returncode == 2 and "no such quarantined file" in missing.stderr
    outside = run_cli("quarantine", "show", "../watcher.toml", cwd=tmp_path)
    assert outside.returncode == 2 and "not in the quarantine" in outside.stderr
    usage = run_cli("quarantine", cwd=tmp_path)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_requeue_works_from_the_daemons_folder_and_by_the_sidecars_own_command(
        tmp_path: Path) -> None:
    _config(tmp_path)
    _quarantine_some(tmp_path)
    # in the daemon's folder, a relative path, the config found as watch finds it
    r = run_cli("requeue", "bad/notes.jpg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "in" / "notes.jpg").exists()
    assert not (tmp_path / "bad" / "notes.jpg.error.json").exists()
    # elsewhere, without the config: the command the sidecar gives names the folders
    retry = json.loads((tmp_path / "bad" / "cut.jpg.error.json").read_text())["retry"]
    command = shlex.split(retry.split("or: ", 1)[1])
    assert command[0] == "watcher"
    r = run_cli(*command[1:], cwd="/")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "in" / "cut.jpg").exists() and not (tmp_path / "bad" / "cut.jpg").exists()


def test_a_sidecar_that_is_a_link_or_a_folder_swapped_for_one_is_never_followed(
        tmp_path: Path) -> None:
    q = tmp_path / "bad"
    (q / "x").mkdir(parents=True)
    secret = tmp_path / "secret"
    (secret / "deep").mkdir(parents=True)
    (secret / "deep" / "leak.jpg").write_text("outside")
    (secret / "passwd.json").write_text(json.dumps({"reason": "LEAKED", "error": "LEAKED"}))
    (q / "a.jpg").write_text("quarantined")
    (q / "a.jpg.error.json").symlink_to(secret / "passwd.json")
    (q / "x" / "b.jpg").write_text("quarantined")
    (q / "link").symlink_to(secret / "deep")  # a sub-folder swapped for a link
    (q / "notjson.jpg").write_text("q")
    (q / "notjson.jpg.error.json").write_text("{not json")
    (q / "gone.jpg.error.json").write_text(json.dumps({"reason": "truncated", "error": "e"}))
    r = run_cli("quarantine", "list", "--json", "--quarantine", str(q), "--inbox",
                str(tmp_path / "in"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "LEAKED" not in r.stdout and "leak.jpg" not in r.stdout
    got = {e["name"]: (e["reason"], e["kind"], e["error"]) for e in json.loads(r.stdout)}
    assert got["a.jpg"][0] == "unknown" and "unreadable" in got["a.jpg"][2]
    assert got["notjson.jpg"] == ("unknown", "file", "sidecar is not JSON")
    assert got["gone.jpg"] == ("truncated", "missing", "e")
    assert got["link"][1] == "symbolic link"  # listed as what it is, not entered
    assert set(got) == {"a.jpg", "x/b.jpg", "link", "notjson.jpg", "gone.jpg"}


def _tree(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime)
            for p in folder.rglob("*")}


def test_batch_dry_run_says_what_it_would_do_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_image(src / "a.png")
    make_image(src / "sub" / "b.jpg")
    (src / "text.jpg").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    make_image(out / "a_thumbnail.png")  # exists: skipped (on_conflict = skip)
    before, before_out = _tree(src), _tree(out)
    r = run_cli("batch", str(src), str(tmp_path / "nothing-*.png"), "--out", str(out),
                "--pipeline", "thumbnail", "--dry-run")
    assert r.returncode == 1, r.stderr  # one input would fail
    lines = r.stdout.splitlines()
    assert f"skip     {src / 'a.png'}: every output exists (on_conflict=skip)" in lines
    assert any(x.startswith(f"process  {src / 'sub' / 'b.jpg'} (JPEG") for x in lines)
    assert f"           -> {out / 'sub' / 'b_thumbnail.jpg'}  [thumbnail]" in lines
    assert any(x.startswith(f"fail     {src / 'text.jpg'}: not-an-image") for x in lines)
    assert any(x.startswith("fail     ") and "no file matches" in x for x in lines)
    assert lines[-1] == ("dry run: 1 to process, 1 skipped, 2 would fail; nothing was written")
    assert _tree(src) == before and _tree(out) == before_out
    fresh = tmp_path / "never-made"
    r = run_cli("batch", str(src / "sub"), "--out", str(fresh), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert not fresh.exists()


def test_watch_dry_run_judges_the_inbox_as_the_daemon_would_and_moves_nothing(
        tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    make_image(inbox / "a.png")
    make_image(inbox / "deep" / "b.jpg")
    _broken_jpeg(inbox / "cut.jpg")  # the header is fine: only decoding finds the cut
    (inbox / "text.jpg").write_text("not an image")
    (inbox / "link.jpg").symlink_to("/etc/passwd")
    os.mkfifo(inbox / "fifo.png")
    (inbox / ".hidden.png").write_text("ignored")
    before = _tree(inbox)
    r = run_cli("watch", "--dry-run", "--inbox", str(inbox), "--output", str(tmp_path / "o"),
                "--archive", str(tmp_path / "a"), "--quarantine", str(tmp_path / "q"),
                "--work", str(tmp_path / "w"), "--pipeline", "thumbnail", timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert f"process  a.png (PNG, 0.0 MP, header ok); then archive to {tmp_path / 'a'}" in out
    assert f"           -> {tmp_path / 'o' / 'deep' / 'b_thumbnail.jpg'}  [thumbnail]" in out
    assert any(x.startswith("process  cut.jpg (JPEG") for x in out)
    assert any(x.startswith("quarantine text.jpg: not-an-image") for x in out)
    assert "quarantine link.jpg: symlink: a symbolic link; its target would not be read" in out
    assert "quarantine fifo.png: not-a-file: not a regular file (FIFO)" in out
    assert not any("hidden" in x for x in out)
    assert out[-1] == "dry run: 3 to process, 3 to quarantine; nothing was written or moved"
    assert _tree(inbox) == before
    assert not any((tmp_path / d).exists() for d in ("o", "a", "q", "w"))


def test_samples_hold_one_broken_file_that_a_batch_reports_and_stay_small(
        tmp_path: Path) -> None:
    r = run_cli("make-samples", str(tmp_path / "s"), timeout=180)
    assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert len(made) == 13
    assert r.stdout.startswith("wrote 13 sample image(s), ") and \
        "1 broken on purpose (sample_012.jpg)" in r.stdout
    assert len(r.stdout.splitlines()) == 1  # a summary, not a list
    rep = tmp_path / "r.json"
    b = run_cli("batch", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--report",
                str(rep), timeout=180)
    assert b.returncode == 1
    items = {Path(i["input"]).name: (i["status"], i["reason"])
             for i in json.loads(rep.read_text())["items"]}
    assert items.pop("sample_012.jpg") == ("failed", "truncated")
    assert {s for s, _ in items.values()} == {"ok"} and len(items) == 12
    many = run_cli("make-samples", str(tmp_path / "m"), "-n", "40", "--list", timeout=300)
    assert many.returncode == 0, many.stderr
    assert len(many.stdout.splitlines()) == 41  # the paths, then the summary
    sizes = [p.stat().st_size for p in (tmp_path / "m").iterdir()]
    assert sum(sizes) < 40 * 2_000_000  # sizes cycle: no 5,000-pixel BMPs


def test_make_samples_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: the real command on a real terminal
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "watcher", "make-samples",
                                  str(tmp_path / "s"), "-n", "14"])
    out = b""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    text = out.decode(errors="replace")
    assert "/14 [" in text and "file/s" in text  # tqdm's bar, counting files
    assert "wrote 14 sample image(s)" in text and "1 broken on purpose" in text


def _sidecar(path: Path, reason: str = "not-an-image") -> None:
    Path(str(path) + ".error.json").write_text(json.dumps({"reason": reason, "error": "e"}))


def test_requeue_never_follows_a_link_in_the_inbox_and_goes_on_past_a_bad_one(
        tmp_path: Path) -> None:
    """helper-10: with inbox/sub a link to a folder outside, requeue (and --all) moved the file
    out there, creating folders; --all stopped at the first quarantined link."""
    inbox, q, outside = tmp_path / "in", tmp_path / "q", tmp_path / "outside"
    for d in (inbox, q / "sub", q / "a" / "b", outside):
        d.mkdir(parents=True)
    (inbox / "sub").symlink_to(outside)
    (inbox / "a").symlink_to(outside)
    for rel in ("sub/s.jpg", "a/b/c.jpg", "m.jpg"):
        (q / rel).write_text("x")
        _sidecar(q / rel)
    (q / "m_link.jpg").symlink_to("/etc/passwd")  # the daemon quarantines links as links
    _sidecar(q / "m_link.jpg", "symlink")
    r = run_cli("requeue", "--all", "--inbox", str(inbox), "--quarantine", str(q), cwd="/")
    assert r.returncode == 1, r.stderr
    assert sorted(os.listdir(outside)) == []  # nothing written through the links
    assert (inbox / "m.jpg").read_text() == "x"
    assert os.readlink(inbox / "m_link.jpg") == "/etc/passwd"  # moved back as the link it is
    assert "not requeued" in r.stderr and "sub/s.jpg" in r.stderr and "a/b/c.jpg" in r.stderr
    assert "requeued 2 file(s), 2 not" in r.stderr
    assert (q / "sub" / "s.jpg").exists() and (q / "a" / "b" / "c.jpg").exists()
    assert (q / "sub" / "s.jpg.error.json").exists()  # a file not moved keeps its reason


def test_an_input_named_like_a_sidecar_can_be_shown_and_requeued(tmp_path: Path) -> None:
    inbox, q = tmp_path / "in", tmp_path / "q"
    inbox.mkdir()
    q.mkdir()
    (q / "x.error.json").write_text("an input with an unlucky name")
    _sidecar(q / "x.error.json", "not-an-image")
    folders = ("--inbox", str(inbox), "--quarantine", str(q))
    shown = run_cli("quarantine", "show", "--json", "x.error.json", *folders, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == "x.error.json"
    r = run_cli("requeue", str(q / "x.error.json"), *folders, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (inbox / "x.error.json").read_text() == "an input with an unlucky name"
    assert os.listdir(q) == []


def test_the_sidecars_retry_command_ignores_the_config_where_it_is_run(tmp_path: Path) -> None:
    inbox, q = tmp_path / "in", tmp_path / "q"
    inbox.mkdir()
    q.mkdir()
    (q / "p.jpg").write_text("x")
    _sidecar(q / "p.jpg")
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "watcher.toml").write_text("[watch]\ninbx = 'typo'\n")  # broken, unrelated
    r = run_cli("requeue", "--inbox", str(inbox), "--quarantine", str(q), str(q / "p.jpg"),
                cwd=elsewhere, env={"WATCHER_CONFIG": "/nonexistent", "WATCHER_WORKERS": "abc"})
    assert r.returncode == 0, r.stderr
    assert (inbox / "p.jpg").exists()


def test_watch_dry_run_refuses_folders_the_daemon_refuses(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "in").mkdir()
    for folders, key in (((("--inbox", "afile"),), "watch.inbox"),
                         ((("--inbox", "in"), ("--output", "in")), "")):
        args = [x for pair in folders for x in pair]
        r = run_cli("watch", "--dry-run", *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "config error" in r.stderr and key in r.stderr


def test_hostile_names_never_reach_the_terminal_raw(tmp_path: Path) -> None:
    """helper-10: a name with an escape sequence or a newline cleared the screen, set the
    window title or forged a row of `quarantine list` and `--dry-run`."""
    inbox, q = tmp_path / "in", tmp_path / "q"
    inbox.mkdir()
    q.mkdir()
    evil = "a\x1b[2J\x1b]0;PWNED\x07\nfake.jpg"
    wide = "写真" * 30 + ".jpg"  # 120 columns of CJK
    for name in (evil, wide):
        (q / name).write_text("x")
        _sidecar(q / name)
    make_image(inbox / (evil + ".png"))
    folders = ("--inbox", str(inbox), "--quarantine", str(q))
    listing = run_cli("quarantine", "list", *folders, cwd=tmp_path,
                      env={"COLUMNS": "100"})
    shown = run_cli("quarantine", "show", evil, *folders, cwd=tmp_path)
    dry = run_cli("watch", "--dry-run", *folders, "--output", str(tmp_path / "o"),
                  "--archive", str(tmp_path / "a"), "--work", str(tmp_path / "w"), cwd=tmp_path)
    for r in (listing, shown, dry):
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout
        assert "\\x1b[2J" in r.stdout
    rows = listing.stdout.splitlines()
    assert len(rows) == 3  # the header and one row each: the newline did not forge a row
    from watcher.watch.quarantine import columns
    assert all(columns(row) <= 100 for row in rows), [columns(r) for r in rows]
