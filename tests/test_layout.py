"""The house rules of the code, checked from its source: data flows one way through the stages,
stages speak in their own terms, the pipeline stays a short list of steps, and importing or using
a stage changes no global state."""

import ast
import logging
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("models", "export", "quantize", "evaluate", "analysis")  # in the order data flows
SHARED = {"ptqcal", "ptqcal.errors", "ptqcal.atomic", "ptqcal.cache"}  # leaves any stage may use
MAX_FUNCTION_LINES = 50


def _sources():
    for folder in (*STAGES, "ptqcal"):
        yield from sorted((REPO / folder).glob("*.py"))


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the ptqcal modules ``path`` imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""  # "from . import x": the package
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            if not node.module:  # "from . import steps" names modules of the package
                names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "ptqcal" or n.startswith("ptqcal.")}


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_a_later_stage_or_the_face(stage):
    allowed = {f"ptqcal.{s}" for s in STAGES[:STAGES.index(stage) + 1]}
    for path in sorted((REPO / stage).glob("*.py")):
        for name in _imports(path, f"ptqcal.{stage}"):
            top = ".".join(name.split(".")[:2])
            assert top in allowed or name in SHARED, f"{stage}/{path.name} imports {name}"


def test_shared_leaves_import_nothing_of_ptqcal_but_each_other():
    for leaf in ("errors", "atomic", "cache"):
        names = _imports(REPO / "ptqcal" / f"{leaf}.py", "ptqcal")
        assert names <= SHARED, f"ptqcal/{leaf}.py imports {names - SHARED}"


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_name_a_command_line_flag(stage):
    """What a stage raises is in its own terms; the face adds the flag (docstrings may cite the CLI)."""
    flag = re.compile(r"(^|[\s(])--[a-z][a-z-]+")
    for path in sorted((REPO / stage).glob("*.py")):
        for raised in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Raise)):
            for node in ast.walk(raised):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert not flag.search(node.value), f"{stage}/{path.name}: {node.value!r}"


def test_the_pipeline_is_short_and_no_function_is_long():
    assert len((REPO / "ptqcal" / "pipeline.py").read_text().splitlines()) < 200
    long = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                said_why = any("long:" in line for line in lines[node.lineno - 2:node.lineno + 1])
                if length > MAX_FUNCTION_LINES and not said_why:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_importing_the_figures_leaves_matplotlibs_backend_alone(tmp_path):
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import ptqcal.analysis.figures, ptqcal.analysis.report; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "import sys; assert 'matplotlib.pyplot' not in sys.modules")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_quantizing_leaves_the_root_logger_alone(digits_onnx, tmp_path):
    from ptqcal.quantize import CalibrationRanges, QuantSpec, calibration_tensors, prepare, quantize_qdq

    import onnx

    prepared = prepare(digits_onnx, tmp_path / "p.onnx")
    ranges = CalibrationRanges("minmax", 8, 1, {n: (-1.0, 1.0) for n in calibration_tensors(onnx.load(prepared))})
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    try:
        quantize_qdq(prepared, tmp_path / "q.onnx", ranges, QuantSpec(8))
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(logging.WARNING)
    assert not list(tmp_path.glob(".ptqcal-quant-*")), "ORT's temporary files are removed"


def test_building_random_weights_leaves_torchs_rng_alone(tmp_path):
    torch = pytest.importorskip("torch")
    from ptqcal.models import RANDOM_WEIGHTS, get_model_entry

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = get_model_entry("cifar_resnet20").build(RANDOM_WEIGHTS, None, tmp_path)
    assert torch.equal(torch.rand(3), expected)
    again = get_model_entry("cifar_resnet20").build(RANDOM_WEIGHTS, None, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
