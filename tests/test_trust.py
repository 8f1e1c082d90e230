"""The report's "When to trust the quantized model": selective prediction, the float fallback guard
and guard.json, against answers known by construction and computed here by hand."""

import json
import math

import numpy as np
import pytest

from ptqcal.analysis import analyse_run, build_report
from ptqcal.analysis.trust import percent
from ptqcal.evaluate import RunRecord
from ptqcal.evaluate.deploy import Deployment
from ptqcal.evaluate.guard import Guard, GuardTarget, choose_threshold, guard_curve
from ptqcal.evaluate.record import ConfigInfo, ConfigKind

CLASSES = 5
DESCRIBED = {"float": ConfigInfo("float", ConfigKind.FLOAT), "a8w8": ConfigInfo("a8w8", ConfigKind.UNIFORM, 8, 8),
             "a8w4": ConfigInfo("a8w4", ConfigKind.UNIFORM, 4, 8)}


def _msp(logits):
    """Max softmax probability, by hand (float64)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


def _images(rng, n, swap_fraction, swap_values, kept_values):
    """Float logits, labels, and a quantized model whose only non-zero logit per row is drawn from
    ``swap_values`` on the swapped rows (a class float did not predict) and ``kept_values`` on the
    others (float's class): every confidence score ranks rows by that value."""
    float_logits = rng.normal(size=(n, CLASSES)) * 3
    float_pred = float_logits.argmax(axis=1)
    labels = np.where(rng.uniform(size=n) < 0.8, float_pred, rng.integers(0, CLASSES, n))
    swapped = rng.permutation(n) < round(swap_fraction * n)
    value = np.where(swapped, rng.uniform(*swap_values, n), rng.uniform(*kept_values, n))
    quant = np.zeros((n, CLASSES))
    quant[np.arange(n), np.where(swapped, (float_pred + 1) % CLASSES, float_pred)] = value
    return float_logits.astype(np.float32), labels, quant.astype(np.float32), swapped


def _record(folder, *, held_out=True, target=None, source="calibration", timed=True, seed=0):
    """A run of float, a8w8 (float's logits: no swap) and a8w4. On the held-out images a8w4's
    swaps are exactly its lowest-scoring inputs; on the evaluation images some swaps score above
    the kept inputs the held-out threshold is set by, so a threshold chosen there would differ."""
    rng = np.random.default_rng(seed)
    float_eval, labels, q_eval, _ = _images(rng, 1000, 0.05, (0.1, 2.0), (0.3, 5.0))
    float_held, held_labels, q_held, _ = _images(rng, 400, 0.05, (0.1, 1.0), (1.5, 5.0))
    deployment = {name: Deployment(1000, 100, 1, 1, latency_ms=latency) for name, latency in
                  (("float", 2.0), ("a8w8", 0.5), ("a8w4", 1.0))} if timed else {}
    held = {"held_out_labels": held_labels, "held_out_source": source,
            "held_out_logits": {"float": float_held, "a8w8": float_held.copy(), "a8w4": q_held}} if held_out else {}
    record = RunRecord("toy", labels, {"float": float_eval, "a8w8": float_eval.copy(), "a8w4": q_eval},
                       summary={"dataset": "synthetic"}, deployment=deployment, descriptors=DESCRIBED,
                       guard_target=({"max_differing": 0.001} if held_out else None) if target is None else target,
                       **held)
    return record.save(folder)


def _report(tmp_path, **kwargs):
    folder = _record(tmp_path / "run", **kwargs)
    out = tmp_path / "out"
    build_report([folder], out)
    return folder, out, (out / "report.md").read_text()


def _strict(text):
    def refuse(value):
        raise ValueError(f"not strict JSON: {value}")

    return json.loads(text, parse_constant=refuse)


def test_guard_json_is_strict_round_trips_and_its_threshold_comes_from_the_held_out_images_alone(tmp_path):
    folder, out, _ = _report(tmp_path)
    document = _strict((out / "guard.json").read_text())
    (run,) = document["runs"]
    assert document["format"] == 1 and run["model"] == "toy" and run["missing"] is None
    assert run["held_out"] == {"source": "calibration", "images": 400}
    assert run["target"] == {"max_differing": 0.001, "max_routed": None}
    entry = run["configs"]["a8w4"]
    guard = Guard.from_json(entry["guard"])
    assert guard.to_json() == entry["guard"]  # round trip
    assert sorted(entry["others"]) == ["entropy", "margin"] and all(
        Guard.from_json(g).to_json() == g for g in entry["others"].values())
    # by hand, from the held-out arrays alone: the swaps are the lowest-scoring inputs under every score,
    # so each score routes exactly them; on a tie the first score (msp) is chosen, and the threshold
    # routing fewest while catching every swap is the lowest msp of a kept held-out input
    arrays = np.load(folder / "logits.npz")
    q, f = arrays["held_out:a8w4"], arrays["held_out:float"]
    kept = q.argmax(axis=1) == f.argmax(axis=1)
    assert guard.score == "msp" and guard.threshold == pytest.approx(_msp(q)[kept].min(), rel=1e-12)
    assert guard.chosen_on == 400 and guard.held_out.differing == 0 and guard.held_out.routed == pytest.approx(0.05)
    # the evaluation images would have given another threshold: the test tells them apart
    evaluation = (arrays["a8w4"], arrays["float"], arrays["labels"])
    assert choose_threshold(guard_curve(*evaluation, "msp"), GuardTarget(max_differing=0.001)) != pytest.approx(
        guard.threshold, rel=1e-6)
    # judged on the evaluation images, by hand
    routed = _msp(arrays["a8w4"]) < guard.threshold
    swapped = arrays["a8w4"].argmax(axis=1) != arrays["float"].argmax(axis=1)
    assert guard.evaluation.routed == pytest.approx(routed.mean())
    assert guard.evaluation.differing == pytest.approx((swapped & ~routed).mean()) and guard.evaluation.differing > 0
    assert guard.latency_vs_float == pytest.approx((1.0 + routed.mean() * 2.0) / 2.0)
    # a8w8 swapped nothing: its guard routes nothing, and "-inf" reads back as a number
    quiet = Guard.from_json(run["configs"]["a8w8"]["guard"])
    assert quiet.threshold == -math.inf and quiet.evaluation.routed == 0 and math.isnan(quiet.evaluation.swaps_caught)
    assert analyse_run(folder).guards["a8w4"][0] == guard


def test_the_section_has_both_tables_and_one_sentence_per_configuration(tmp_path):
    folder, out, report = _report(tmp_path)
    section = report[report.index("### When to trust the quantized model"):]
    arrays = np.load(folder / "logits.npz")
    labels, float_logits, q = arrays["labels"], arrays["float"], arrays["a8w4"]
    # the selective table: float first, its AURC by hand (no ties: the mean over prefixes of their risk)
    wrong = (float_logits.argmax(axis=1) != labels)[np.argsort(-_msp(float_logits))]
    aurc = np.mean(np.cumsum(wrong) / np.arange(1, len(wrong) + 1))
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| config | AURC % | E-AURC %") and "coverage at float's error" in rows[0]
    assert rows[1].startswith(f"| float | {100 * aurc:.2f} [") and rows[1].endswith("| – |")
    assert [r.split(" | ")[0] for r in rows[1:4]] == ["| float", "| a8w8", "| a8w4"]
    # the guard table and a8w4's sentence, counted here
    guard = analyse_run(folder).guards["a8w4"][0]
    routed = _msp(q) < guard.threshold
    swapped = q.argmax(axis=1) != float_logits.argmax(axis=1)
    confident = swapped & (_msp(float_logits) >= 0.9)
    assert confident.any() and (confident & ~routed).any()  # both counts are exercised
    head = next(r for r in rows if r.startswith("| config | score | threshold"))
    a8w4 = rows[rows.index(head) + 2]
    assert f"{(swapped & routed).sum()} of {swapped.sum()})" in a8w4 and " msp " in a8w4
    assert f"({(confident & routed).sum()} of {confident.sum()})" in a8w4
    assert a8w4.endswith(f"| {(1.0 + routed.mean() * 2.0) / 2.0:.2f} |")
    assert f"- a8w4: routing {percent(routed.mean())}% of inputs to float catches" in section
    assert f"({(swapped & routed).sum()} of {swapped.sum()}; {(confident & routed).sum()} of its " \
           f"{confident.sum()} confident ones)" in section
    assert "It misses the target on the evaluation images" in section  # some swaps score above the threshold
    assert "- a8w8 swapped no prediction of the evaluation images: there is nothing for a guard to catch." in section
    assert "chosen on the 400 calibration images, which also set the activation ranges" in section
    assert "Target: at most 0.1% of predictions still differing" in section


def test_figures_9_and_10_are_drawn_and_embedded(tmp_path):
    _, out, report = _report(tmp_path)
    for name in ("fig9_risk_coverage", "fig10_guard"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").stat().st_size > 0
        assert f"]({name}.png)" in report
    assert report.index("## Figure 9") < report.index("## Figure 10") < report.index("## Environment")
    assert "Not drawn: toy: a8w8 swapped no prediction" in report


def test_the_threshold_of_a_search_run_and_a_route_target(tmp_path):
    folder, out, report = _report(tmp_path, source="search", target={"max_routed": 0.0}, timed=False)
    assert "images held out of evaluation for the mixed-precision search" in report
    assert "- a8w4: its guard routes no input to float (on the held-out images the target was met without " \
           "routing), so all" in report
    guard = Guard.from_json(_strict((out / "guard.json").read_text())["runs"][0]["configs"]["a8w4"]["guard"])
    assert guard.threshold == -math.inf and guard.quant_latency_ms is None
    head = next(line for line in report.splitlines() if line.startswith("| config | score | threshold"))
    rows = report.splitlines()
    assert rows[rows.index(head) + 3].endswith("| – |")  # untimed: no latency ratio


@pytest.mark.parametrize("kind", ["older", "no target"])
def test_a_run_without_held_out_logits_or_a_target_says_why_there_is_no_guard(tmp_path, kind):
    folder = _record(tmp_path / "run", held_out=kind != "older")
    if kind == "no target":  # held-out logits, but no target recorded
        info = json.loads((folder / "run.json").read_text())
        info["guard_target"] = None
        (folder / "run.json").write_text(json.dumps(info))
    out = tmp_path / "out"
    report = build_report([folder], out).read_text()
    section = report[report.index("### When to trust the quantized model"):]
    assert "| float |" in section  # the selective table needs only the evaluation images
    why = "older ptqcal" if kind == "older" else "no guard target"
    assert "No float fallback guard:" in section and why in section
    assert (out / "fig9_risk_coverage.png").exists() and "## Figure 10" not in report
    assert not (out / "guard.json").exists() and "| config | score | threshold" not in report


def test_the_trust_figures_draw_into_given_axes(tmp_path):
    from matplotlib.figure import Figure

    from ptqcal.analysis.trust_figures import GuardCurves, RiskCoverageCurves, plot_guard_curves, plot_risk_coverage

    run = analyse_run(_record(tmp_path / "run"))
    fig = Figure()
    axes = fig.subplots(1, 3)
    assert plot_risk_coverage([RiskCoverageCurves.from_run(run)], ax=[axes[0]]) is fig
    curves = GuardCurves.from_run(run)
    assert curves.configs == ["a8w4"] and curves.without_swaps == ["a8w8"]
    assert plot_guard_curves([curves], ax=axes[1:]) is fig
    chosen = [line for line in axes[1].lines if line.get_marker() == "o" and len(line.get_xdata()) == 1]
    assert chosen[0].get_xdata()[0] == pytest.approx(100 * run.guards["a8w4"][0].evaluation.routed)
