"""Graphs made elsewhere as configurations of a run: a user's quantized files (--quantized) and
peer toolchains (--also), against truth from bare ONNX Runtime sessions on the same inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import tiny_onnx_classifier
from ptqcal.cli import main

pytestmark = pytest.mark.slow


class _Reader:
    """ORT's CalibrationDataReader protocol over a fixed set of batches."""

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def get_next(self):
        if self.index == len(self.batches):
            return None
        self.index += 1
        return {"input": self.batches[self.index - 1]}

    def rewind(self):
        self.index = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory, digits):
    """A float classifier of the digits and its QOperator and dynamic quantizations made by ORT itself."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from ptqcal.models.preprocess import DIGITS_PREPROCESS

    folder = tmp_path_factory.mktemp("deployed")
    float_path = tiny_onnx_classifier(folder / "float.onnx", classes=10)
    calib = DIGITS_PREPROCESS(digits.calib_pool.images[:64])
    quantize_static(str(float_path), str(folder / "qop.onnx"), _Reader([calib[i:i + 16] for i in range(0, 64, 16)]),
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    quantize_dynamic(str(float_path), str(folder / "dyn.onnx"), weight_type=QuantType.QInt8)
    return folder


def _bare_logits(path, images, batch=256):
    """A bare session's logits in the run's batches: dynamic quantization's ranges are per batch."""
    from ptqcal.models.preprocess import DIGITS_PREPROCESS

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = DIGITS_PREPROCESS(images)
    return np.concatenate([session.run(None, {"input": inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])


def test_a_users_qoperator_and_dynamic_graphs_give_a_bare_sessions_logits(models, digits, tmp_path):
    before = {p.name: p.read_bytes() for p in models.glob("*.onnx")}
    out = tmp_path / "run"
    assert main(["run", "--model", str(models / "float.onnx"), "--dataset", "digits", "--preprocess", "digits",
                 "--weight-bits", "8", "--quantized", str(models / "qop.onnx"), f"dyn={models / 'dyn.onnx'}",
                 "--eval-size", "300", "--no-timing", "--no-progress", "--quiet", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["configs"] == ["float", "a8w8", "qop", "dyn"]
    assert run["descriptors"]["qop"]["kind"] == "external" and run["descriptors"]["dyn"]["kind"] == "external"
    # the evaluation images the run drew: the digits' evaluation split, seeded
    from ptqcal.config import RunConfig
    from ptqcal.data import select

    chosen = select(digits, None, RunConfig().seed, 300)
    with np.load(out / "logits.npz") as logits:
        for name, file in (("qop", "qop.onnx"), ("dyn", "dyn.onnx")):
            np.testing.assert_array_equal(logits[name], _bare_logits(models / file, chosen.eval.images))
    notes = " ".join(run["notes"])
    assert "qop (your graph qop.onnx)" in notes and "QLinearConv" in notes
    assert "no deployed-vs-simulated check" in notes and "per batch" in notes
    assert (out / "model_qop.onnx").read_bytes() == before["qop.onnx"]  # a copy of the user's file
    assert (out / "model_qop.onnx").stat().st_ino != (models / "qop.onnx").stat().st_ino
    assert {p.name: p.read_bytes() for p in models.glob("*.onnx")} == before


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[2].__setattr__("dim_value", 16), "does not fit"),
    (lambda m: m.graph.output[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 7), "7 classes"),
])
def test_a_graph_for_another_input_or_class_count_is_one_line_and_leaves_nothing(models, tmp_path, capsys, edit,
                                                                                 said):
    model = onnx.load(str(models / "qop.onnx"))
    edit(model)
    onnx.save(model, str(tmp_path / "other.onnx"))
    out = tmp_path / "run"
    assert main(["run", "--model", str(models / "float.onnx"), "--dataset", "digits", "--preprocess", "digits",
                 "--weight-bits", "8", "--quantized", str(tmp_path / "other.onnx"), "--no-timing", "--no-progress",
                 "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err
    assert not out.exists()


def test_a_name_taken_by_the_sweep_or_unknown_peer_is_one_line(models, tmp_path, capsys):
    base = ["run", "--model", str(models / "float.onnx"), "--dataset", "digits", "--preprocess", "digits",
            "--weight-bits", "8", "--no-timing", "--no-progress", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*base, "--quantized", f"a8w8={models / 'qop.onnx'}"]) == 2
    assert "a8w8" in capsys.readouterr().err
    assert main([*base, "--also", "no-such-tool"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-tool" in err
    assert not (tmp_path / "run").exists()


def test_ort_peers_run_on_the_runs_calibration_images_and_are_named_after_their_tool(models, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--model", str(models / "float.onnx"), "--dataset", "digits", "--preprocess", "digits",
                 "--weight-bits", "8", "--also", "ort-qdq", "ort-qop", "--eval-size", "300", "--no-timing",
                 "--no-progress", "--quiet", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["configs"] == ["float", "a8w8", "ort-qdq", "ort-qop"]
    assert {run["descriptors"][n]["kind"] for n in ("ort-qdq", "ort-qop")} == {"peer"}
    rows = {r["config"]: r for r in json.loads((out / "metrics.json").read_text())["runs"][0]["configs"]}
    assert rows["ort-qdq"]["swapped"] < 0.2 and rows["ort-qop"]["swapped"] < 0.2
    assert "ort-qdq" in (out / "metrics.csv").read_text()
