"""The command line: help, one-line errors with exit code 2, and the main job end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ptqcal.cli import build_parser, main

from conftest import tiny_onnx_classifier

DIGITS = ("--dataset", "digits", "--preprocess", "digits")  # a user's .onnx model says what it evaluates on


def _run_tiny(tmp_path: Path, out_name: str, *args: str) -> tuple[int, Path]:
    """`ptqcal run` of a 10-class tiny ONNX classifier on the digits, into tmp_path / out_name."""
    pytest.importorskip("sklearn")
    model = tmp_path / "tiny.onnx"
    if not model.exists():
        tiny_onnx_classifier(model, classes=10)
    out = tmp_path / out_name
    return main(["run", "--model", str(model), "--out", str(out), "--no-progress", *DIGITS, *args]), out


def _run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_help_explains_every_run_option():
    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for option in ("--model", "--weights", "--dataset", "--weight-bits", "--act-bits", "--calib-size",
                   "--calib-method", "--out", "--seed", "--cache-dir"):
        assert option in text
    completed = subprocess.run([sys.executable, "-m", "ptqcal", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0 and "run" in completed.stdout


def _conv_only_model(path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [1.0, 2.0])
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "not-onnx", "bad-output", "bad-bits", "bad-method",
                                  "bad-calib-size", "labels-out-of-range", "bad-npz"])
def test_user_errors_are_one_line_exit_2_and_leave_nothing(case, tmp_path, capsys):
    out = tmp_path / "runs" / "r"
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    args = {
        "missing": ["--model", str(tmp_path / "nope.onnx")],
        "not-onnx": ["--model", str(junk)],
        "bad-output": ["--model", str(_conv_only_model(tmp_path / "conv.onnx"))],
        "bad-bits": ["--weight-bits", "8", "9"],
        "bad-method": ["--calib-method", "kl"],
        "bad-calib-size": ["--model", str(tiny_onnx_classifier(tmp_path / "t.onnx", classes=10)), *DIGITS,
                           "--calib-size", "100000"],
        "labels-out-of-range": ["--model", str(tiny_onnx_classifier(tmp_path / "t5.onnx", classes=5)), *DIGITS],
        "bad-npz": ["--model", str(tiny_onnx_classifier(tmp_path / "t.onnx")), "--dataset", str(junk) + ".npz"],
    }[case]
    if case in ("bad-calib-size", "labels-out-of-range"):
        pytest.importorskip("sklearn")
    code, err = _run_cli(["run", "--out", str(out), "--no-progress", *args], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ptqcal"), err
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_refuses_to_overwrite_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code, err = _run_cli(["run", "--out", str(tmp_path)], capsys)
    assert code == 2 and "ptqcal did not make it" in err[0]
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_default_run_end_to_end(default_run):
    out = default_run.out
    assert default_run.code == 0
    assert default_run.printed.strip().endswith(f"report: {out / 'report.md'}")
    assert default_run.calibrations == 2, "one calibration pass per model, reused for every bit width"
    for name in ("report.md", "report.html", "metrics.csv", "metrics.json", "fig1_reliability.png",
                 "fig1_reliability.svg", "fig2_swaps.png", "fig3_transitions.png", "fig4_margin.png",
                 "fig5_temperature.png"):
        assert (out / name).stat().st_size > 0, name
    for model in ("digits_resnet8", "digits_resnet8_ls"):
        for name in ("report.md", "logits.npz", "run.json", "calibration_ranges_a8.json", "model_float.onnx",
                     "model_a8w8.onnx", "model_a8w4.onnx"):
            assert (out / model / name).stat().st_size > 0, f"{model}/{name}"
    report = (out / "report.md").read_text()
    assert "## Comparison" in report and "fig2_swaps.png" in report
    runs = {run["model"]: run for run in json.loads((out / "metrics.json").read_text())["runs"]}
    assert set(runs) == {"digits_resnet8", "digits_resnet8_ls"}
    plain = {row["config"]: row for row in runs["digits_resnet8"]["configs"]}
    assert list(plain) == ["float", "a8w8", "a8w7", "a8w6", "a8w5", "a8w4"]
    logits = np.load(out / "digits_resnet8" / "logits.npz")
    labels = logits["labels"]
    # the saved metrics are those of the saved logits (checked independently of the pipeline)
    for name, row in plain.items():
        assert row["top1_error"] == pytest.approx(np.mean(logits[name].argmax(1) != labels))
    swapped = np.mean(logits["a8w4"].argmax(1) != logits["float"].argmax(1))
    assert plain["a8w4"]["swapped"] == pytest.approx(swapped)
    # the built-in model is what the issue asks for: wrong on a few % and overconfident
    assert 0.01 < plain["float"]["top1_error"] < 0.08
    assert plain["float"]["mean_confidence"] > 1 - plain["float"]["top1_error"]
    # label smoothing 0.1 makes the same network underconfident on this data
    smoothed = {row["config"]: row for row in runs["digits_resnet8_ls"]["configs"]}
    assert smoothed["float"]["mean_confidence"] < 1 - smoothed["float"]["top1_error"]
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]


@pytest.mark.slow
def test_fp16_activation_sweep_and_layer_choices(tmp_path, capsys):
    import onnx

    code, out = _run_tiny(tmp_path, "run", "--calib-size", "64", "--precisions", "fp16", "--weight-bits", "8", "3",
                          "--act-bits", "8", "4", "--skip-last-layer", "--execution", "simulated")
    assert code == 0, capsys.readouterr().err
    configs = [row["config"] for row in json.loads((out / "metrics.json").read_text())["runs"][0]["configs"]]
    assert configs == ["float", "fp16", "a8w8", "a8w3", "a4w8", "a4w3"]
    fp16 = onnx.load(str(out / "model_fp16.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    quantized = onnx.load(str(out / "model_a8w8.onnx"))
    gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
    initializers = {i.name for i in quantized.graph.initializer}
    assert gemm.input[1] in initializers, "the skipped last layer keeps its float weight"
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    assert conv.input[1] not in initializers, "the first layer is still quantized"
    assert (out / "calibration_ranges_a4.json").exists() and (out / "calibration_ranges_a8.json").exists()
    report = (out / "report.md").read_text()
    assert "simulated path" in report and "Kept in float" in report


def test_exclude_names_must_exist(tmp_path, capsys):
    pytest.importorskip("sklearn")
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    code, err = _run_cli(["run", "--model", str(model), "--out", str(tmp_path / "r"), "--no-progress", *DIGITS,
                          "--calib-size", "32", "--exclude", "no_such_node"], capsys)
    assert code == 2 and "no_such_node" in err[0] and len(err) == 1
    assert not (tmp_path / "r").exists()


def test_config_file_sets_options_and_the_command_line_wins(tmp_path, monkeypatch):

    from ptqcal import cli

    seen = {}
    monkeypatch.setattr("ptqcal.pipeline.run_models",
                        lambda cfg, models: seen.update(cfg=cfg, models=models) or tmp_path / "r.md")
    monkeypatch.setenv("MY_DATA", str(tmp_path / "data.npz"))
    config = tmp_path / "c.toml"
    config.write_text('weight-bits = [6, 5]\ncalib_size = 32\ndataset = "${MY_DATA}"\nmean = [0.5]\n'
                      'weights = "${NOT_SET_ANYWHERE}"\nskip-first-layer = true\n')
    assert cli.main(["run", "--config", str(config), "--calib-size", "16"]) == 0
    cfg = seen["cfg"]
    assert cfg.weight_bits == (6, 5) and cfg.calib_size == 16 and cfg.dataset == str(tmp_path / "data.npz")
    assert cfg.mean == (0.5,) and cfg.weights is None and cfg.skip_first_layer
    assert seen["models"] == ["digits_resnet8", "digits_resnet8_ls"]


@pytest.mark.parametrize("text, message", [("bogus = 1\n", "unknown setting 'bogus'"),
                                           ("weight-bits = [8\n", "not valid TOML"),
                                           ("calib-size = 'many'\n", "calib-size: invalid value 'many'"),
                                           ("seed = 1.5\n", "seed: invalid value 1.5"),
                                           ("calib-method = 'kl'\n", "choose minmax, mse, percentile, entropy")])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text)
    code, err = _run_cli(["run", "--config", str(config)], capsys)
    assert code == 2 and len(err) == 1 and message in err[0]


def test_shipped_configs_parse():
    from ptqcal.cli import build_parser
    from ptqcal.config import SHIPPED_CONFIGS, read_config_file

    run_options = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions}

    names = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.toml"))
    assert names == ["efficientnet_lite0_imagenet", "mobilenetv2_imagenet", "resnet20_cifar100",
                     "resnet50_imagenet", "resnet56_cifar100"]
    for name in names:
        values = read_config_file(name)
        assert values["calib_size"] == 1024 and values["calib_method"] == "mse"
        assert isinstance(values["weight_bits"], tuple)
        assert set(values) <= run_options


def test_a_folder_without_images_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    code, err = _run_cli(["run", "--model", str(tiny_onnx_classifier(tmp_path / "t.onnx")), "--dataset", "folder",
                          "--data-dir", str(tmp_path / "data"), "--preprocess", "unit", "--out", str(tmp_path / "r")],
                         capsys)
    assert code == 2 and len(err) == 1 and "no images" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_repeats_redraw_calibration_and_keep_the_evaluation_set(tmp_path, capsys):
    code, out = _run_tiny(tmp_path, "run", "--calib-size", "32", "--weight-bits", "8", "2", "--repeats", "3",
                          "--calib-method", "minmax")
    assert code == 0, capsys.readouterr().err
    logits = np.load(out / "logits.npz")
    assert {"a8w2", "a8w2#r1", "a8w2#r2"} <= set(logits.files)
    assert len(logits["a8w2#r2"]) == len(logits["float"])  # one evaluation set for every repeat
    ranges = [json.loads((out / f"calibration_ranges_a8{s}.json").read_text())["ranges"]
              for s in ("", "#r1", "#r2")]
    assert ranges[0] != ranges[1] != ranges[2], "each repeat calibrates on other images"
    assert " ± " in (out / "report.md").read_text()


def test_a_model_ending_in_softmax_is_evaluated_on_its_logits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import onnxruntime as ort
    from onnx import helper

    plain = tiny_onnx_classifier(tmp_path / "plain.onnx", classes=10)
    model = onnx.load(str(plain))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.output[0] = "scores"
    model.graph.node.append(helper.make_node("Softmax", ["scores"], ["logits"], axis=1))
    onnx.save(model, str(tmp_path / "softmax.onnx"))
    out = tmp_path / "run"
    code = main(["run", "--model", str(tmp_path / "softmax.onnx"), "--out", str(out), "--no-progress", *DIGITS,
                 "--calib-size", "32", "--weight-bits", "8"])
    assert code == 0, capsys.readouterr().err
    from ptqcal.data import load_digits
    from ptqcal.models.registry import DIGITS_PREPROCESS

    saved = np.load(out / "logits.npz")
    session = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    dataset = load_digits()
    expected = session.run(None, {"input": DIGITS_PREPROCESS(dataset.eval.images)})[0]
    np.testing.assert_allclose(saved["float"], expected, rtol=1e-5, atol=1e-5)  # logits, not probabilities
    assert "Softmax was removed" in (out / "report.md").read_text()


@pytest.mark.slow
def test_saved_ranges_are_reused_without_calibrating(tmp_path, capsys, monkeypatch):
    import ptqcal.quantize as quantize

    code, first = _run_tiny(tmp_path, "first", "--calib-size", "32", "--weight-bits", "8")
    assert code == 0
    monkeypatch.setattr(quantize, "collect_histograms", lambda *a, **k: pytest.fail("calibrated again"))
    saved = first / "calibration_ranges_a8.json"
    code, second = _run_tiny(tmp_path, "second", "--calib-size", "32", "--weight-bits", "8",
                             "--calib-ranges", str(saved))
    assert code == 0
    np.testing.assert_array_equal(np.load(first / "logits.npz")["a8w8"], np.load(second / "logits.npz")["a8w8"])
    capsys.readouterr()
    other = tiny_onnx_classifier(tmp_path / "other.onnx", classes=10)
    ranges = json.loads(saved.read_text())
    ranges["ranges"] = {"not_a_tensor": [0.0, 1.0]}
    (tmp_path / "bad.json").write_text(json.dumps(ranges))
    code, err = _run_cli(["run", "--model", str(other), "--out", str(tmp_path / "third"), "--no-progress",
                          *DIGITS, "--calib-ranges", str(tmp_path / "bad.json")], capsys)
    assert code == 2 and "do not fit this model" in err[0] and not (tmp_path / "third").exists()


def test_progress_bars_follow_the_terminal_and_tqdm_disable(monkeypatch):
    from tqdm.auto import tqdm

    from ptqcal.progress import bar_disabled

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert bar_disabled(False) is True
    assert tqdm(total=1, disable=bar_disabled(True)).disable  # pytest's stderr is no terminal: no bar
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar_disabled(True) is True


def test_a_model_with_open_height_and_width_runs_at_the_given_size(tmp_path, capsys):
    pytest.importorskip("sklearn")
    model = onnx.load(str(tiny_onnx_classifier(tmp_path / "fixed.onnx", classes=10)))
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.dim_param = name  # what an exporter with dynamic spatial axes writes
    onnx.save(model, str(tmp_path / "open.onnx"))
    out = tmp_path / "run"
    assert main(["run", "--model", str(tmp_path / "open.onnx"), "--out", str(out), "--no-progress", *DIGITS,
                 "--input-size", "8", "--weight-bits", "8", "--provider", "CPU"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "run.json").read_text())["run"]
    assert "8x8" in summary["preprocessing"] and "CPU execution provider" in summary["execution"]
    assert summary["weights"].endswith("scale convention 'torch'")  # the setting's value, not its enum
    fixed = tmp_path / "fixed_run"
    assert main(["run", "--model", str(tmp_path / "fixed.onnx"), "--out", str(fixed), "--no-progress", *DIGITS,
                 "--weight-bits", "8"]) == 0
    np.testing.assert_array_equal(np.load(out / "logits.npz")["float"], np.load(fixed / "logits.npz")["float"])


def test_every_path_is_made_absolute_before_it_leaves_the_driver(tmp_path, monkeypatch):
    """A Ray worker runs in another directory: the run's paths, the default --out included, are
    absolute before any task sees them; 'random' weights stay a keyword; names stay literal."""
    from pathlib import Path

    from ptqcal.config import RunConfig
    from ptqcal.models import RANDOM_WEIGHTS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.onnx").write_bytes(b"")
    cfg = RunConfig(model="m.onnx", data_dir=Path("data"), calib_data=Path("calib"), dataset="set.npz",
                    quantized=("vendor=q.onnx", "q.onnx"), weights=RANDOM_WEIGHTS).resolved()
    assert cfg.out == tmp_path / "ptqcal_runs" / "m" and cfg.model == str(tmp_path / "m.onnx")
    assert cfg.data_dir == tmp_path / "data" and cfg.calib_data == tmp_path / "calib"
    assert cfg.dataset == str(tmp_path / "set.npz") and cfg.weights == RANDOM_WEIGHTS
    assert cfg.quantized == (f"vendor={tmp_path / 'q.onnx'}", str(tmp_path / "q.onnx"))
    assert RunConfig(model="digits_resnet8", out=Path("a/*")).resolved().out == tmp_path / "a" / "*"


def test_every_commands_help_prints(capsys):
    from ptqcal.cli import main

    for command in (["--help"], ["run", "--help"], ["report", "--help"], ["compare-torch", "--help"]):
        assert main(command) == 0 and "usage" in capsys.readouterr().out


def test_a_provider_that_cannot_run_the_whole_model_is_one_line(tmp_path, capsys):
    """ONNX Runtime runs on the CPU whatever a provider cannot, without a word (Azure's runs nothing
    here): the run would report a provider that did not run it. One line, exit 2, nothing written."""
    import onnxruntime as ort

    from conftest import tiny_onnx_classifier

    if "AzureExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no Azure provider to try")
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx", classes=10)
    assert main(["run", "--model", str(model), "--dataset", "digits", "--preprocess", "digits", "--provider", "Azure",
                 "--weight-bits", "8", "--no-progress", "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot run every node" in err and "--provider" in err
    assert not (tmp_path / "run").exists()
