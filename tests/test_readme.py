"""The README's Python examples run as written: each ```python block marked runnable is extracted and
executed in a fresh folder, in a fresh interpreter (as a user would paste it)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = "<!-- runs as written: tests/test_readme.py -->"


def _runnable_blocks() -> list[str]:
    text = README.read_text()
    return [re.match(r"\s*```python\n(.*?)```", text[at + len(RUNNABLE):], re.S).group(1)
            for at in (m.start() for m in re.finditer(re.escape(RUNNABLE), text))]


def test_the_readme_marks_its_runnable_examples():
    assert len(_runnable_blocks()) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_runnable_blocks())))
def test_a_readme_example_runs_as_written(index, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    block = _runnable_blocks()[index]
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _commands() -> list[str]:
    """Every ``ptqcal run`` and ``ptqcal compare-torch`` line of the README's shell blocks, with its
    continuation lines joined and its comment dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] in (["ptqcal", "run"], ["ptqcal", "compare-torch"]):
                commands.append(" ".join(words))
    return commands


def test_every_run_command_of_the_readme_parses_into_valid_settings(tmp_path, monkeypatch):
    """Each command's flags exist and its settings validate (the files it names are made empty here,
    as the user's would be there): a renamed flag or a stale example fails this test."""
    from ptqcal.cli import build_parser, run_config

    commands = _commands()
    assert len(commands) >= 10
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = shlex.split(command)[1:]
        for word in words:
            file = word.partition("=")[2] or word  # --quantized NAME=FILE.onnx
            if file.endswith((".onnx", ".pth")) and not file.startswith(("~", "/", "..")):
                (tmp_path / file).touch()
        cfg, models = run_config(build_parser().parse_args(words))
        assert models and cfg.validate() is cfg, command


@pytest.mark.slow
def test_the_readme_run_on_the_shared_cifar_images_runs_as_written(tmp_path):
    """The README's command for the authors' ResNet20 on ../shared, from a folder beside ../shared as the
    README assumes (the checkout's parent here)."""
    pytest.importorskip("torch")
    shared = README.parent.parent / "shared"
    if not (shared / "models/cifar100_resnet20.pth").is_file():
        pytest.skip("../shared is not here")
    command = next(c for c in _commands() if "cifar100_resnet20.pth" in c)
    words = [*shlex.split(command)[1:], "--out", str(tmp_path / "run"), "--no-progress", "--cache-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "ptqcal", *words], cwd=README.parent, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "report.md").is_file() and "a8w8" in (tmp_path / "run" / "metrics.csv").read_text()


CHECKED = "<!-- settings checked: tests/test_readme.py -->"


def test_the_readme_api_examples_that_need_a_cluster_or_your_files_have_valid_settings(tmp_path, monkeypatch):
    """Each ``RunConfig`` of a block marked as checked validates (``run`` stands in for the pipeline;
    the files it names are made empty here, as the user's would be there)."""
    import ptqcal.pipeline
    from ptqcal.config import RunConfig

    text = README.read_text()
    blocks = [re.match(r"\s*```python\n(.*?)```", text[m.end():], re.S).group(1)
              for m in re.finditer(re.escape(CHECKED), text)]
    assert blocks
    monkeypatch.chdir(tmp_path)
    checked = []
    monkeypatch.setattr(ptqcal.pipeline, "run", lambda cfg: checked.append(cfg.validate()))
    for block in blocks:
        for name in re.findall(r"[\w.]+\.onnx", block):
            (tmp_path / name).touch()
        exec(block, {"RunConfig": RunConfig, "run": ptqcal.pipeline.run})  # noqa: S102 - the README's own text
    assert len(checked) == sum(block.count("run(RunConfig(") for block in blocks) >= 3
