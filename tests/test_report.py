"""`ptqcal report` rebuilds reports from saved runs, without onnxruntime or torch."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ptqcal.analysis import analyse_run, build_report


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
    (folder / "run.json").write_text(json.dumps({"model": folder.name, "configs": configs, "notes": ["made up"],
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
    assert html.count("data:image/png;base64,") == 5 and "http" not in html.replace("http-equiv", "")
    report = (out / "report.md").read_text()
    assert "resnet20 vs resnet56" in report and "## Comparison" in report
    for figure in ("fig1_reliability", "fig2_swaps", "fig3_transitions", "fig4_margin", "fig5_temperature"):
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
                      [np.array([0.5])] * 3)
    fig = plot_swap_panels([panel])
    top, middle = fig.axes[0], fig.axes[1]
    lines = [line for line in top.lines if line.get_linestyle() == "-" and len(line.get_xdata()) > 1]
    assert lines and all(list(line.get_xdata()) == [0, 1] for line in lines)  # not through mixed at 2
    points = {tuple(line.get_xdata()) for line in top.lines}
    assert (2,) in points  # mixed is still drawn, as a point
    assert [list(line.get_xdata()) for line in middle.lines if line.get_linestyle() == "-"][0] == [0, 1]
