"""Peer toolchains on a tiny classifier: close to float, what the census says, the same bytes twice,
nothing left behind; the weight-only peers refuse a model without MatMul/Gemm weights."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import save_classifier, tiny_onnx_classifier
from ptqcal.quantize.calibrate import ArrayDataReader
from ptqcal.quantize.census import graph_census
from ptqcal.quantize.peers import PEERS, Peer, PeerError, gemms_as_matmuls, run_peer

CLASSES = 10
FORMATS = {"ort-qdq": "qdq", "ort-qop": "qoperator", "nncf": "qdq", "nncf-fbc": "qdq",
           **{name: "weight-only (MatMulNBits)" for name in PEERS if name.startswith("nbits-")}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from ptqcal.quantize.qdq import prepare

    folder = tmp_path_factory.mktemp("peers_input")
    prepare(tiny_onnx_classifier(folder / "tiny.onnx", classes=CLASSES), folder / "prepared.onnx")
    return folder / "prepared.onnx"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(48, 1, 8, 8)).astype(np.float32), rng.normal(size=(200, 1, 8, 8)).astype(np.float32)


def _logits(path, batch):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0]


def test_registry_describes_every_peer():
    assert set(PEERS) == {"ort-qdq", "ort-qop", "nbits-rtn-b32", "nbits-rtn-b128", "nbits-hqq-b32",
                          "nbits-hqq-b128", "nncf", "nncf-fbc"}
    assert all(peer.name == name and peer.description for name, peer in PEERS.items())
    assert PEERS["nncf"].extra == "nncf" and "torch" in PEERS["nbits-hqq-b32"].modules


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_is_close_to_float_and_deterministic(name, prepared, data, tmp_path, monkeypatch):
    peer = PEERS[name]
    if peer.unavailable():
        pytest.skip(peer.unavailable())
    calibration, evaluation = data
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # whatever a peer puts in $TMPDIR lands here
    before = sorted(os.listdir(prepared.parent))
    reader = ArrayDataReader("input", calibration, 16)  # one reader for both runs: each peer rewinds it
    first = run_peer(name, prepared, reader, tmp_path / "out" / "first.onnx")
    second = run_peer(name, prepared, reader, tmp_path / "out" / "second.onnx")
    assert first.read_bytes() == second.read_bytes()
    assert sorted(os.listdir(tmp_path / "out")) == ["first.onnx", "second.onnx"]
    assert os.listdir(private_tmp) == [] and sorted(os.listdir(prepared.parent)) == before
    reference, logits = _logits(prepared, evaluation), _logits(first, evaluation)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.95
    assert np.abs(logits - reference).max() < 0.25 * np.abs(reference).max()
    census = graph_census(first)
    assert census.format == FORMATS[name]
    if name.startswith("nbits-"):
        block = int(name.rsplit("-b", 1)[1])
        assert census.weight_only_blocks == {f"4-bit, block {block}": 1}  # the head; the Conv stays float
        assert census.float_ops.get("Conv") == 1 and not census.activations_quantized
    else:
        assert census.activations_quantized


def test_nbits_refuses_a_conv_only_model(tmp_path):
    peer = PEERS["nbits-rtn-b32"]
    if peer.unavailable():
        pytest.skip(peer.unavailable())
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.normal(size=(CLASSES, 1, 8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv"]), helper.make_node("Flatten", ["conv"], ["logits"])]
    conv_only = save_classifier(tmp_path / "conv_only.onnx", "conv_only", nodes, [weight], CLASSES)
    with pytest.raises(PeerError) as caught:
        run_peer("nbits-rtn-b32", conv_only, ArrayDataReader("input", np.zeros((2, 1, 8, 8), np.float32)),
                 tmp_path / "out.onnx")
    assert str(caught.value) == ("conv_only.onnx has no MatMul/Gemm weights; ORT's weight-only int4 covers only "
                                 "those")
    assert not (tmp_path / "out.onnx").exists()


def test_gemm_rewritten_as_matmul_computes_the_same(prepared, data, tmp_path):
    model = onnx.load(str(prepared))
    assert gemms_as_matmuls(model) == 1
    assert [n.op_type for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Add")] == ["MatMul", "Add"]
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    np.testing.assert_allclose(_logits(tmp_path / "matmul.onnx", data[1]), _logits(prepared, data[1]),
                               rtol=1e-5, atol=1e-5)


def test_unknown_and_unavailable_peers_are_one_line(prepared, tmp_path):
    with pytest.raises(PeerError, match="no peer toolchain is called 'tflite'"):
        run_peer("tflite", prepared, None, tmp_path / "out.onnx")
    absent = Peer("absent", "needs a module that is not installed", lambda *a: None, ("no_such_module_ptqcal",),
                  "absent")
    assert absent.unavailable() == ("peer absent is unavailable: it needs no_such_module_ptqcal "
                                    "(pip install 'ptqcal[absent]')")
    with pytest.raises(PeerError):
        absent(prepared, None, tmp_path / "out.onnx")


def test_nncf_import_leaves_telemetry_off_and_nothing_behind(tmp_path):
    """In a fresh interpreter (NNCF switches telemetry off by itself under pytest): no NNCF_CI left in
    the environment, NNCF's telemetry a stub, and no openvino_telemetry files in $HOME."""
    if PEERS["nncf"].unavailable():
        pytest.skip(PEERS["nncf"].unavailable())
    env = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "NNCF_DEV", "CI")}
    env["HOME"] = str(tmp_path)
    code = ("import os; from ptqcal.quantize.peers import _import_nncf; _import_nncf(); "
            "from nncf.telemetry import decorator, wrapper; from unittest.mock import MagicMock; "
            "assert 'NNCF_CI' not in os.environ; "
            "assert isinstance(decorator.telemetry, MagicMock) and isinstance(wrapper.telemetry, MagicMock)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300, capture_output=True)
    assert os.listdir(tmp_path) == []
