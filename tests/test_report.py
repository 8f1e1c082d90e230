"""`ptqcal report` rebuilds reports from saved runs, without onnxruntime or torch."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ptqcal.analysis import analyse_run, build_report


UNIFORM = {"a8w8": (8, 8), "a8w4": (4, 8)}  # name -> (weight bits, activation bits)


def _descriptors(names=("float", "a8w8", "a8w4")):
    """run.json's descriptors of ``names``: the float model and uniform configurations."""
    return {name: {"kind": "float", "weight_bits": None, "act_bits": None} if name == "float" else
            {"kind": "uniform", "weight_bits": UNIFORM[name][0], "act_bits": UNIFORM[name][1]} for name in names}


def _fake_run(folder, seed, repeats=1, classes=10, n=800):
    """A run folder as `ptqcal run` writes it, with logits made here."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    float_logits = rng.normal(size=(n, classes)) + 4 * np.eye(classes)[labels] * rng.uniform(0, 1.5, (n, 1))
    arrays = {"labels": labels, "float": float_logits.astype(np.float32),
              "calib_labels": labels[:200], "calib_float": float_logits[:200].astype(np.float32)}
    configs = ["float"]
    for bits, noise in (("a8w8", 0.05), ("a8w4", 0.8)):
        for repeat in range(repeats):
            name = bits if repeat == 0 else f"{bits}#r{repeat}"
            arrays[name] = (float_logits + rng.normal(0, noise, float_logits.shape)).astype(np.float32)
            configs.append(name)
    folder.mkdir(parents=True)
    np.savez(folder / "logits.npz", **arrays)
    (folder / "run.json").write_text(json.dumps({"format": 3, "model": folder.name, "configs": configs,
                                                 "notes": ["made up"], "descriptors": _descriptors(),
                                                 "run": {"dataset": "synthetic", "evaluation images": n}}))
    return folder


def test_report_of_two_runs_without_onnxruntime_or_torch(tmp_path):
    first, second = _fake_run(tmp_path / "resnet20", 0), _fake_run(tmp_path / "resnet56", 1)
    out = tmp_path / "combined"
    code = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "onnxruntime"):
                    raise ImportError(name + " is blocked in this test")

        sys.meta_path.insert(0, Block())
        from ptqcal.cli import main
        code = main(["report", {str(first)!r}, {str(second)!r}, "--out", {str(out)!r}])
        assert not {{"torch", "onnxruntime"}} & set(sys.modules), "imported a framework"
        sys.exit(code)
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "http" not in html.replace("http-equiv", "")
    report = (out / "report.md").read_text()
    assert "resnet20 vs resnet56" in report and "## Comparison" in report
    for figure in ("fig1_reliability", "fig2_swaps", "fig3_transitions", "fig4_margin", "fig5_temperature",
                   "fig9_risk_coverage"):
        assert (out / f"{figure}.png").stat().st_size > 0 and (out / f"{figure}.svg").stat().st_size > 0
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["model"] for r in runs] == ["resnet20", "resnet56"]


def test_report_metrics_match_an_independent_computation(tmp_path):
    run = analyse_run(_fake_run(tmp_path / "m", 2))
    arrays = np.load(tmp_path / "m" / "logits.npz")
    labels = arrays["labels"]
    a8w4 = next(c for c in run.configs if c.name == "a8w4")
    swapped = arrays["a8w4"].argmax(1) != arrays["float"].argmax(1)
    assert a8w4.metrics.swapped == pytest.approx(swapped.mean())
    delta = np.mean(arrays["a8w4"].argmax(1) != labels) - np.mean(arrays["float"].argmax(1) != labels)
    assert a8w4.metrics.delta_top1_error == pytest.approx(delta)
    lo, hi = a8w4.intervals["delta_top1_error"]
    assert lo <= delta <= hi
    # cross-fitted: each image's temperature minimises the NLL of the *other* images' float logits
    per_image = run.temperatures
    float_logits = arrays["float"].astype(np.float64)

    def nll(t, rows):
        z = float_logits[rows] / t
        z = z - z.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), labels[rows]])

    values = sorted(set(per_image))
    assert len(values) == 2 and abs(np.sum(per_image == values[0]) - np.sum(per_image == values[1])) <= 1
    for t in values:
        fitted_on = per_image != t  # the half that did not get t is the half t was fitted on
        assert nll(t, fitted_on) <= min(nll(0.95 * t, fitted_on), nll(1.05 * t, fitted_on))
    # the ECE after temperature is that of softmax(logits / T_i), binned here by hand in 15 bins
    T = per_image[:, None]
    p = np.exp(arrays["a8w4"] / T - (arrays["a8w4"] / T).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence, correct = p.max(1), p.argmax(1) == labels
    bins = np.minimum((confidence * 15).astype(int) - (confidence * 15 == (confidence * 15).astype(int)), 14)
    ece = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * np.mean(bins == b)
              for b in range(15) if np.any(bins == b))
    assert a8w4.metrics.ece_temperature == pytest.approx(ece)


def test_repeats_give_mean_and_spread(tmp_path):
    folder = _fake_run(tmp_path / "rep", 3, repeats=3)
    run = analyse_run(folder)
    a8w4 = next(c for c in run.configs if c.name == "a8w4")
    assert len(a8w4.draws) == 3
    arrays = np.load(folder / "logits.npz")
    swaps = [np.mean(arrays[k].argmax(1) != arrays["float"].argmax(1)) for k in ("a8w4", "a8w4#r1", "a8w4#r2")]
    assert a8w4.metrics.swapped == pytest.approx(np.mean(swaps))
    assert a8w4.spread.swapped == pytest.approx(np.std(swaps))
    assert [d.swapped for d in a8w4.draws] == pytest.approx(swaps)
    report = build_report([folder], tmp_path / "out")
    assert " ± " in report.read_text()


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    from ptqcal.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "not a ptqcal run folder" in capsys.readouterr().err


def test_figure_2_joins_only_the_uniform_precisions():
    """A mixed (or fp16) model is a point of its own, not the next step of the precision sweep."""
    from ptqcal.analysis.figures import SwapPanel, plot_swap_panels

    configs = ["a8w8", "a8w4", "mixed"]
    panel = SwapPanel("m", configs, [0.01, 0.20, 0.02], [0.0, 0.05, 0.001], [0.0, 0.25, 0.05],
                      [np.array([0.5])] * 3, uniform=[True, True, False])
    fig = plot_swap_panels([panel])
    top, middle = fig.axes[0], fig.axes[1]
    lines = [line for line in top.lines if line.get_linestyle() == "-" and len(line.get_xdata()) > 1]
    assert lines and all(list(line.get_xdata()) == [0, 1] for line in lines)  # not through mixed at 2
    points = {tuple(line.get_xdata()) for line in top.lines}
    assert (2,) in points  # mixed is still drawn, as a point
    assert [list(line.get_xdata()) for line in middle.lines if line.get_linestyle() == "-"][0] == [0, 1]


def test_the_joined_steps_come_from_the_descriptors_not_the_names(tmp_path):
    """A uniform configuration named anything is a step of the sweep; a mixed one named like a
    step is not."""
    from ptqcal.analysis import metrics_json
    from ptqcal.analysis.figures import SwapPanel

    folder = _fake_run(tmp_path / "m", 4)
    info = json.loads((folder / "run.json").read_text())
    info["descriptors"]["a8w8"] = {"kind": "mixed", "weight_bits": None, "act_bits": None}
    (folder / "run.json").write_text(json.dumps(info))
    run = analyse_run(folder)
    assert SwapPanel.from_run(run).uniform == [False, True]
    assert [c.name for c in run.uniform] == ["a8w4"]
    rows = {r["config"]: r for r in json.loads(metrics_json([run]))["runs"][0]["configs"]}
    assert (rows["a8w8"]["weight_bits"], rows["a8w8"]["act_bits"]) == (None, None)
    assert (rows["a8w4"]["weight_bits"], rows["a8w4"]["act_bits"]) == (4, 8)


@pytest.mark.parametrize("tamper", [
    lambda d: d["a8w4"].update(weight_bits="4"),  # a string is not a width
    lambda d: d["a8w4"].update(weight_bits=True),  # nor is a bool, though Python calls it an int
    lambda d: d["a8w4"].update(act_bits=4.0),
    lambda d: d["a8w4"].update(weight_bits=None),  # uniform without a weight width
    lambda d: d["float"].update(weight_bits=8),  # the float model has no integer width
    lambda d: d["a8w4"].update(kind="peer\n![x](/etc/passwd)"),  # unknown kind, with a newline in it
    lambda d: d["a8w4"].update(extra=1),
    lambda d: d.pop("a8w4"),  # a configuration left undescribed
    lambda d: d.update(a2w2={"kind": "uniform", "weight_bits": 2, "act_bits": 2}),  # one without logits
    lambda d: d.__setitem__("a8w4", ["uniform", 4, 8]),
])
def test_a_tampered_descriptor_is_one_line(tmp_path, capsys, tamper):
    from ptqcal.cli import main

    folder = _fake_run(tmp_path / "m", 5)
    info = json.loads((folder / "run.json").read_text())
    tamper(info["descriptors"])
    (folder / "run.json").write_text(json.dumps(info))
    assert main(["report", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged ptqcal run" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version", [None, 1, 2])
def test_a_record_of_an_older_ptqcal_says_to_re_run_it(tmp_path, capsys, version):
    """Its configurations' kinds and widths would have to be guessed from their names: they are not."""
    from ptqcal.cli import main

    folder = _fake_run(tmp_path / "m", 6)
    info = json.loads((folder / "run.json").read_text())
    del info["descriptors"]
    info.pop("format") if version is None else info.update(format=version)
    (folder / "run.json").write_text(json.dumps(info))
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made by an older ptqcal" in err and "re-run" in err, err


def test_descriptors_round_trip_and_an_undescribed_record_fails_loudly(tmp_path):
    """Nothing derives a descriptor: a record built without them is refused, as a bug (not an
    input error), before it is written or analysed."""
    from ptqcal.analysis import analyse_record
    from ptqcal.errors import InputError
    from ptqcal.evaluate import RunRecord
    from ptqcal.evaluate.record import ConfigInfo, ConfigKind

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 100)
    logits = {name: rng.normal(size=(100, 5)).astype(np.float32) for name in ("float", "fp16", "a6w3", "a6w3#r1",
                                                                            "mixed")}
    described = {"float": ConfigInfo("float", ConfigKind.FLOAT), "fp16": ConfigInfo("fp16", ConfigKind.FP16),
                 "a6w3": ConfigInfo("a6w3", ConfigKind.UNIFORM, 3, 6), "mixed": ConfigInfo("mixed", "mixed")}
    RunRecord("m", labels, logits, descriptors=described).save(tmp_path / "run")
    again = RunRecord.load(tmp_path / "run")
    assert again.descriptors == described and again.descriptor("a6w3#r1") == described["a6w3"]
    assert [c.name for c in analyse_record(again).uniform] == ["fp16", "a6w3"]
    undescribed = RunRecord("m", labels, logits, descriptors={k: v for k, v in described.items() if k != "mixed"})
    for call in (lambda: undescribed.save(tmp_path / "other"), lambda: analyse_record(undescribed)):
        with pytest.raises(LookupError, match="missing \\['mixed'\\]") as caught:
            call()
        assert not isinstance(caught.value, InputError)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError):
        ConfigInfo("a8w8", ConfigKind.UNIFORM, 8)  # uniform needs both widths


def test_the_sweep_describes_each_configuration_from_its_spec():
    from ptqcal.evaluate.record import ConfigInfo, ConfigKind
    from ptqcal.quantize import QuantSpec
    from ptqcal.sweep import Sweep, describe

    assert Sweep().descriptors == {"float": ConfigInfo("float", ConfigKind.FLOAT)}
    assert describe(QuantSpec(3, 6)) == ConfigInfo("a6w3", ConfigKind.UNIFORM, 3, 6)
    assert describe(QuantSpec(8, 8, layer_bits=(("conv", 4),))) == ConfigInfo("mixed", ConfigKind.MIXED)


def test_the_kernel_note_reads_the_weight_width_from_the_descriptor():
    from ptqcal.analysis.judgement import kernel_notes
    from ptqcal.evaluate import PathAgreement
    from ptqcal.evaluate.record import ConfigInfo, ConfigKind

    checks = [PathAgreement(name, 100, 1.0, 0.5) for name in ("a8w8", "w8", "mixed")]
    described = {"a8w8": ConfigInfo("a8w8", ConfigKind.UNIFORM, 8, 8), "mixed": ConfigInfo("mixed", "mixed"),
                 "w8": ConfigInfo("w8", ConfigKind.UNIFORM, 7, 8)}  # named like 8-bit weights; it has 7
    (note,) = kernel_notes(checks, described, vnni=False)
    assert note.startswith("On this CPU the deployed a8w8 parts")
    assert kernel_notes(checks, described, vnni=True) == [] and kernel_notes(checks, {}, vnni=None) == []
    with pytest.raises(LookupError):
        kernel_notes(checks, {}, vnni=False)


def test_every_table_column_and_figure_left_out_says_why(tmp_path):
    """Fewer than 20 evaluation images: no temperature, so no "ECE after T" column and no Figure 5;
    no --attribute, no mixed target: no Figures 7 and 8. Each is said, with why."""
    report = build_report([_fake_run(tmp_path / "small", 8, n=16)], tmp_path / "out").read_text()
    assert "No temperature scaling: 16 evaluation images are fewer than the 20" in report
    assert 'Left out: "ECE after T %" (no temperature: 16 evaluation images are fewer than the 20' in report
    left = report[report.index("**Figures left out**"):]
    assert "Figure 5: small: fewer than 20 evaluation images" in left
    assert "Figure 7: it needs a layer attribution" in left and "Figure 8: it needs a mixed-precision target" in left
    assert not (tmp_path / "out" / "fig5_temperature.png").exists()


def test_the_attribution_table_says_which_images_it_was_measured_on(tmp_path):
    from ptqcal.analysis.tables import attribution_table
    from ptqcal.evaluate.attribution import Attribution, LayerEffect

    run = analyse_run(_fake_run(tmp_path / "m", 9))
    effects = [LayerEffect("conv", 4, 0.1, 0.05, 0.01, 20.0)]
    run.record.attribution = Attribution(effects, 300, 120, held_out=True)
    assert "on 300 images held out of evaluation for the mixed-precision search, 120 of them" in \
        attribution_table(run)[0]
    run.record.attribution = Attribution(effects, 300, 120)
    assert "on 300 seeded evaluation images" in attribution_table(run)[0]


def test_the_console_says_the_float_error_first_and_each_configuration_against_it(capsys):
    from ptqcal.config import RunConfig
    from ptqcal.sweep import _log_config, log_float

    labels = np.array([0, 1, 2, 3] * 25)
    float_logits = np.eye(4, dtype=np.float32)[labels]
    float_logits[:12] = np.eye(4, dtype=np.float32)[(labels[:12] + 1) % 4]  # float: 12 wrong
    quant = float_logits.copy()
    quant[12:14] = np.eye(4, dtype=np.float32)[(labels[12:14] + 1) % 4]  # 2 more wrong: 2 swapped
    log_float(RunConfig(), float_logits, labels)
    _log_config(RunConfig(), "a8w8", quant, float_logits, labels)
    first, second = capsys.readouterr().out.splitlines()
    assert first == "[ptqcal] float: top-1 error 12.00% on 100 evaluation images"
    assert second == "[ptqcal] a8w8: top-1 error 14.00% (float 12.00%, +2.00 pp), 2.00% swapped"
