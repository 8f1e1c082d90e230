"""Corruptions as an axis of ``ptqcal run`` (``--corruptions``, ``--severities``, ``--calib-corruption``):
checked against ImageNet-C's published contrast formula run through a bare ONNX Runtime session,
against the clean run, and against a model that cannot see its input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import save_classifier
from ptqcal.cli import main
from ptqcal.evaluate.record import RunRecord

pytest.importorskip("imagecorruptions", reason="the [shift] extra (installed by [test]) is not installed")

CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # ImageNet-C's contrast factor per severity (Hendrycks & Dietterich)


def _classifier(path: Path, seed: int = 0, blind: bool = False, size: int = 32, stride: int = 1) -> Path:
    """Conv-Relu-GlobalAveragePool-Gemm on (N, 3, size, size); ``blind``: the input is multiplied by 0 first."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "conv_b"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "fc_b"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    first = [helper.make_node("Mul", ["input", "zero"], ["seen"])] if blind else []
    nodes = [*first, helper.make_node("Conv", ["seen" if blind else "input", "conv_w", "conv_b"], ["conv"],
                                      pads=[1, 1, 1, 1], **({"strides": [stride] * 2} if stride > 1 else {})),
             helper.make_node("Relu", ["conv"], ["relu"]), helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]
    return save_classifier(path, "shift", nodes, inits, 4, ("N", 3, size, size))


@pytest.fixture(scope="module")
def shift_files(tmp_path_factory):
    """A classifier, a blind one, and 40 evaluation + 24 calibration smooth 32-pixel RGB images."""
    folder = tmp_path_factory.mktemp("shift")
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (64, 8, 8, 3)).astype(np.uint8)
    images = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)  # blocks: corruptions have structure to act on
    np.savez(folder / "data.npz", images=images[:40], labels=rng.integers(0, 4, 40),
             calib_images=images[40:], calib_labels=rng.integers(0, 4, 24))
    return _classifier(folder / "model.onnx"), _classifier(folder / "blind.onnx", blind=True), folder / "data.npz"


def _run(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["run", "--model", str(model), "--dataset", str(data), "--preprocess", "unit", "--weight-bits", "8",
                 "4", "--out", str(out), "--no-progress", "--no-timing", "--check-images", "0", *extra])


def test_every_configuration_runs_on_every_cell_and_the_clean_numbers_stay(shift_files, tmp_path, capsys):
    model, _, data = shift_files
    assert _run(model, data, tmp_path / "clean", "--quiet") == 0
    cells = ["--corruptions", "contrast", "gaussian_noise", "--severities", "1", "3"]
    assert _run(model, data, tmp_path / "shift", *cells, "--quiet") == 0
    clean, shifted = RunRecord.load(tmp_path / "clean"), RunRecord.load(tmp_path / "shift")
    assert clean.logits.keys() == shifted.logits.keys()
    for name in clean.logits:  # the corruptions change nothing of the clean evaluation
        np.testing.assert_array_equal(clean.logits[name], shifted.logits[name])
    clean_rows = json.loads((tmp_path / "clean" / "metrics.json").read_text())["runs"][0]["configs"]
    assert json.loads((tmp_path / "shift" / "metrics.json").read_text())["runs"][0]["configs"] == clean_rows
    assert list(shifted.shifted) == ["contrast@1", "contrast@3", "gaussian_noise@1", "gaussian_noise@3"]
    assert all(list(cell) == ["float", "a8w8", "a8w4"] for cell in shifted.shifted.values())

    # the float model's logits under contrast@3: ImageNet-C's formula, by hand, through a bare session
    import onnxruntime as ort

    pixels = np.load(data)["images"][:40].astype(np.float64) / 255
    means = pixels.mean(axis=(1, 2), keepdims=True)
    corrupted = (np.clip((pixels - means) * CONTRAST[2] + means, 0, 1) * 255).astype(np.uint8)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": (corrupted / np.float32(255)).astype(np.float32).transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(shifted.shifted["contrast@3"]["float"], expected, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(shifted.shifted["gaussian_noise@3"]["float"], clean.logits["float"])

    # the same command again: nothing is recomputed; into a new folder: the same noise, bit for bit
    capsys.readouterr()
    assert _run(model, data, tmp_path / "shift", *cells) == 0
    assert "0 computed" in capsys.readouterr().out
    assert _run(model, data, tmp_path / "again", *cells, "--quiet") == 0
    again = RunRecord.load(tmp_path / "again")
    for cell, logits in shifted.shifted.items():
        for name, values in logits.items():
            np.testing.assert_array_equal(values, again.shifted[cell][name])


def test_a_model_that_cannot_see_the_corruption_changes_nothing_under_it(shift_files, tmp_path):
    _, blind, data = shift_files
    assert _run(blind, data, tmp_path / "run", "--corruptions", "brightness", "--severities", "1", "--quiet") == 0
    record = RunRecord.load(tmp_path / "run")
    for name, values in record.shifted["brightness@1"].items():
        np.testing.assert_array_equal(values, record.logits[name])
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["runs"][0]["shift"]
    assert {(r["config"], r["corruption"], r["severity"]) for r in rows} == \
        {(name, "brightness", 1) for name in ("float", "a8w8", "a8w4")}
    for row in rows:  # nothing changed: no swap, no drop from clean
        assert row["top1_error_vs_clean"] == 0 and row["ece_vs_clean"] == 0
        assert row["config"] == "float" or row["swapped_vs_clean"] == 0


def test_calibrating_under_a_corruption_sets_the_ranges_from_the_corrupted_images(shift_files, tmp_path):
    """With min/max ranges, the input's QuantizeLinear scale is the largest corrupted calibration
    pixel over 255 (uint8 activations; the range includes 0): contrast shrinks it."""
    import onnx

    model, _, data = shift_files
    assert _run(model, data, tmp_path / "run", "--calib-corruption", "contrast@5", "--calib-method", "minmax",
                "--weight-bits", "8", "--quiet") == 0
    record = RunRecord.load(tmp_path / "run")
    twin = record.descriptors["a8w8-cal-contrast-s5"]
    assert (twin.kind, twin.weight_bits, twin.act_bits, twin.calibrated_on) == ("uniform", 8, 8, "contrast@5")
    assert record.descriptors["a8w8"].calibrated_on is None

    def input_scale(path: Path) -> float:
        graph = onnx.load(str(path)).graph
        node = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        return float(next(numpy_helper.to_array(i) for i in graph.initializer if i.name == node.input[1]))

    calib = np.load(data)["calib_images"].astype(np.float64) / 255
    means = calib.mean(axis=(1, 2), keepdims=True)
    corrupted = (np.clip((calib - means) * CONTRAST[4] + means, 0, 1) * 255).astype(np.uint8)
    assert input_scale(tmp_path / "run" / "model_a8w8-cal-contrast-s5.onnx") == pytest.approx(
        corrupted.max() / 255 / 255, rel=1e-6)
    assert input_scale(tmp_path / "run" / "model_a8w8.onnx") == pytest.approx(np.load(data)["calib_images"].max()
                                                                              / 255 / 255, rel=1e-6)


def test_images_a_corruption_cannot_take_are_one_line_before_any_work(tmp_path, capsys):
    from conftest import tiny_onnx_classifier

    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)  # 8x8 gray
    args = ["run", "--model", str(model), "--dataset", "digits", "--preprocess", "digits", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--corruptions", "fog"]) == 2
    assert main([*args, "--out", str(tmp_path / "b"), "--calib-corruption", "fog@2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("at least 32x32 pixels" in line and "8x8" in line for line in lines)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_without_the_extra_a_corruption_is_one_line(shift_files, tmp_path):
    model, _, data = shift_files
    code = f"""
import sys
sys.modules["imagecorruptions"] = None  # as if the [shift] extra were not installed
from ptqcal.cli import main
sys.exit(main(["run", "--model", {str(model)!r}, "--dataset", {str(data)!r}, "--preprocess", "unit",
               "--out", {str(tmp_path / "run")!r}, "--no-progress", "--corruptions", "fog"]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "ptqcal: error: corruptions need the optional extra: pip install 'ptqcal[shift]'"
    assert not (tmp_path / "run").exists()


def test_corrupted_evaluation_streams_in_chunks_and_never_holds_the_set(tmp_path, monkeypatch):
    """2,000 gray 64x64 images (31 MB as float32) corrupted in chunks of 250 and evaluated in batches
    of 50: numpy allocates (tracemalloc sees it) a small fraction of the set, and the logits are a bare
    session's on the whole corrupted set."""
    import tracemalloc

    from conftest import tiny_onnx_classifier
    from onnx_variants import input_variant
    from ptqcal.cache import Cache
    from ptqcal.config import RunConfig
    from ptqcal.data import Pixels, Split
    from ptqcal.data import pixels as P
    from ptqcal.data.corrupt import Corruption, corrupt_pixels
    from ptqcal.evaluate import make_session, predict
    from ptqcal.models import PreprocessCfg
    from ptqcal.steps import model_logits

    monkeypatch.setattr(P, "CHUNK_BYTES", 64 * 64 * 250)
    model = input_variant(tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10), tmp_path / "open.onnx",
                          open_size=True)
    preprocess = PreprocessCfg((1, 64, 64), (0.5,), (0.25,))
    images = np.random.default_rng(0).integers(0, 256, (2000, 64, 64), dtype=np.uint8)
    contrast = Corruption("contrast", 1)
    pixels = Pixels(Split(images, np.zeros(2000, np.int64)), preprocess, Cache(tmp_path / "cache")).corrupted(contrast, 0)
    tracemalloc.start()
    try:
        logits = model_logits(Cache(tmp_path / "cache"), model, pixels, preprocess, RunConfig(batch_size=50,
                                                                                              progress=False), "float")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = images.size * 4
    assert peak < whole / 5, f"peak {peak / 2**20:.1f} MiB for a {whole / 2**20:.1f} MiB evaluation set"
    corrupted = corrupt_pixels(images, contrast, 0, np.arange(2000))
    expected = predict(make_session(model), corrupted, 2000, progress=False, transform=preprocess)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
