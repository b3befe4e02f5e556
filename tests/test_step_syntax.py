"""Step strings (``--ops``, watcher.toml, the API): what is accepted, and each mistake explained
with the user's own text, a caret under the fault and a did-you-mean, never a Python parser
message."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from watcher import config
from watcher.config.steps import split_spans
from watcher.config.stepsyntax import read_step
from watcher.errors import ConfigError


@pytest.mark.parametrize(("text", "name", "args", "kwargs"), [
    ("grayscale", "grayscale", [], {}),
    ("thumbnail(128, 128)", "thumbnail", [128, 128], {}),
    ("  thumbnail ( 128 ,128 , ) ", "thumbnail", [128, 128], {}),
    ("resize(width=800, upscale=false)", "resize", [], {"width": 800, "upscale": False}),
    ("resize(scale=1e-1, upscale=True)", "resize", [], {"scale": 0.1, "upscale": True}),
    ("rotate(-45.5, fill='#ff0000')", "rotate", [-45.5], {"fill": "#ff0000"}),
    ('rotate(10, fill="a,b|c;d")', "rotate", [10], {"fill": "a,b|c;d"}),
    ("pkg.mod.fn(1, [1, 2], (3,), 'x', none)", "pkg.mod.fn", [1, [1, 2], (3,), "x", None], {}),
])
def test_accepted_forms(text: str, name: str, args: list, kwargs: dict) -> None:
    call = read_step(text.strip(), "--ops")
    assert (call.name, call.args, call.kwargs) == (name, args, kwargs)


def test_split_keeps_separators_inside_brackets_and_quotes_and_knows_where_each_step_starts(
        ) -> None:
    text = "auto_orient,  rotate(10, fill='a,b') | blur(1); grayscale"
    spans = split_spans(text)
    assert [s for s, _ in spans] == ["auto_orient", "rotate(10, fill='a,b')", "blur(1)",
                                     "grayscale"]
    assert all(text[at:at + len(s)] == s for s, at in spans)


def caret_column(message: str) -> tuple[str, int]:
    """The quoted line and the column the caret under it points at."""
    lines = message.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip() == "^")
    return lines[i - 1][4:], lines[i].index("^") - 4


@pytest.mark.parametrize(("ops", "message", "at", "hint"), [
    ("thumbnail(128 128)", "expected ',' or ')' after an argument", "128)",
     "arguments are separated by commas: thumbnail(128, 128)"),
    ("thumbnail 128x128", "expected '(' or the end of the step after 'thumbnail'", "128x128",
     "a size is two arguments: thumbnail(128, 128)"),
    ("auto_orient, thumbnail(128x128)", "'128x128' is not a number", "128x128)",
     "a size is two arguments: thumbnail(128, 128)"),
    ("resize(width:800)", "expected '=' after a parameter name", ":800)",
     "a parameter is given as width=VALUE"),
    ("rotate(10, fill=red)", "got 'red'", "red)", "text goes in quotes: 'red'"),
    ("sharpen(radius=1.0), blur(2", "missing ')' at the end of the arguments", "", ""),
    ("thumbnail(128,128) blur", "unexpected text after the step's ')'", "blur",
     "steps are separated by ',' ';' or '|'"),
    ("resize(width=800, 600)", "a plain argument after a KEY=VALUE one", "600)", ""),
    ("resize(width=1, width=2)", "width is given twice", "width=2)", ""),
    ("rotate(fill='#fff)", "text that starts with ' must end with '", "'#fff)", ""),
    ("(128)", "a step starts with a transform name", "(128)", ""),
])
def test_each_mistake_is_shown_in_the_users_text_with_a_caret(ops: str, message: str, at: str,
                                                               hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse_ops(ops, "--ops")
    text = str(err.value)
    assert text.startswith("--ops: cannot read step "), text
    assert message in text.splitlines()[0], text
    line, col = caret_column(text)
    assert line == ops  # the whole --ops string, not just the step
    assert ops[col:] == at, (ops[col:], at)
    if hint:
        assert hint in text
    assert "a step is NAME or NAME(ARG, ...)" in text
    for python_talk in ("Perhaps you forgot", "invalid decimal literal", "invalid syntax"):
        assert python_talk not in text


@pytest.mark.parametrize(("ops", "where", "suggestion"), [
    ("thumbnali(128, 128)", "--ops[thumbnali]", "unknown transform 'thumbnali'; did you mean "
                                                "'thumbnail'?"),
    ("greyscal", "--ops[greyscal]", "did you mean 'greyscale'?"),
    ("resize(widht=800)", "--ops[resize].widht", "unknown parameter; did you mean 'width'?"),
    ("sharpen(percnt=100)", "--ops[sharpen].percnt", "did you mean 'percent'?"),
    ("grayscale(amount=1)", "--ops[grayscale].amount", "grayscale takes none"),
    ("qqq", "--ops[qqq]", "unknown transform 'qqq'; known: auto_orient, autocontrast, blur"),
])
def test_a_misspelt_step_or_parameter_gets_a_did_you_mean(ops: str, where: str,
                                                          suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse_ops(ops, "--ops")
    assert err.value.where == where
    assert suggestion in err.value.message


def test_steps_in_watcher_toml_get_the_same_messages_naming_file_pipeline_and_step(
        tmp_path: Path) -> None:
    path = tmp_path / "watcher.toml"
    path.write_text('[pipelines.web]\nsteps = ["auto_orient", "thumbnail(128 128)"]\n')
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert err.value.where == f"{path}: pipelines.web.steps[1]"
    line, col = caret_column(err.value.message)
    assert line == "thumbnail(128 128)" and line[col:] == "128)"
    path.write_text('[pipelines.web]\nsteps = [{ op = "resize", widht = 800 }, "thumbnali"]\n')
    with pytest.raises(ConfigError, match=r"steps\[0\]\[resize\]\.widht: unknown parameter; "
                                          r"did you mean 'width'\?"):
        config.load(path)
    path.write_text('[pipelines.web]\nsteps = ["thumbnali"]\n')
    with pytest.raises(ConfigError, match=r"steps\[0\]\[thumbnali\]: unknown transform "
                                          r"'thumbnali'; did you mean 'thumbnail'\?"):
        config.load(path)


@pytest.mark.integration
@pytest.mark.parametrize(("ops", "fault"), [
    ("thumbnail(128 128)", "expected ',' or ')' after an argument"),
    ("thumbnail 128x128", "expected '(' or the end of the step"),
])
def test_the_command_line_prints_a_usage_line_and_the_explained_fault(
        tmp_path: Path, ops: str, fault: str) -> None:
    proc = run_cli("batch", "x.png", "-o", "o", "--ops", ops, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "usage: watcher batch [options] -o DIR INPUT ..."
    assert lines[1].startswith("watcher batch: error: --ops: cannot read step") and \
        fault in lines[1]
    assert lines[2] == f"    {ops}" and lines[3].strip() == "^"
    assert "thumbnail(128, 128)" in proc.stderr  # what to write instead
    assert len(lines) <= 7, proc.stderr
    assert "Perhaps" not in proc.stderr and "literal" not in proc.stderr
    assert not (tmp_path / "o").exists()
