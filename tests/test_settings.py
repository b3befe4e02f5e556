"""One schema for every setting: each surface (TOML, WATCHER_*, flags, the API, check-config,
the reference) is derived from it, so a key added there appears everywhere, with one range and
one message, and typos are refused with a "did you mean"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from watcher import config, process_images
from watcher.config import dump, reference
from watcher.errors import ConfigError
from watcher.settings import schema
from watcher.settings.setting import ENV_PREFIX

NEW = ('    S(section="engine", name="example_knob", kind="int", default=3, lo=0, hi=9, '
       'metavar="N",\n      help="a knob added by a test"),\n')
MARKER = "    # (end of declarations)\n"

CHECK_NEW = textwrap.dedent("""
    import io, os, subprocess, sys, tomllib
    from contextlib import redirect_stdout
    from watcher import cli, config, process_images
    from watcher.config import reference
    from watcher.errors import ConfigError

    # TOML
    open("w.toml", "w").write("[engine]\\nexample_knob = 5\\n")
    assert config.load("w.toml").engine.example_knob == 5
    open("bad.toml", "w").write("[engine]\\nexample_knob = 10\\n")
    try:
        config.load("bad.toml")
        raise SystemExit("TOML: 10 accepted")
    except ConfigError as exc:
        assert exc.where.endswith("engine.example_knob") and "<= 9" in exc.message, exc
    # environment
    s = config.from_environment(config.load(None), {"WATCHER_EXAMPLE_KNOB": "6"})
    assert s.engine.example_knob == 6
    # flags, on both subcommands, and their help
    args = cli.build_parser().parse_args(["watch", "--example-knob", "7"])
    assert cli.watch_loader(args)().engine.example_knob == 7
    proc = subprocess.run([sys.executable, "-m", "watcher", "batch", "x", "-o", "o",
                           "--example-knob", "12"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--example-knob: must be <= 9" in proc.stderr, proc.stderr
    help = subprocess.run([sys.executable, "-m", "watcher", "batch", "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "--example-knob N" in help.stdout and "a knob added by a test" in help.stdout
    # the API
    assert config.load(None, example_knob=8).engine.example_knob == 8
    try:
        process_images([], "out", ["grayscale"], example_knob=-1)
        raise SystemExit("API: -1 accepted")
    except ConfigError as exc:
        assert exc.where == "example_knob" and ">= 0" in exc.message, exc
    # check-config prints it, and its text loads back
    out = subprocess.run([sys.executable, "-m", "watcher", "check-config", "-c", "w.toml"],
                         capture_output=True, text=True, check=True).stdout
    assert tomllib.loads(out)["engine"]["example_knob"] == 5
    open("back.toml", "w").write(out)
    assert config.load("back.toml").engine.example_knob == 5
    # the reference
    text = reference.render()
    assert "| `example_knob` | int 0-9 | `3` | `WATCHER_EXAMPLE_KNOB` | `--example-knob`" in text
    print("ok")
""")


@pytest.mark.integration
def test_a_setting_added_to_the_schema_reaches_every_surface(tmp_path: Path) -> None:
    """The one edit: a declaration appended to the schema of a copy of the package."""
    shutil.copytree(ROOT / "watcher", tmp_path / "pkg" / "watcher",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "pkg" / "watcher" / "settings" / "schema.py"
    text = path.read_text()
    assert text.count(MARKER) == 1
    path.write_text(text.replace(MARKER, NEW + MARKER))
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-c", CHECK_NEW], cwd=tmp_path / "run",
                          capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "pkg")})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr + proc.stdout


def test_the_generated_reference_is_current() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == reference.render(), (
        "docs/configuration.md is stale: python -m watcher.config.reference > "
        "docs/configuration.md")


def test_every_setting_has_one_variable_one_flag_and_a_reference_row() -> None:
    text = reference.render()
    for s in schema.SETTINGS:
        assert f"| `{s.name}`" in text
        assert s.flag, s.key
        if s.section != "pipeline":
            assert s.env == ENV_PREFIX + s.name.upper(), s.key


# --- the drifts of the four hand-written checkers, each gone ------------------------------------

def test_a_negative_max_tasks_per_worker_is_refused_by_every_surface(tmp_path: Path) -> None:
    for cmd in (["batch", "x.png", "-o", "o"], ["watch"]):
        proc = run_cli(*cmd, "--max-tasks-per-worker", "-1", cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("usage: watcher"), proc.stderr
        assert "--max-tasks-per-worker: must be >= 0, got -1" in proc.stderr
    (tmp_path / "w.toml").write_text("[engine]\nmax_tasks_per_worker = -1\n")
    with pytest.raises(ConfigError, match="must be >= 0, got -1"):
        config.load(tmp_path / "w.toml")
    with pytest.raises(ConfigError, match=r"WATCHER_MAX_TASKS_PER_WORKER: must be >= 0"):
        config.from_environment(config.load(None), {"WATCHER_MAX_TASKS_PER_WORKER": "-1"})
    with pytest.raises(ConfigError, match="must be >= 0"):
        config.load(None, max_tasks_per_worker=-1)


def test_a_typo_in_the_apis_output_options_or_keywords_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"output\.qualty: unknown output option; did you mean "
                                          r"'quality'\?"):
        process_images([], tmp_path / "o", ["grayscale"], output={"qualty": 90})
    with pytest.raises(ConfigError, match=r"workrs: unknown setting; did you mean 'workers'"):
        process_images([], tmp_path / "o", ["grayscale"], workrs=2)
    assert not (tmp_path / "o").exists()


def test_an_unknown_watcher_variable_is_refused_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigError) as e:
        config.from_environment(config.load(None), {"WATCHER_WOKERS": "3"})
    assert e.value.where == "WATCHER_WOKERS"
    assert "did you mean 'WATCHER_WORKERS'" in e.value.message
    # names that are not settings: the config file, test and tooling hooks
    config.from_environment(config.load(None), {"WATCHER_CONFIG": "x.toml",
                                                "WATCHER_TEST_TAG": "t", "PATH": "/bin"})


@pytest.mark.parametrize("value", ["-3", "0"])
def test_workers_has_one_range_wherever_it_is_given(value: str) -> None:
    with pytest.raises(ConfigError, match=f"WATCHER_WORKERS: must be >= 1, got {value}"):
        config.from_environment(config.load(None), {"WATCHER_WORKERS": value})


def test_a_boolean_in_a_file_is_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"watch\.recursive: expected true or false"):
        config.parse({"watch": {"recursive": "yes"}})
    s = config.from_environment(config.load(None), {"WATCHER_RECURSIVE": "no"})
    assert s.watch.recursive is False  # text, from a variable, may say yes/no


def test_color_is_colour() -> None:
    s = config.parse({"pipelines": {"a": {"steps": ["grayscale"], "color": "keep"}}})
    assert s.pipelines["a"].output.colour == "keep"
    assert config.output_options({"color": "keep"}, "output").colour == "keep"


def test_an_unknown_table_or_key_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="did you mean 'output'"):
        config.parse({"outptu": {}})
    with pytest.raises(ConfigError, match="did you mean 'settle'"):
        config.parse({"watch": {"setle": 2}})


def _absolute(watch: object) -> object:
    """Folders as a reader of the printed file gets them: relative ones from the cwd."""
    paths = {s.attr: os.path.abspath(getattr(watch, s.attr)) for s in schema.in_section("watch")
             if s.kind == "path"}
    return replace(watch, **paths)  # type: ignore[type-var]


def test_check_config_prints_a_file_that_loads_back_as_the_same_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.toml").write_text(textwrap.dedent("""
        [defaults]
        quality = 70
        [engine]
        workers = 3
        timeout = 12.5
        executor = "dask"
        scheduler = "tcp://10.0.0.5:8786"
        cluster_wait = 20
        max_worker_memory = "1 GiB"
        [input]
        formats = ["jpg", "png"]
        max_file_size = "20 MB"
        [output]
        pipelines = ["t", "web"]
        on_conflict = "rename"
        [watch]
        inbox = "in box"
        ignore = []
        instance = "{host}-2"
        recursive = false
        [pipelines.t]
        suffix = "t"
        steps = ["auto_orient", "thumbnail(256, 256)", { op = "resize", width = 90 }]
        format = "webp"
        color = "keep"
    """))
    env = {"WATCHER_SETTLE": "0.5", "WATCHER_PIPELINES": "t"}
    proc = run_cli("check-config", "-c", "w.toml", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "back.toml").write_text(proc.stdout)  # elsewhere: folders are absolute
    first = config.from_environment(config.load(tmp_path / "w.toml"), env)
    again = config.load(tmp_path / "sub" / "back.toml")
    for part in ("engine", "limits", "output"):
        assert getattr(again, part) == getattr(first, part), part
    assert again.watch == _absolute(first.watch)
    assert again.watch.inbox == str(tmp_path / "in box")  # from the file's folder
    assert dict(again.pipelines) == dict(first.pipelines)
    assert again.watch.settle == 0.5 and again.use == ("t",)
    assert dump.to_toml(again).splitlines()[1:] == dump.to_toml(first).splitlines()[1:]
    assert tomllib.loads(proc.stdout)["pipelines"]["t"]["colour"] == "keep"


# --- what an attacker found (helper-17), each refused or accepted the same way everywhere -------

def test_a_whole_number_setting_takes_whole_numbers_only_wherever_given() -> None:
    with pytest.raises(ConfigError, match=r"engine\.workers: expected int, got float 3\.0"):
        config.parse({"engine": {"workers": 3.0}})
    with pytest.raises(ConfigError, match="WATCHER_WORKERS: expected a whole number"):
        config.from_environment(config.load(None), {"WATCHER_WORKERS": "3.0"})


@pytest.mark.parametrize("big", [10**400, "9" * 400], ids=["toml", "text"])
def test_a_number_too_large_is_a_config_error_not_a_traceback(big: object) -> None:
    for section, key in (("engine", "workers"), ("engine", "timeout"), ("watch", "settle")):
        with pytest.raises(ConfigError) as e:
            if isinstance(big, str):
                config.from_environment(config.load(None), {f"WATCHER_{key.upper()}": big})
            else:
                config.parse({section: {key: big}})
        assert len(e.value.message) < 120


def test_a_toml_integer_of_thousands_of_digits_is_not_valid_toml(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text("[engine]\nworkers = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(tmp_path / "w.toml")


def test_a_rule_between_settings_sees_every_layer(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text('[engine]\nexecutor = "dask"\n')
    s = config.from_environment(config.load(tmp_path / "w.toml", final=False),
                                {"WATCHER_SCHEDULER": "tcp://10.0.0.5:8786"})
    assert (s.engine.executor, s.engine.scheduler) == ("dask", "tcp://10.0.0.5:8786")
    with pytest.raises(ConfigError) as e:  # nobody gave one: named as the file names it
        config.from_environment(config.load(tmp_path / "w.toml", final=False), {})
    assert e.value.where == f"{tmp_path / 'w.toml'}: engine.scheduler"
    proc = run_cli("watch", "-c", "w.toml", cwd=tmp_path,
                   env={"WATCHER_SCHEDULER": "tcp://127.0.0.1:1", "WATCHER_CLUSTER_WAIT": "0.1",
                        "WATCHER_INBOX": "never-made/x"}, timeout=60)
    assert "needs the scheduler" not in proc.stderr


def test_an_empty_scheduler_implies_nothing() -> None:
    s = config.parse({"engine": {"scheduler": ""}})
    assert s.engine.executor == "local"
    s = config.from_environment(config.load(None), {"WATCHER_SCHEDULER": ""})
    assert s.engine.executor == "local"


def test_text_is_taken_as_given_from_a_file_or_a_variable() -> None:
    with pytest.raises(ConfigError, match="like tcp://HOST:8786"):
        config.parse({"engine": {"scheduler": " tcp://a:1 "}})
    with pytest.raises(ConfigError, match="like tcp://HOST:8786"):
        config.from_environment(config.load(None), {"WATCHER_SCHEDULER": " tcp://a:1 "})
    assert config.parse({"engine": {"max_worker_memory": " auto "}}).engine.max_worker_memory == 0


def test_more_attacks_are_refused_with_the_key_named(tmp_path: Path) -> None:
    bad = [({"watch": {"archive": "a\x00b"}}, "watch.archive"),
           ({"watch": {"instance": ".."}}, "watch.instance"),
           ({"output": {"pipelines": ["web", "web"]}}, "output.pipelines[1]"),
           ({"engine": {"max_worker_memory": "9000000 TiB"}}, "engine.max_worker_memory"),
           ({"pipelines": {"a": {"steps": [{"op": "blur", "radius": float("nan")}]}}},
            "pipelines.a.steps[0][blur].radius"),
           ({"pipelines": {"a": {"steps": ["watcher.transforms.blur(radius=-9)"]}}},
            "pipelines.a.steps[0][blur].radius"),
           ({"pipelines": {"a": {"steps": ["grayscale"], "color": "keep", "colour": "srgb"}}},
            "pipelines.a.colour"),
           ({"pipelines": {"a": {"steps": ["grayscale"], "sufix": "x"}}}, "pipelines.a.sufix")]
    for doc, where in bad:
        with pytest.raises(ConfigError) as e:
            config.parse(doc, "w.toml")
        assert e.value.where == f"w.toml: {where}", (doc, e.value)
    with pytest.raises(ConfigError, match=r"WATCHER_FORMATS\[0\]"):
        config.from_environment(config.load(None), {"WATCHER_FORMATS": ",png"})
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        config.from_environment(config.load(None), {"WATCHER_INBOX": "in\udcffbox"})
    with pytest.raises(ConfigError, match="did you mean 'suffix'"):
        config.parse({"pipelines": {"a": {"steps": ["grayscale"], "sufix": "x"}}})
    step = config.parse_step("watcher.transforms.blur(radius=3)", "--ops")
    assert step.name == "blur" and dict(step.params)["radius"] == 3
    (tmp_path / "boom.py").write_text("raise RuntimeError('no')\n")
    (tmp_path / "w.toml").write_text('[pipelines.a]\nsteps = ["boom.f"]\n')
    proc = run_cli("check-config", "-c", "w.toml", cwd=tmp_path,
                   env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert proc.returncode == 2 and "importing module 'boom' failed" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    (tmp_path / "odd.toml").write_text('[watch]\ninbox = "in\\u007fbox"\n')
    out = run_cli("check-config", "-c", "odd.toml", cwd=tmp_path)
    (tmp_path / "back.toml").write_text(out.stdout)
    assert config.load(tmp_path / "back.toml").watch.inbox == str(tmp_path / "in\x7fbox")


def test_suffixes_and_output_options_are_checked_on_every_surface(tmp_path: Path) -> None:
    proc = run_cli("batch", "x.png", "-o", "o", "--suffix", "a/b", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: watcher")
    assert "--suffix: letters" in proc.stderr
    with pytest.raises(ConfigError, match="suffix"):
        process_images([], tmp_path / "o", ["grayscale"], suffix="../x")
    with pytest.raises(ConfigError, match=r"output\.quality: must be <= 100"):
        process_images([], tmp_path / "o", ["grayscale"], output=config.OutputOptions(
            quality=1000))
    proc = run_cli("watch", "--formats", "bogus", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: watcher"), proc.stderr


def test_the_third_attack_on_settings_is_refused_or_read_alike(tmp_path: Path) -> None:
    """helper-6's findings: a size too large for a float, spaces around a choice or a list item,
    and user transforms whose arguments a config cannot give back as written."""
    huge = "9" * 400 + " TB"
    (tmp_path / "big.toml").write_text(f'[input]\nmax_file_size = "{huge}"\n')
    for args, env in ((["check-config", "-c", "big.toml"], {}),
                      (["check-config"], {"WATCHER_MAX_WORKER_MEMORY": "9" * 400}),
                      (["batch", "x.png", "-o", "o", "--max-file-size", "9" * 400], {})):
        proc = run_cli(*args, cwd=tmp_path, env=env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "too large a size" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match="too large a size"):
        process_images([], tmp_path / "o", ["grayscale"], max_file_size=huge)
    # spaces around a choice, or around a list item, as every surface reads them
    assert config.parse({"output": {"on_conflict": " Rename "}}).on_conflict == "rename"
    assert config.parse({"input": {"formats": [" jpeg", "png "]}}).limits.formats == \
        ("JPEG", "PNG")
    flag = run_cli("batch", "--dry-run", "nothing.png", "-o", "o", "--on-conflict", " rename",
                   cwd=tmp_path)
    assert "invalid choice" not in flag.stderr, flag.stderr
    # user transforms: named parameters and plain values only
    (tmp_path / "umod.py").write_text(textwrap.dedent("""
        def kw(im, **kw):
            return im
        def va(im, *args):
            return im
        def po(im, n, /):
            return im
        def any1(im, x=None):
            return im
    """))
    steps = {"kw": '"umod.kw(a=1)"', "va": '"umod.va(1, 2)"', "po": '"umod.po(3)"',
             "nan": '{ op = "umod.any1", x = nan }', "date": '{ op = "umod.any1", x = 1979-05-27 }'}
    for name, step in steps.items():
        (tmp_path / f"{name}.toml").write_text(f"[pipelines.p]\nsteps = [{step}]\n")
        proc = run_cli("check-config", "-c", f"{name}.toml", cwd=tmp_path,
                       env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
        assert proc.returncode == 2, (name, proc.stdout)
        assert f"{name}.toml: pipelines.p.steps[0][umod." in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    (tmp_path / "fine.toml").write_text('[pipelines.p]\nsteps = ["umod.any1(x=[1, 2.5, \'a\'])"]\n')
    ok = run_cli("check-config", "-c", "fine.toml", cwd=tmp_path,
                 env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "back.toml").write_text(ok.stdout)
    again = run_cli("check-config", "-c", "back.toml", cwd=tmp_path,
                    env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert again.returncode == 0, again.stderr
    assert again.stdout.split("\n", 1)[1] == ok.stdout.split("\n", 1)[1]  # but the header
