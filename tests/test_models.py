"""The registry's real models on the real data in ../shared, and users' own ONNX classifiers."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ptqcal.cli import main
from ptqcal.errors import InputError
from ptqcal.models import get_model_entry, list_models

from conftest import SHARED, shared_file
from test_without_torch import BLOCK_TORCH

torch = pytest.importorskip("torch")


def test_registry_lists_the_papers_models():
    for name in ("digits_resnet8", "cifar_resnet20", "cifar_resnet56", "resnet50", "mobilenet_v2",
                 "efficientnet_lite0"):
        assert name in list_models()
    assert get_model_entry("resnet18").num_classes == 1000  # any torchvision classifier by name
    with pytest.raises(InputError, match="unknown model"):
        get_model_entry("resnet_9000")


def test_authors_resnet20_loads_strictly_and_its_onnx_export_predicts_like_pytorch(tmp_path):
    from ptqcal.evaluate import make_session, predict
    from ptqcal.export import export_onnx

    entry = get_model_entry("cifar_resnet20")
    model = entry.build(shared_file("models/cifar100_resnet20.pth"), None, tmp_path)
    test = np.load(shared_file("data/cifar100/test_head20.npz"))
    inputs = entry.preprocess(test["images"])
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(inputs)).numpy()
    path = export_onnx(model, inputs, tmp_path / "resnet20.onnx").path
    onnx_logits = predict(make_session(path), inputs, progress=False)
    np.testing.assert_array_equal(onnx_logits.argmax(1), torch_logits.argmax(1))
    assert np.mean(onnx_logits.argmax(1) == test["labels"]) >= 0.6  # a trained model, not noise


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    bad = tmp_path / "bad.pth"
    state = get_model_entry("cifar_resnet20").build(shared_file("models/cifar100_resnet20.pth"), None,
                                                    tmp_path).state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, bad)
    with pytest.raises(InputError, match=r"missing: fc\.weight; unexpected: extra\.weight"):
        get_model_entry("cifar_resnet20").build(bad, None, tmp_path)


def test_weights_of_another_shape_are_named(tmp_path):
    from ptqcal.models import load_state_dict_strict
    from ptqcal.models.resnet import CifarResNet

    path = tmp_path / "ten.pth"
    torch.save(CifarResNet(20, 10).state_dict(), path)
    with pytest.raises(InputError, match=r"wrong shape: fc\.bias, fc\.weight"):
        load_state_dict_strict(CifarResNet(20, 100), path)


@pytest.mark.slow
def test_efficientnet_lite0_on_the_real_imagenet_samples(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from ptqcal.data import decode_images, load_csv
    from ptqcal.evaluate import make_session, predict
    from ptqcal.export import export_onnx

    entry = get_model_entry("efficientnet_lite0")
    split = load_csv(shared_file("data/imagenet_samples/labels.csv"))
    decoded, failed = decode_images(split, entry.preprocess.input_size, entry.preprocess.resize)
    assert not failed and len(decoded) == 270
    path = export_onnx(entry.build(None, None, tmp_path), entry.preprocess(decoded.images[:8]),
                       tmp_path / "lite0.onnx").path
    logits = predict(make_session(path), decoded.images, 64, progress=False, transform=entry.preprocess)
    top1 = float(np.mean(logits.argmax(1) == decoded.labels))
    print(f"EfficientNet-Lite0 float top-1 on the 270 ImageNet samples: {100 * top1:.1f}%")
    assert top1 > 0.70


def _imagenet_folder(tmp_path, per_class=4):
    """A folder dataset of real ImageNet images: three classes as sub-folders."""
    images = sorted((SHARED / "data/imagenet_samples/images").glob("n*.jpg"))
    if len(images) < 3 * per_class:
        pytest.skip("real ImageNet samples not available")
    root = tmp_path / "images"
    for index, path in enumerate(images[:3 * per_class]):
        folder = root / f"class{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    return root


@pytest.mark.slow
def test_torchvision_resnet18_round_trip_from_a_folder(tmp_path, capsys):
    root = _imagenet_folder(tmp_path)
    out = tmp_path / "run"
    code = main(["run", "--model", "resnet18", "--weights", "random", "--dataset", "folder", "--data-dir",
                 str(root), "--calib-size", "4", "--weight-bits", "8", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert [row["config"] for row in run["configs"]] == ["float", "a8w8"]
    assert "4 (seed 0, held out of the evaluation split)" in run["run"]["calibration images"]
    assert np.load(out / "logits.npz")["float"].shape == (8, 1000)


@pytest.mark.slow
def test_users_onnx_classifier_from_the_cli_without_torch(tmp_path):
    from ptqcal.export import export_onnx
    from torchvision.models import mobilenet_v3_small

    root = _imagenet_folder(tmp_path)
    torch.manual_seed(0)
    model = export_onnx(mobilenet_v3_small(num_classes=3).eval(), np.zeros((1, 3, 160, 160), np.float32),
                        tmp_path / "user.onnx").path
    out = tmp_path / "run"
    code = BLOCK_TORCH + f"""
from ptqcal.cli import main
code = main(["run", "--model", {str(model)!r}, "--dataset", "folder", "--data-dir", {str(root)!r},
             "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--resize", "180", "--calib-size", "4",
             "--weight-bits", "8", "--out", {str(out)!r}, "--no-progress"])
assert "torch" not in sys.modules
sys.exit(code)
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    run = json.loads((out / "metrics.json").read_text())["runs"][0]["run"]
    assert "resize 180 + centre crop 160x160" in run["preprocessing"] and "[0.5, 0.5, 0.5]" in run["preprocessing"]
