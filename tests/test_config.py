"""watcher.toml, --ops strings and Python callables: accepted forms and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import crashers
from watcher import config
from watcher.errors import ConfigError

GOOD = """
[defaults]
quality = 80

[engine]
workers = 3
timeout = 12.5
max_tasks_per_worker = 100

[input]
formats = ["jpeg", "png"]
pixel_limit = 50_000_000
max_file_size = "20 MB"

[output]
pipelines = ["thumb", "web"]
on_conflict = "rename"

[pipelines.thumb]
suffix = "t"
steps = ["auto_orient", "thumbnail(256, 256)"]
format = "webp"

[pipelines.web]
steps = [{ op = "resize", width = 1600, upscale = false }, "sharpen"]
metadata = "copyright"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "watcher.toml"
    p.write_text(text)
    return p


def test_good_config_loads_every_section(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, GOOD))
    assert s.use == ("thumb", "web")
    assert s.engine.workers == 3 and s.engine.task_timeout == 12.5
    assert s.engine.max_tasks_per_worker == 100
    assert s.limits.formats == ("JPEG", "PNG") and s.limits.max_file_size == 20_000_000
    assert s.on_conflict == "rename"
    thumb, web = s.select([])
    assert thumb.suffix == "t" and thumb.output.format == "webp" and thumb.output.quality == 80
    assert [st.name for st in thumb.steps] == ["auto_orient", "thumbnail"]
    assert dict(web.steps[0].params)["upscale"] is False
    assert web.suffix == "web" and web.output.metadata == "copyright"
    assert "thumbnail" in s.pipelines  # built-ins stay available


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, GOOD), workers=1, on_conflict="skip")
    assert s.engine.workers == 1 and s.on_conflict == "skip"


@pytest.mark.parametrize(("snippet", "where"), [
    ("[pipelines.a]\nsteps = ['thumbnail(128, 128)', 'blurr']",
     "watcher.toml: pipelines.a.steps[1][blurr]"),
    ("[pipelines.a]\nsteps = [{ op = 'resize', width = '800px' }]",
     "watcher.toml: pipelines.a.steps[0][resize].width"),
    ("[pipelines.a]\nsteps = [{ op = 'thumbnail', widht = 3 }]",
     "watcher.toml: pipelines.a.steps[0][thumbnail].widht"),
    ("[pipelines.a]\nsteps = [{ width = 3 }]", "watcher.toml: pipelines.a.steps[0].op"),
    ("[pipelines.a]\nsteps = []", "watcher.toml: pipelines.a.steps"),
    ("[pipelines.a]\nsteps = ['grayscale']\nquality = 101", "watcher.toml: pipelines.a.quality"),
    ("[pipelines.a]\nsteps = ['grayscale']\nformat = 'jpg2000'",
     "watcher.toml: pipelines.a.format"),
    ("[pipelines.a]\nsteps = ['grayscale']\ncolr = 'srgb'", "watcher.toml: pipelines.a.colr"),
    ("[pipelines.a]\nsteps = ['grayscale']\nsuffix = 'a/b'", "watcher.toml: pipelines.a.suffix"),
    ("[engine]\nworkers = 'two'", "watcher.toml: engine.workers"),
    ("[engine]\nworkers = 0", "watcher.toml: engine.workers"),
    ("[engine]\nstart_method = 'vfork'", "watcher.toml: engine.start_method"),
    ("[input]\nformats = ['jpeg', 'nope']", "watcher.toml: input.formats[1]"),
    ("[input]\nmax_file_size = 'lots'", "watcher.toml: input.max_file_size"),
    ("[output]\npipelines = ['missing']", "watcher.toml: output.pipelines[0]"),
    ("[output]\non_conflict = 'clobber'", "watcher.toml: output.on_conflict"),
    ("[outptu]\nx = 1", "watcher.toml: outptu"),
    ("[defaults]\nbackground = 'purpleish'", "watcher.toml: defaults.background"),
])
def test_bad_config_is_refused_with_the_key_named(tmp_path: Path, snippet: str,
                                                  where: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, snippet))
    assert e.value.where.replace(str(tmp_path) + "/", "") == where


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[engine\nworkers = 1"))
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


def test_split_ops_respects_brackets() -> None:
    assert config.split_ops("auto_orient, thumbnail(128,128) | blur(1); grayscale") == [
        "auto_orient", "thumbnail(128,128)", "blur(1)", "grayscale"]


def test_callables_top_level_accepted_lambdas_and_closures_refused() -> None:
    p = config.pipeline_from([crashers.invert, "grayscale", "thumbnail(64, 64)"])
    assert [s.name for s in p.steps] == ["tests.crashers.invert", "grayscale", "thumbnail"]
    with pytest.raises(ConfigError, match=r"lambda|top level"):
        config.pipeline_from([lambda im: im])

    def nested(im):  # type: ignore[no-untyped-def]
        return im

    with pytest.raises(ConfigError, match="top level of an importable module"):
        config.pipeline_from([nested])
    with pytest.raises(ConfigError, match="cannot be sent"):
        config.pipeline_from([object()])


def test_dotted_import_path_is_a_user_transform() -> None:
    step = config.parse_step("tests.crashers.invert", "--ops")
    assert step.func is crashers.invert and step.name == "tests.crashers.invert"
    with pytest.raises(ConfigError, match="cannot import module"):
        config.parse_step("nosuchpkg.mod.fn", "--ops")
    with pytest.raises(ConfigError, match="has no 'nope'"):
        config.parse_step("tests.crashers.nope", "--ops")
    with pytest.raises(ConfigError, match="bad arguments"):
        config.parse_step("tests.crashers.invert(3)", "--ops")


@pytest.mark.parametrize(("text", "where", "message"), [
    ('executor = "ray"', "engine.executor", "expected one of local, dask, dask-local"),
    ('executor = "dask"', "engine.scheduler", "needs the scheduler's address"),
    ('scheduler = "10.0.0.1:8786"', "engine.scheduler", "like tcp://HOST:8786"),
    ("tasks_per_worker = 0", "engine.tasks_per_worker", "must be >= 1"),
])
def test_bad_executor_settings_are_refused_naming_the_key(tmp_path: Path, text: str, where: str,
                                                          message: str) -> None:
    cfg = tmp_path / "watcher.toml"
    cfg.write_text(f"[engine]\n{text}\n")
    with pytest.raises(ConfigError, match=message) as exc:
        config.load(cfg)
    assert exc.value.where == f"{cfg}: {where}" or exc.value.where.endswith(where)


def test_executor_settings_from_file_environment_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "watcher.toml"
    cfg.write_text('[engine]\nexecutor = "dask"\nscheduler = "tcp://10.0.0.5:8786"\n'
                   "tasks_per_worker = 3\n")
    s = config.load(cfg)
    assert (s.engine.executor, s.engine.scheduler, s.engine.tasks_per_worker) == \
        ("dask", "tcp://10.0.0.5:8786", 3)
    s = config.from_environment(config.load(None), {"WATCHER_EXECUTOR": "dask-local"})
    assert s.engine.executor == "dask-local"
    s = config.load(None, scheduler="tcp://h:8786")  # --scheduler alone implies dask
    assert (s.engine.executor, s.engine.scheduler) == ("dask", "tcp://h:8786")
    with pytest.raises(ConfigError, match="WATCHER_SCHEDULER"):
        config.from_environment(config.load(None), {"WATCHER_EXECUTOR": "dask"})


def test_instance_names_the_work_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "watcher.toml"
    cfg.write_text('[watch]\nwork = "w"\ninstance = "{host}-2"\n')
    ws = config.load(cfg).watch
    from watcher.fs.files import HOST

    assert ws.folders()["work"] == str(tmp_path / "w" / f"{HOST}-2")
    cfg.write_text('[watch]\ninstance = "a/b"\n')
    with pytest.raises(ConfigError, match="instance name"):
        config.load(cfg)
