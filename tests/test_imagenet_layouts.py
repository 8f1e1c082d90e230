"""EfficientNet-Lite0 as users' toolchains hand it over, on the real ImageNet samples of ../shared.

The registry model (NCHW float, exported by ptqcal) is the truth; the same weights exported three
other ways must reach the same float top-1 (within one image) with the flags the README gives:
NHWC float (``--preprocess tf``), NHWC uint8 that normalises inside its graph (``--resize 256``)
and NCHW with open height and width (``--preprocess tf --input-size 224``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

VARIANTS = {  # name: (the flags a user gives, as RunConfig fields)
    "nhwc_float": dict(preprocess="tf"),
    "nhwc_uint8": dict(resize=256),
    "nchw_open_size": dict(preprocess="tf", input_size=(224,)),
}


class _Variant(torch.nn.Module):
    """The registry model behind another input: NHWC, and/or raw uint8 pixels normalised in the
    graph as EfficientNet-Lite expects ((x - 127) / 128)."""

    def __init__(self, model: torch.nn.Module, nhwc: bool, pixels: bool):
        super().__init__()
        self.model, self.nhwc, self.pixels = model, nhwc, pixels

    def forward(self, x):
        if self.pixels:
            x = (x.float() - 127.0) / 128.0
        return self.model(x.permute(0, 3, 1, 2) if self.nhwc else x)


def _export(model, name: str, path: Path) -> Path:
    nhwc, pixels = name.startswith("nhwc"), name.endswith("uint8")
    shape = (1, 224, 224, 3) if nhwc else (1, 3, 224, 224)
    example = torch.zeros(shape, dtype=torch.uint8 if pixels else torch.float32)
    axes = {0: "batch"} if name != "nchw_open_size" else {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Variant(model, nhwc, pixels).eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": axes, "scores": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ptqcal.config import RunConfig
    from ptqcal.models import get_model_entry

    labels = shared_file("data/imagenet_samples/labels.csv")
    folder = tmp_path_factory.mktemp("lite0")
    model = get_model_entry("efficientnet_lite0").build(None, None, folder).eval()
    files = {name: _export(model, name, folder / f"{name}.onnx") for name in VARIANTS}
    base = RunConfig(dataset="csv", data_dir=labels, progress=False, quiet=True, calib_size=16)
    return base, files, folder


def _float_top1(cfg, cache_dir: Path) -> tuple[float, int]:
    from ptqcal import steps
    from ptqcal.cache import Cache

    cache = Cache(cache_dir)
    dataset = steps.load_run_dataset(cfg)
    model = steps.prepare_model(cfg, dataset, cache)
    images = steps.draw_images(dataset, cfg, model.preprocess, cache)
    logits = steps.model_logits(cache, model.float_path, images.eval, model.preprocess, cfg, "float")
    labels = images.eval.labels
    return float(np.mean(logits.argmax(1) == labels)), len(labels)


def test_three_exports_match_the_registry_model(setup):
    base, files, folder = setup
    truth, count = _float_top1(replace(base, model="efficientnet_lite0"), folder / "cache")
    assert count == 254 and truth > 0.8  # 270 samples, 16 held out for calibration
    for name, flags in VARIANTS.items():
        top1, n = _float_top1(replace(base, model=str(files[name]), **flags), folder / "cache")
        assert n == count
        assert abs(top1 - truth) * count <= 1, (name, top1, truth)


def test_uint8_nhwc_model_runs_the_sweep_on_integer_kernels(setup, tmp_path):
    from ptqcal.cli import main
    from ptqcal.evaluate.runner import optimized_op_types

    _, files, _ = setup
    labels = shared_file("data/imagenet_samples/labels.csv")
    out = tmp_path / "run"
    assert main(["run", "--model", str(files["nhwc_uint8"]), "--dataset", "csv", "--data-dir", str(labels),
                 "--resize", "256", "--weight-bits", "8", "--calib-size", "32", "--check-images", "16",
                 "--no-progress", "--quiet", "--out", str(out)]) == 0
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert run["run"]["preprocessing"] == "resize 256 + centre crop 224x224, RGB uint8 pixels in NHWC " \
                                          "(the graph normalises them)"
    configs = {c["config"]: c for c in run["configs"]}
    assert configs["float"]["top1_error"] < 0.2 and configs["a8w8"]["top1_error"] < 0.3
    assert "QLinearConv" in optimized_op_types(out / "model_a8w8.onnx", tmp_path)
