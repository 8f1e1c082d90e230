"""Under shift (issue 26): every configuration on corrupted copies of the evaluation images, against
the float model on the same corrupted images; each configuration's own temperature; the guard per
corruption; the paper's claim tested from the numbers. Records are made here (no model is run), and
each expectation is computed independently of the analysis."""

import csv
import io
import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from matplotlib.figure import Figure

from ptqcal.analysis import analyse_record, analyse_run
from ptqcal.analysis.report import build_report, report_markdown
from ptqcal.analysis.report_figures import FIGURES
from ptqcal.analysis.shift_figures import ShiftConfidence, ShiftCurves, panel_configs, plot_shift, plot_shift_confidence
from ptqcal.analysis.rows import metrics_csv, metrics_json
from ptqcal.analysis.shift_tables import claim_reading, trend
from ptqcal.analysis.under_shift import calibration_pairs, severity_stats
from ptqcal.evaluate.guard import judge
from ptqcal.evaluate.record import ConfigInfo, ConfigKind, RunRecord
from ptqcal.evaluate.temperature import fit_temperature

CLASSES = 10
WIDTHS = {"a8w8": (8, 8), "a8w4": (4, 8)}


def _descriptors(names, calibrated=None):
    calibrated = calibrated or {}
    out = {"float": ConfigInfo("float", ConfigKind.FLOAT)}
    for name in names:
        if name != "float":
            out[name] = ConfigInfo(name, ConfigKind.UNIFORM, *calibrated.get(name, (*WIDTHS[name], None)))
    return out


def _float(rng, n, strength=1.5):
    labels = rng.integers(0, CLASSES, n)
    logits = rng.normal(size=(n, CLASSES)) + 4 * np.eye(CLASSES)[labels] * rng.uniform(0, strength, (n, 1))
    return labels, logits.astype(np.float32)


def _swap(logits, labels, rng, correct, wrong):
    """``logits`` with ``correct`` predictions that were right and ``wrong`` ones that were wrong
    moved to another wrong class: Δ error = correct / N, swapped = (correct + wrong) / N."""
    out, pred = logits.copy(), logits.argmax(1)
    right, missed = np.flatnonzero(pred == labels), np.flatnonzero(pred != labels)
    rows = np.concatenate([rng.choice(right, correct, replace=False), rng.choice(missed, wrong, replace=False)])
    for row in rows:
        target = next(k for k in range(CLASSES) if k not in (pred[row], labels[row]))
        out[row, target] = out[row].max() + 1.0
    return out


def _record(n=400, seed=0, cells=None, shifted=None, **extra):
    """Float, a8w8 (small noise) and a8w4 (larger); ``cells``: key -> (float noise, a8w4 noise)."""
    rng = np.random.default_rng(seed)
    labels, fl = _float(rng, n)
    logits = {"float": fl, "a8w8": (fl + rng.normal(0, 0.05, fl.shape)).astype(np.float32),
              "a8w4": (fl + rng.normal(0, 0.8, fl.shape)).astype(np.float32)}
    if shifted is None:
        shifted = {}
        for key, (noise, q) in (cells or {}).items():
            f = (0.6 * fl + rng.normal(0, noise, fl.shape)).astype(np.float32)
            shifted[key] = {"float": f, "a8w8": (f + rng.normal(0, 0.05, f.shape)).astype(np.float32),
                            "a8w4": (f + rng.normal(0, q, f.shape)).astype(np.float32)}
    return RunRecord("toy", labels, logits, summary={"dataset": "synthetic"},
                     descriptors=extra.pop("descriptors", _descriptors(logits)), shifted=shifted, **extra)


def _ece(logits, labels, temperature):
    """Top-label ECE, 15 bins (lo, hi], written out here."""
    z = logits.astype(np.float64) / np.asarray(temperature, dtype=np.float64).reshape(-1, 1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence, correct = p.max(1), p.argmax(1) == labels
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (confidence > lo) & (confidence <= hi) if b else confidence <= hi
        if inside.any():
            total += abs(correct[inside].mean() - confidence[inside].mean()) * inside.sum()
    return total / len(labels)


def _same(a, b):
    return all((x is None and y is None) or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) or x == y
               for x, y in zip(a.as_dict().values(), b.as_dict().values()))


def test_a_cell_equal_to_the_clean_images_gives_the_clean_metrics_and_no_drop():
    record = _record()
    record.shifted = {"fog@2": {k: v.copy() for k, v in record.logits.items()}}
    run = analyse_record(record)
    (cell,) = run.shift
    assert (cell.corruption, cell.severity) == ("fog", 2)
    assert cell.float_error_drop == 0 and cell.float_ece_drop == 0
    for clean in run.configs:
        assert _same(cell.result(clean.name).metrics, clean.metrics), clean.name
    rows = [r for r in csv.DictReader(io.StringIO(metrics_csv([run]))) if r["corruption"] == "fog"]
    assert len(rows) == 3 and all(float(r["top1_error_vs_clean"]) == 0 and float(r["ece_vs_clean"]) == 0
                                  for r in rows)


def test_swaps_and_delta_error_of_a_cell_are_counted_against_the_float_model_on_the_same_images():
    rng = np.random.default_rng(3)
    record = _record(n=200)
    labels = record.labels
    cell_float = _swap(record.logits["float"], labels, rng, 20, 10)  # the float model itself moved by the shift
    cell = {"float": cell_float, "a8w8": cell_float.copy(), "a8w4": _swap(cell_float, labels, rng, 6, 4)}
    record.shifted = {"contrast@5": cell}
    run = analyse_record(record)
    a8w4 = run.shift[0].result("a8w4").metrics
    assert a8w4.swapped == pytest.approx(10 / 200) and a8w4.delta_top1_error == pytest.approx(6 / 200)
    assert a8w4.delta_error_per_swapped == pytest.approx(0.6)
    assert run.shift[0].result("a8w8").metrics.swapped == 0
    clean_error = np.mean(record.logits["float"].argmax(1) != labels)
    assert run.shift[0].float_error_drop == pytest.approx(np.mean(cell_float.argmax(1) != labels) - clean_error)


def test_own_temperature_is_fitted_on_the_configurations_own_halves_and_applied_to_the_cells():
    record = _record(cells={"fog@1": (0.5, 0.8)})
    run = analyse_record(record, seed=5)
    n, labels, q = len(record.labels), record.labels, record.logits["a8w4"]
    order = np.random.default_rng(5).permutation(n)
    first, second = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    halves = (fit_temperature(q[first], labels[first]), fit_temperature(q[second], labels[second]))
    assert run.own_halves["a8w4"] == pytest.approx(halves)
    per_image = np.empty(n)
    per_image[second], per_image[first] = halves
    a8w4 = next(c for c in run.configs if c.name == "a8w4")
    assert a8w4.metrics.ece_own_temperature == pytest.approx(_ece(q, labels, per_image), abs=1e-12)
    shifted = record.shifted["fog@1"]["a8w4"]  # the clean temperatures, image by image, on the corrupted logits
    assert run.shift[0].result("a8w4").metrics.ece_own_temperature == pytest.approx(
        _ece(shifted, labels, per_image), abs=1e-12)
    assert run.reference.metrics.ece_own_temperature == run.reference.metrics.ece_temperature


def _ratio_record(ratios, seed=0):
    """a8w4 swaps 40 of 400 predictions clean and in every cell, ``ratios[s]`` of them right ones."""
    rng = np.random.default_rng(seed)
    record = _record(seed=seed)
    labels = record.labels
    record.logits["a8w4"] = _swap(record.logits["float"], labels, rng, round(40 * ratios[0]), 40 - round(40 * ratios[0]))
    for severity, ratio in enumerate(ratios[1:], start=1):
        for corruption in ("fog", "snow"):
            f = record.logits["float"]
            record.shifted[f"{corruption}@{severity}"] = {
                "float": f, "a8w8": f.copy(), "a8w4": _swap(f, labels, rng, round(40 * ratio), 40 - round(40 * ratio))}
    return analyse_record(record)


def test_the_claim_sentence_says_what_the_ratio_does():
    growing = _ratio_record([0.1, 0.3, 0.6])
    stats = severity_stats(growing.shift, growing.configs)
    assert [round(s.mean["delta_error_per_swapped"], 3) for s in stats if s.config == "a8w4"] == [0.1, 0.3, 0.6]
    assert "grows with severity for a8w4 (0.10 clean → 0.60 at severity 2)" in claim_reading(growing, stats)
    flat = _ratio_record([0.2, 0.2, 0.2], seed=1)
    reading = claim_reading(flat, severity_stats(flat.shift, flat.configs))
    assert "does not grow with severity" in reading and "grows with severity for a8w4" not in reading
    falling = _ratio_record([0.6, 0.3, 0.1], seed=2)
    assert "falls with severity for a8w4" in claim_reading(falling, severity_stats(falling.shift, falling.configs))
    assert trend([0.1, 0.5, 0.2]) == "mixed" and trend([float("nan"), 0.3]) == "undefined"


def test_swaps_concentrated_at_low_confidence_are_said_to_be_and_confident_ones_are_not():
    rng = np.random.default_rng(4)
    record = _record(n=600)
    f, labels = record.logits["float"], record.logits["float"].argmax(1)
    confidence = np.exp(f - f.max(1, keepdims=True))
    confidence = 1 / confidence.sum(1)
    for key, rows in (("fog@1", np.argsort(confidence)[:60]), ("fog@2", np.argsort(confidence)[-60:])):
        q = f.copy()
        q[rows, (labels[rows] + 1) % CLASSES] = q[rows].max(1) + 1  # swaps the least / most confident ones
        record.shifted[key] = {"float": f, "a8w8": f.copy(), "a8w4": q}
    run = analyse_record(record)
    reading = claim_reading(run, severity_stats(run.shift, run.configs))
    assert "concentrated where the float model is unsure on clean images and at severity 1;" in reading
    assert reading.split("not concentrated there (")[1].split(")")[1].startswith(" at severity 2.")
    # a swap rate of the confident predictions above half the others' is only weak concentration
    from ptqcal.analysis.shift_tables import _concentration_verdict
    from ptqcal.analysis.under_shift import Concentration

    weak = Concentration(1, 100, 20, 0.5, 0.8, 0.15, 0.2, 0.1)
    strong = Concentration(2, 100, 20, 0.5, 0.8, 0.05, 0.2, 0.1)
    assert _concentration_verdict([strong]).startswith("So the swaps stay concentrated")
    assert "only weakly concentrated there" in _concentration_verdict([strong, weak])


def test_the_guard_is_judged_on_every_cell_with_its_clean_threshold():
    rng = np.random.default_rng(6)
    held_labels, held = _float(rng, 300)
    extra = {"held_out_labels": held_labels, "held_out_source": "calibration", "guard_target": {"max_differing": 0.01},
             "held_out_logits": {"float": held, "a8w8": held.copy(),
                                 "a8w4": (held + rng.normal(0, 0.8, held.shape)).astype(np.float32)}}
    record = _record(cells={"fog@1": (0.5, 0.8), "fog@3": (1.0, 1.0), "snow@3": (1.2, 1.0)}, **extra)
    run = analyse_record(record)
    guard = run.guards["a8w4"][0]
    for cell in run.shift:
        logits = record.shifted[cell.key]
        expected = judge(guard.threshold, logits["a8w4"], logits["float"], record.labels, guard.score)
        assert asdict(cell.guards["a8w4"]) == pytest.approx(asdict(expected), nan_ok=True)
    markdown = report_markdown([run], {})
    assert "**The float fallback guard under shift**" in markdown and "| a8w4 | severity 3 |" in markdown


def _sections(markdown):
    """The report without its section under shift and without the paragraph of figures left out."""
    head, _, tail = markdown.partition("### Under shift")
    tail = tail[tail.index("\n## ") + 1:] if tail else ""
    return [p for p in (head + tail).split("\n\n") if not p.startswith("**Figures left out**")]


def test_a_record_without_cells_has_no_shift_section_and_the_same_other_sections():
    plain, shifted = _record(), _record(cells={"fog@1": (0.5, 0.8), "snow@2": (0.8, 1.0)})
    without, with_cells = report_markdown([analyse_record(plain)], {}), report_markdown([analyse_record(shifted)], {})
    assert "Under shift" not in without and "### Under shift" in with_cells
    assert "Figure 11: no run was evaluated on corrupted images" in without
    assert _sections(without) == _sections(with_cells)


def test_metrics_files_hold_every_cell_strictly_and_deterministically(tmp_path):
    record = _record(cells={"fog@1": (0.5, 0.8), "fog@3": (1.0, 1.2), "snow@3": (1.0, 1.0)})
    record.save(tmp_path / "run")
    build_report([tmp_path / "run"], tmp_path / "a")
    text = (tmp_path / "a" / "metrics.json").read_text()
    assert text == metrics_json([analyse_run(tmp_path / "run")])  # analysed afresh: byte for byte the same

    def refuse(token):
        raise ValueError(token)

    (entry,) = json.loads(text, parse_constant=refuse)["runs"]
    assert {(r["corruption"], r["severity"]) for r in entry["configs"]} == {("clean", 0)}
    assert sorted({(r["corruption"], r["severity"]) for r in entry["shift"]}) == [("fog", 1), ("fog", 3), ("snow", 3)]
    assert len(entry["shift"]) == 9 and set(entry["own_temperatures"]) == {"float", "a8w8", "a8w4"}
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    assert len(rows) == 12 and [r["corruption"] for r in rows[:3]] == ["clean"] * 3
    fog3 = next(r for r in rows if (r["config"], r["corruption"], r["severity"]) == ("a8w4", "fog", "3"))
    clean = next(r for r in rows if (r["config"], r["corruption"]) == ("a8w4", "clean"))
    assert float(fog3["ece_vs_clean"]) == pytest.approx(float(fog3["ece"]) - float(clean["ece"]))
    report = (tmp_path / "a" / "report.md").read_text()
    assert "**Severity 3** (mean over 2 corruptions" in report and "ECE after own T %" in report
    for key in ("fig11_shift", "fig12_shift_confidence"):
        assert (tmp_path / "a" / f"{key}.png").stat().st_size > 0 and f"({key}.png)" in report


def test_a_calibration_on_corrupted_images_is_paired_with_its_twin_by_descriptor():
    # the names mislead on purpose: "a8w4" is the corrupted calibration's clean twin only by its widths
    calibrated = {"a8w8": (4, 8, "fog@3"), "a8w4": (4, 8, None)}
    record = _record(cells={"fog@3": (0.8, 1.0), "snow@1": (0.5, 0.8)}, descriptors=_descriptors(
        ("float", "a8w8", "a8w4"), calibrated))
    run = analyse_record(record)
    (pair,) = calibration_pairs(record, run.configs, run.shift)
    assert (pair.shifted, pair.twin, pair.calibrated_on, pair.cells) == ("a8w8", "a8w4", "fog@3", 2)
    swaps = [np.mean(record.shifted[k][name].argmax(1) != record.shifted[k]["float"].argmax(1))
             for name in ("a8w4", "a8w8") for k in ("fog@3", "snow@1")]
    assert pair.shift_swapped == pytest.approx(((swaps[0] + swaps[1]) / 2, (swaps[2] + swaps[3]) / 2))
    assert pair.own_cell_swapped == pytest.approx((swaps[0], swaps[2]))
    assert "**Calibrating on corrupted images**" in report_markdown([run], {})


def test_figures_under_shift_are_drawn_only_for_runs_with_cells_into_the_axes_given():
    plain = analyse_record(_record())
    assert ShiftCurves.from_run(plain) is None and ShiftConfidence.from_run(plain) is None
    run = analyse_record(_record(cells={"gaussian_noise@1": (0.5, 0.8), "fog@1": (0.5, 0.8), "fog@4": (1, 1)}))
    curves = ShiftCurves.from_run(run)
    assert curves.levels == [0, 1, 4] and curves.corruptions == ["gaussian_noise", "fog"]
    assert np.isnan(curves.values["swapped"][0, :, 2]).all()  # gaussian_noise has no severity 4
    assert curves.values["ece"][1, 2, 2] == run.shift[2].result("a8w4").metrics.ece
    fig = Figure()
    axes = fig.subplots(3, 3)
    assert plot_shift([curves], ax=axes) is fig
    confidence = ShiftConfidence.from_run(run)
    assert confidence.configs == ["a8w8", "a8w4"] and confidence.levels == [0, 1, 4]
    assert plot_shift_confidence([confidence], ax=fig.subplots(1, 2)) is fig
    assert panel_configs([f"c{i}" for i in range(9)]) == ["c0", "c2", "c3", "c5", "c6", "c8"]
    assert set(FIGURES) >= {"fig11_shift", "fig12_shift_confidence"}


def test_the_lowest_precision_is_read_from_the_descriptors_and_a_twin_is_no_sweep_step():
    """Widths given as 4 then 8 put a8w4 first: the lowest precision is still a8w4, by its bits; a twin
    calibrated on corrupted images is neither a step of the sweep nor the lowest precision."""
    from ptqcal.analysis.judgement import lowest_precision
    from ptqcal.analysis.run_analysis import analyse_record

    record = _record()
    record.logits = {"float": record.logits["float"], "a8w4": record.logits["a8w4"], "a8w8": record.logits["a8w8"],
                     "a8w4-cal-fog-s1": record.logits["a8w4"].copy()}
    record.descriptors = {**_descriptors({k: v for k, v in record.logits.items() if "-cal-" not in k}),
                          "a8w4-cal-fog-s1": ConfigInfo("a8w4-cal-fog-s1", ConfigKind.UNIFORM, 4, 8, "fog@1")}
    run = analyse_record(record)
    assert [c.name for c in run.uniform] == ["a8w4", "a8w8"]
    assert lowest_precision(run).name == "a8w4"
