"""Models users bring with other inputs: NHWC, uint8 pixels normalised in the graph, open sizes.

The truth is the NCHW float model they were made from: fed by ptqcal as each one declares, every
variant must give its logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_variants import input_variant
from ptqcal.models import PreprocessOverrides, inspect_onnx, onnx_preprocess
from ptqcal.models.preprocess import DIGITS_PREPROCESS

VARIANTS = {  # name: (graph edits, what ptqcal is told)
    "nhwc_float": (dict(layout="NHWC"), dict(preset="digits")),
    "nhwc_uint8": (dict(layout="NHWC", pixels=(16.0, 0.3, 0.4)), dict(resize=0)),
    "nchw_uint8": (dict(pixels=(16.0, 0.3, 0.4)), dict(resize=0)),
    "nchw_open_size": (dict(open_size=True), dict(preset="digits", input_size=(8,))),
}


@pytest.fixture(scope="module")
def variants(digits_onnx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants")
    return {name: input_variant(digits_onnx, folder / f"{name}.onnx", **edits)
            for name, (edits, _) in VARIANTS.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_each_input_gets_the_float_models_logits(name, variants, digits_onnx, digits):
    from ptqcal.evaluate import make_session, predict

    told = VARIANTS[name][1]
    info = inspect_onnx(variants[name])
    preprocess = onnx_preprocess(info, PreprocessOverrides(resize=told.get("resize"),
                                                           input_size=told.get("input_size")), told.get("preset"))
    assert preprocess.layout == ("NHWC" if "nhwc" in name else "NCHW")
    assert preprocess.dtype == ("uint8" if "uint8" in name else "float32")
    images = digits.eval.images[:100]  # whole-number pixels 0..16, as float
    expected = predict(make_session(digits_onnx), images, 32, progress=False, transform=DIGITS_PREPROCESS)
    got = predict(make_session(variants[name]), images, 32, progress=False, transform=preprocess)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_uint8_model_refuses_pixels_that_are_not_whole_bytes(variants):
    preprocess = onnx_preprocess(inspect_onnx(variants["nhwc_uint8"]), PreprocessOverrides(resize=0))
    with pytest.raises(ValueError, match="whole numbers in 0..255"):
        preprocess(np.full((2, 8, 8), 0.5, np.float32))


@pytest.mark.slow
def test_run_on_nhwc_uint8_model_matches_the_registry_model(variants, tmp_path):
    """The whole sweep on a TFLite-style model: the float top-1 is the NCHW model's, a8w8 runs on
    integer kernels, and the report says what input was detected."""
    from ptqcal.cli import main

    common = ["run", "--no-progress", "--quiet", "--weight-bits", "8", "--dataset", "digits"]
    assert main([*common, "--model", str(variants["nhwc_uint8"]), "--resize", "0", "--out", str(tmp_path / "v")]) == 0
    assert main([*common, "--model", "digits_resnet8", "--out", str(tmp_path / "r")]) == 0
    metrics = {k: {c["config"]: c for c in json.loads((tmp_path / k / "metrics.json").read_text())["runs"][0]["configs"]}
               for k in "vr"}
    assert metrics["v"]["float"]["top1_error"] == metrics["r"]["float"]["top1_error"]
    assert metrics["v"]["a8w8"]["top1_error"] == pytest.approx(metrics["r"]["a8w8"]["top1_error"], abs=0.01)
    header = json.loads((tmp_path / "v" / "metrics.json").read_text())["runs"][0]["run"]
    assert header["preprocessing"] == "8x8, grayscale uint8 pixels in NHWC (the graph normalises them)"
    assert "uint8 pixels in NHWC" in (tmp_path / "v" / "report.md").read_text()
