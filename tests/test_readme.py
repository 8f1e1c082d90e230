"""The README's Python examples run as written: each ```python block marked runnable is extracted and
executed in a fresh folder, in a fresh interpreter (as a user would paste it)."""

from __future__ import annotations

import re
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
