"""The distribution as pip sees it, built for real from a copy of this tree with ``python -m
build`` (the sdist, then the wheel from the unpacked sdist; offline, with the setuptools that
pyproject.toml names): its name, what the sdist and the wheel carry, and the wheel installed.
Also every place that names the distribution, and the image's labels and port."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import watcher

ROOT = Path(__file__).resolve().parents[1]
DIST = "watcher-images"
VERSION = watcher.__version__
# Not part of the project: the venv, build output, caches, and what scripts/run makes here.
SKIP_TOP = {".git", ".venv", "build", "dist", "wheels", "inbox", "samples", "processed", "out",
            "archive", "quarantine", "work"}
SKIP_ANY = {"__pycache__", ".pytest_cache", ".ruff_cache"}
# Beside the package, the sdist must carry these folders whole, and these files.
FOLDERS = ["tests", "docs", "scripts", "systemd", "deploy", ".ci"]
FILES = ["LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "watcher.toml", "Containerfile",
         ".containerignore", ".dockerignore"]
PIP_INSTALL = re.compile(r"\bpip3?\b(.*?)(?:[`;#)]|&&|\|\||$)")  # its arguments: up to the end
BARE_NAME = re.compile(r"(?<![\w./$-])watcher(?:\[[\w,]*\])?(?![\w./@-])")  # of the command


def names_old_distribution(line: str) -> bool:
    """Whether ``line`` installs the distribution by its old name, ``watcher`` (which on PyPI
    is somebody else's project)."""
    return any(re.match(r"[\"']?\s*install\b", args) and BARE_NAME.search(args)
               for args in PIP_INSTALL.findall(line))


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == ROOT
    return {n for n in names if n in SKIP_ANY or n.endswith((".egg-info", ".pyc"))
            or (top and n in SKIP_TOP)}


def _files(base: Path, folder: str) -> set[str]:
    return {p.relative_to(base).as_posix() for p in (base / folder).rglob("*")
            if p.is_file() and not set(p.relative_to(base).parts) & SKIP_ANY
            and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the copied source tree, the sdist, the wheel)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore, symlinks=True)
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(tmp / "out"), str(src)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists = list((tmp / "out").glob("*.tar.gz"))
    wheels = list((tmp / "out").glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted((tmp / "out").iterdir())
    return src, sdists[0], wheels[0]


@pytest.mark.timeout(300)
def test_sdist_carries_tests_docs_scripts_units_and_the_example_config(
        built: tuple[Path, Path, Path]) -> None:
    src, sdist, _ = built
    base = f"watcher_images-{VERSION}"
    assert sdist.name == f"{base}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {m.name.removeprefix(f"{base}/") for m in tar.getmembers() if m.isfile()}
        modes = {m.name.removeprefix(f"{base}/"): m.mode for m in tar.getmembers()}
        pkg_info = email.message_from_bytes(tar.extractfile(f"{base}/PKG-INFO").read())
    want = set(FILES) | {"watcher/py.typed"} | _files(src, "watcher")
    for folder in FOLDERS:
        found = _files(src, folder)
        assert found, folder  # the copy itself has it, so a miss below is the sdist's
        want |= found
    assert want - names == set()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for script in ("scripts/test", "scripts/setup", "scripts/install-systemd", ".ci/run"):
        assert modes[script] & 0o111, f"{script} lost its executable bit"
    assert pkg_info["Name"] == DIST and pkg_info["Version"] == VERSION
    assert pkg_info["License-Expression"] == "MIT"
    assert pkg_info.get_all("License-File") == ["LICENSE"]


@pytest.mark.timeout(300)
def test_wheel_holds_the_package_py_typed_license_and_metadata(
        built: tuple[Path, Path, Path]) -> None:
    src, _, wheel = built
    assert wheel.name == f"watcher_images-{VERSION}-py3-none-any.whl"
    info = f"watcher_images-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    # only the watcher package and its metadata: no tests/ or scripts/ at the top level
    assert {n.split("/", 1)[0] for n in names} == {"watcher", info}
    assert "watcher/py.typed" in names
    assert _files(src, "watcher") - names == set()
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "MIT License" in license_text and "the watcher authors" in license_text
    assert meta["Name"] == DIST and meta["Version"] == VERSION
    assert meta["License-Expression"] == "MIT" and meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert f"Programming Language :: Python :: {sys.version_info[0]}.{sys.version_info[1]}" \
        in classifiers
    assert re.search(r"^watcher = watcher\.launch:run$", entry_points, re.M)


@pytest.mark.timeout(300)
def test_installed_wheel_names_itself_and_runs(built: tuple[Path, Path, Path],
                                               tmp_path: Path) -> None:
    _, _, wheel = built
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)],
                   check=True, timeout=120)
    # Run away from the checkout (the current directory comes first on sys.path), with only the
    # installed wheel ahead of the venv's dependencies.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    code = ("import importlib.metadata as m, pathlib, watcher; "
            "d = m.distribution('watcher-images'); "
            "print(d.version, watcher.__file__, "
            "(pathlib.Path(watcher.__file__).parent / 'py.typed').is_file(), "
            "d.read_text('licenses/LICENSE').splitlines()[0])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    version, module, typed, licence = proc.stdout.split(" ", 3)
    assert version == VERSION
    assert Path(module).is_relative_to(target)  # this wheel's package, not the tree's
    assert typed == "True" and licence.strip() == "MIT License"
    # the console script the wheel declares
    proc = subprocess.run([sys.executable, str(target / "bin" / "watcher"), "--version"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"watcher {VERSION}", proc


def test_the_distribution_is_named_watcher_images_everywhere() -> None:
    """`pip install watcher` installs somebody else's project: every install line, script and
    doc that names the distribution says watcher-images."""
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] == DIST
    texts = [ROOT / "README.md", ROOT / "Containerfile", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for p in (ROOT / "scripts").iterdir() if p.is_file()),
             *sorted((ROOT / "deploy").iterdir())]
    wrong = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in texts for i, line in enumerate(p.read_text().splitlines(), 1)
             if names_old_distribution(line)]
    assert wrong == []
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {DIST}" in readme


def test_bare_name_finder_catches_the_old_lines() -> None:
    """The finder above is not vacuous: it flags each form the old name took."""
    old = ["pip install 'watcher[dask]'", 'pip install --find-links /w "watcher${EXTRAS}"; \\',
           "or `pip install watcher` into your own environment",
           '"$prefix/bin/pip" install --quiet --no-index --find-links "$wheelhouse" watcher',
           "pip install watcher"]
    ok = ["pip install watcher-images", "pip install 'watcher-images[dask]'",
          '/opt/watcher/bin/pip install --no-index --find-links /wheels "watcher-images"',
          "pip install .", '"$prefix/bin/pip" uninstall --quiet -y watcher',
          "`pip install watcher-images` (PyPI's `watcher` is another project)"]
    assert all(names_old_distribution(x) for x in old)
    assert not any(names_old_distribution(x) for x in ok)


def test_image_labels_and_port_agree_with_the_package() -> None:
    text = (ROOT / "Containerfile").read_text()
    final = text.rsplit("\nFROM ", 1)[1]  # the image's own stage, after the build stage
    assert re.search(rf"^ARG VERSION={re.escape(VERSION)}$", final, re.M)
    assert 'org.opencontainers.image.licenses="MIT"' in final
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    port = re.search(r"\bWATCHER_METRICS_PORT=(\d+)", final)
    assert port and re.search(rf"^EXPOSE {port.group(1)}$", final, re.M)
    assert "COPY . " not in final and "COPY --from=build /opt/watcher /opt/watcher" in final
