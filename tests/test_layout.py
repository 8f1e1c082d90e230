"""The house rules of the code, checked from its source: data flows one way through the stages,
stages speak in their own terms, the pipeline stays a short list of steps, and importing or using
a stage changes no global state."""

import ast
import logging
import re
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("models", "export", "quantize", "evaluate", "analysis")  # in the order data flows
SHARED = {"ptqcal", "ptqcal.errors", "ptqcal.atomic", "ptqcal.cache", "ptqcal.progress", "ptqcal.versions", "ptqcal.csvsafe"}  # leaves any stage may use
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
    for leaf in ("errors", "atomic", "cache", "progress"):
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


def _external_imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports that are not ptqcal's (relative imports skipped)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return names - {"ptqcal"}


def test_the_graph_queries_are_a_leaf_of_the_quantize_stage():
    """The calibrator and the quantizer both ask the graph; it asks neither (nor any ptqcal module but
    the spec), and imports only onnx, numpy and the standard library (ORT's registry on first use)."""
    path = REPO / "quantize" / "graph.py"
    assert _imports(path, "ptqcal.quantize") <= {"ptqcal.quantize", "ptqcal.quantize.spec"}
    assert _external_imports(path) - set(sys.stdlib_module_names) <= {"onnx", "numpy", "onnxruntime"}
    lazy = {n.module for f in ast.walk(ast.parse(path.read_text())) if isinstance(f, ast.FunctionDef)
            for n in ast.walk(f) if isinstance(n, ast.ImportFrom)}
    assert lazy == {"onnxruntime.quantization.registry"}, "onnxruntime only inside op_types_to_quantize"


@pytest.mark.parametrize("stage", STAGES)
def test_no_import_cycle_among_a_stages_modules(stage):
    """Imports anywhere in a module (lazy ones too) count: a cycle that only a lazy import hides is one."""
    package = f"ptqcal.{stage}"
    modules = {path.stem: path for path in (REPO / stage).glob("*.py") if path.stem != "__init__"}
    graph = {name: {m.rsplit(".", 1)[1] for m in _imports(path, package)
                    if m.startswith(f"{package}.") and m.rsplit(".", 1)[1] in modules and m.count(".") == 2}
             for name, path in modules.items()}
    _assert_acyclic(graph)


def _assert_acyclic(graph: dict[str, set[str]], follow=lambda imported, visiting: True) -> None:
    """No cycle in ``graph`` (module -> modules it imports), depth first; ``follow`` may skip an edge
    given the modules being visited."""
    visiting, done = [], set()

    def visit(name: str) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(name):], name])}"
        if name in done:
            return
        visiting.append(name)
        for imported in sorted(graph[name]):
            if follow(imported, visiting):
                visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_quantizing_leaves_the_logging_and_tempfile_state_alone(digits_onnx, tmp_path):
    """ORT's quantizer logs on the root logger and makes temporary folders in tempfile's folder: the
    handler and filter that hold its lines back and the folder pointed into the cache are the call's
    only, and the root logger's level is never touched."""
    import onnx

    from ptqcal.quantize import CalibrationRanges, QuantSpec, calibration_tensors, prepare, quantize_qdq

    root = logging.getLogger()
    before = (list(root.handlers), list(root.filters), root.level, tempfile.tempdir)
    root.setLevel(logging.DEBUG)
    try:
        prepared = prepare(digits_onnx, tmp_path / "p.onnx")
        ranges = CalibrationRanges("minmax", 8, 1, {n: (-1.0, 1.0) for n in calibration_tensors(onnx.load(prepared))})
        quantize_qdq(prepared, tmp_path / "q.onnx", ranges, QuantSpec(8))
        quantize_qdq(prepared, tmp_path / "q3.onnx", ranges, QuantSpec(3, 4))  # the narrow paths too
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before[2])
    assert (list(root.handlers), list(root.filters), root.level, tempfile.tempdir) == before
    assert not list(tmp_path.glob(".ptqcal-*")), "ORT's temporary files are removed"


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


# --- fences: the face composes, the stages compute ---------------------------------------------

ROOMS = (*STAGES, "ptqcal", "ptqcal/data", "bench")
MAX_FILE_LINES = 450
FACE_TYPES = {"RunConfig", "Cache", "Pixels", "Images", "PreparedModel", "Batches", "Sweep", "Executor"}


def _room_files(room: str) -> list[Path]:
    return sorted((REPO / room).glob("*.py"))


def _module_name(path: Path) -> str:
    """The import name of a source file (bench scripts import each other by their bare names)."""
    relative = path.relative_to(REPO).with_suffix("")
    if relative.parts[0] == "bench":
        return relative.parts[-1]
    parts = list(relative.parts)
    if parts[0] != "ptqcal":
        parts.insert(0, "ptqcal")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_the_face_runs_no_model():
    """Outside its data room, the face imports neither onnxruntime nor onnx's numpy helpers: every
    model runs in a stage, through the stage's session factory."""
    for path in _room_files("ptqcal"):
        text = path.read_text()
        assert "onnxruntime" not in _external_imports(path), f"ptqcal/{path.name} imports onnxruntime"
        assert "numpy_helper" not in text and "InferenceSession" not in text, f"ptqcal/{path.name} runs a model"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_functions_take_no_face_types(stage):
    """Stage functions take arrays, iterators, paths and numbers: never the face's configuration,
    cache, pixel stream or executor."""
    for path in _room_files(stage):
        tree = ast.parse(path.read_text())
        for name in _imports(path, f"ptqcal.{stage}"):
            assert name not in {"ptqcal.config", "ptqcal.pipeline", "ptqcal.steps", "ptqcal.data", "ptqcal.executors"}, \
                f"{stage}/{path.name} imports {name}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations = [a.annotation for a in [*node.args.args, *node.args.kwonlyargs] if a.annotation]
                named = {n.id for a in annotations for n in ast.walk(a) if isinstance(n, ast.Name)}
                named |= {n.value for a in annotations for n in ast.walk(a)
                          if isinstance(n, ast.Constant) and isinstance(n.value, str)}
                assert not named & FACE_TYPES, f"{stage}/{path.name}:{node.lineno} {node.name} takes {named & FACE_TYPES}"


def test_no_import_cycle_anywhere():
    """Every ptqcal module and bench script, lazy imports included: data flows one way."""
    paths = [path for room in ROOMS for path in _room_files(room)]
    names = {_module_name(path): path for path in paths}
    graph = {}
    for name, path in names.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        imported = _imports(path, package) | (_external_imports(path) if path.parent.name == "bench" else set())
        # a module's own package __init__ re-exports its modules: importing the package is not a cycle
        graph[name] = {m for m in imported if m in names and m != name and not name.startswith(m + ".")}
    _assert_acyclic(graph, lambda imported, visiting: not (names[imported].stem == "__init__" and
                                                            any(n.startswith(imported + ".") for n in visiting)))


def test_no_module_name_in_two_rooms_and_no_long_file():
    seen: dict[str, str] = {}
    for room in ROOMS:
        for path in _room_files(room):
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_FILE_LINES, f"{room}/{path.name} has {lines} lines"
            if path.stem != "__init__":
                assert path.stem not in seen, f"{path.name} is in {seen.get(path.stem)} and {room}"
                seen[path.stem] = room


def test_the_cycle_check_finds_a_cycle_a_lazy_import_would_hide():
    with pytest.raises(AssertionError, match="a -> b -> a"):
        _assert_acyclic({"a": {"b"}, "b": {"a"}, "c": set()})
    _assert_acyclic({"a": {"b"}, "b": set()})
