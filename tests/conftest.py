from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

# as the command line does, before onnxruntime or torchvision is imported: both write into $TMPDIR
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "inductor"))

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PTQCAL_SHARED", REPO.parent / "shared"))


def shared_file(relative: str) -> Path:
    """A file from ../shared, or a clean skip when the folder is not there."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def digits():
    pytest.importorskip("sklearn")
    from ptqcal.data import load_digits

    return load_digits()


@dataclass(frozen=True)
class DefaultRun:
    """``ptqcal run`` with no settings but its folders: what it returned and printed, and how many
    calibration passes (histogram collections) it made."""

    code: int
    out: Path
    models: Path  # its --cache-dir: the built-in models it trained, which other default runs reuse
    printed: str
    calibrations: int


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> DefaultRun:
    """The default run, once per session (a minute on 2 cores): the tests that use it only read its
    folder (and reuse its trained models)."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import ptqcal.quantize as quantize
    from ptqcal.cli import main

    calls, original = [], quantize.collect_histograms
    folder = tmp_path_factory.mktemp("default")
    out, models = folder / "run", folder / "cache"
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setattr(quantize, "collect_histograms", lambda *a, **k: calls.append(1) or original(*a, **k))
        code = main(["run", "--out", str(out), "--cache-dir", str(models), "--no-progress"])
    return DefaultRun(code, out, models, printed.getvalue(), len(calls))


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory):
    """The built-in digits ResNet, trained once per test session."""
    pytest.importorskip("torch")
    from ptqcal.models import get_model_entry

    entry = get_model_entry("digits_resnet8")
    return entry.build(None, digits.train, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def digits_onnx(digits, digits_model, tmp_path_factory) -> Path:
    from ptqcal.export import export_onnx
    from ptqcal.models.registry import DIGITS_PREPROCESS

    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    export_onnx(digits_model, DIGITS_PREPROCESS(digits.eval.images[:64]), path)
    return path


@pytest.fixture(scope="session")
def digits_inputs(digits):
    from ptqcal.models.registry import DIGITS_PREPROCESS

    return DIGITS_PREPROCESS(digits.calib_pool.images), DIGITS_PREPROCESS(digits.eval.images)


def tiny_onnx_classifier(path: Path, seed: int = 0, classes: int = 5) -> Path:
    """A Conv-Relu-GlobalAveragePool-Gemm classifier built with onnx.helper (no torch)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (classes, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (classes,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    return save_classifier(path, "tiny", nodes, inits, classes)


def save_classifier(path: Path, name: str, nodes: list, inits: list, classes: int, input_shape=("N", 1, 8, 8)) -> Path:
    """An opset-17 graph from ``input`` (float, ``input_shape``) to ``logits`` (N, classes), saved."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                     list(input_shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
