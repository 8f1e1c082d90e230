"""What to ship: the recommendation on hand-built runs whose right answer is known by construction
(predictions set image by image, sizes and speeds given), and recommendation.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptqcal.analysis import analyse_run, build_report
from ptqcal.analysis.recommend import (MAX_CONFIDENT_SWAPPED, MAX_DELTA_ERROR, MIN_CONFIDENT, Objective, recommend,
                                       recommendation_json, sentence)
from ptqcal.evaluate import RunRecord
from ptqcal.evaluate.deploy import Deployment
from ptqcal.evaluate.record import ConfigInfo, ConfigKind

N, CLASSES = 1000, 5
UNSURE = 20  # the float model's first 20 predictions are right but unsure; the rest it holds at ~100%
KINDS = {"float": (ConfigKind.FLOAT, None, None), "a8w8": (ConfigKind.UNIFORM, 8, 8),
         "a8w7": (ConfigKind.UNIFORM, 7, 8), "a8w5": (ConfigKind.UNIFORM, 5, 8), "a8w4": (ConfigKind.UNIFORM, 4, 8),
         "w4": (ConfigKind.UNIFORM, 4, 8), "theirs": (ConfigKind.EXTERNAL, None, None),
         "peer": (ConfigKind.PEER, None, None), "mixed": (ConfigKind.MIXED, None, None)}


def _logits(predictions: np.ndarray, unsure: int = UNSURE) -> np.ndarray:
    """Logit 10 on each image's predicted class (confidence ~1), 0.1 on the first ``unsure`` images
    (confidence ~0.27, well under 90%)."""
    logits = np.zeros((len(predictions), CLASSES), np.float32)
    logits[np.arange(len(predictions)), predictions] = 10.0
    logits[:unsure] /= 100
    return logits


def _timed(weight: int, speed: float, spread: float = 0.05, latency: float = 1.0) -> Deployment:
    """Sizes and a throughput whose five blocks lie within ``spread`` of it (and a batch-1 latency)."""
    blocks = tuple(speed * (1 + spread * k / 2) for k in (-2, -1, 0, 1, 2))
    return Deployment(4 * weight, weight, 0, 64, latency, latency, speed, "timed runs", 100,
                      (latency,) * 5, 5, 320, blocks)


def _predictions(labels: np.ndarray) -> dict[str, np.ndarray]:
    """float: right on the first 900 images, wrong on the last 100; a8w8 swaps 2 unsure right ones;
    a8w7 swaps 7 unsure right ones (more error, no confident swap); a8w5 swaps 20 confident right
    ones (2% of the 980 confident, 2 pp of error); a8w4 swaps every image (collapsed); peer swaps
    as a8w7 does; w4 (4-bit weights too), theirs and mixed swap nothing."""
    base = np.where(np.arange(N) < 900, labels, (labels + 1) % CLASSES)
    wrong = (labels + 3) % CLASSES

    def swap(rows):
        changed = base.copy()
        changed[rows] = wrong[rows]
        return changed

    return {"float": base, "a8w8": swap(slice(0, 2)), "a8w7": swap(slice(0, 7)), "a8w5": swap(slice(20, 40)),
            "a8w4": (base + 2) % CLASSES, "peer": swap(slice(0, 7)), "w4": base.copy(), "theirs": base.copy(),
            "mixed": base.copy()}


def _run(folder, deployment: dict[str, Deployment], settings=None, unsure: int = UNSURE):
    labels = np.random.default_rng(0).integers(0, CLASSES, N)
    predictions = _predictions(labels)
    logits = {name: _logits(predictions[name], unsure) for name in deployment}
    descriptors = {name: ConfigInfo(name, *KINDS[name]) for name in deployment}
    RunRecord("toy", labels, logits, summary={"dataset": "synthetic"}, settings=settings or {},
              deployment=deployment, descriptors=descriptors).save(folder)
    return analyse_run(folder)


FLOAT = _timed(400, 1000.0)
SWEEP = {"float": FLOAT, "a8w8": _timed(100, 2000.0), "a8w7": _timed(100, 1980.0), "a8w5": _timed(100, 2010.0),
         "a8w4": _timed(50, 900.0), "theirs": _timed(200, 500.0)}


def test_the_int8_family_costs_the_same_and_the_best_error_of_it_is_chosen(tmp_path):
    rec = recommend(_run(tmp_path / "run", SWEEP), Objective(allow_slower=True))
    assert (rec.choice, rec.runner_up) == ("a8w8", "a8w7")
    a8w7 = rec.outcomes["a8w7"]
    assert (a8w7.outcome, a8w7.equal_to) == ("equal_cost", "a8w8")
    assert "stores and runs as a8w8 does: int8 containers" in a8w7.reason and "0.70% vs" not in a8w7.reason
    assert "top-1 error 10.20% vs 10.70%" in a8w7.reason  # float 10.00%: a8w8 +0.2 pp, a8w7 +0.7 pp
    assert rec.outcomes["a8w4"].outcome == "collapsed"
    a8w5 = rec.outcomes["a8w5"]
    assert a8w5.outcome == "outside" and "2.04% of the 980 confident predictions swapped (20" in a8w5.reason
    assert "+2.00 pp" in a8w5.reason
    theirs = rec.outcomes["theirs"]  # eligible (no swap), but larger than the choice and slower than float
    assert theirs.outcome == "larger" and "2.00× a8w8's weight bytes" in theirs.reason and "slower than float" in \
        theirs.reason
    assert rec.outcomes["float"].outcome == "larger" and "4.00×" in rec.outcomes["float"].reason
    assert rec.ranked == ("a8w8", "a8w7", "theirs", "float") and rec.float_confident == N - UNSURE
    assert rec.warnings == ()


def test_the_smallest_within_the_thresholds_is_chosen_even_slower_than_float_with_a_warning(tmp_path):
    deployment = {"float": FLOAT, "a8w8": _timed(100, 2000.0), "w4": _timed(50, 600.0)}
    rec = recommend(_run(tmp_path / "run", deployment), Objective(allow_slower=True))
    assert rec.choice == "w4" and rec.runner_up == "a8w8"
    slower = next(w for w in rec.warnings if "w4 (the choice) is slower than float" in w)
    assert "packed INT4, have no integer kernel" in slower  # why, from its descriptor
    assert any("Where speed matters more than size, a8w8" in w for w in rec.warnings)
    # the same run asked for the fastest: a8w8, and w4 loses for being slower than it
    fastest = recommend(analyse_run(tmp_path / "run"), Objective("fastest", allow_slower=True))
    assert fastest.choice == "a8w8" and fastest.outcomes["w4"].outcome == "slower_than_choice"


def test_speeds_within_noise_tie_and_a_clear_difference_decides_between_equal_sizes(tmp_path):
    # peer is clearly faster than a8w8 (blocks 3000 ± 5% against 2000 ± 5%): same bytes, it wins despite more error
    deployment = {"float": FLOAT, "a8w8": _timed(100, 2000.0), "peer": _timed(100, 3000.0)}
    rec = recommend(_run(tmp_path / "run", deployment))
    assert rec.choice == "peer" and rec.outcomes["a8w8"].outcome == "slower"
    assert rec.outcomes["a8w8"].equal_to == "peer"
    # with a wide spread the same numbers are the same speed within noise: the error decides
    noisy = {"float": FLOAT, "a8w8": _timed(100, 2000.0, spread=0.5), "peer": _timed(100, 3000.0, spread=0.5)}
    rec = recommend(_run(tmp_path / "noisy", noisy))
    assert rec.choice == "a8w8" and rec.outcomes["peer"].outcome == "equal_cost"
    assert "the same stored weight bytes as a8w8 and the same speed within noise" in rec.outcomes["peer"].reason


def test_int8_containers_run_the_same_kernels_whatever_the_clock_said(tmp_path):
    """a8w7 timed 1.5x faster than a8w8 is the machine's drift: the same graph of int8 kernels."""
    deployment = {"float": FLOAT, "a8w8": _timed(100, 2000.0), "a8w7": _timed(100, 3000.0)}
    run = _run(tmp_path / "run", deployment)
    rec = recommend(run)
    assert rec.choice == "a8w8" and rec.outcomes["a8w7"].outcome == "equal_cost"
    from ptqcal.analysis.judgement import kernel_twins_note

    assert kernel_twins_note(run).startswith("a8w8, a8w7 store their weights in the same int8 containers")


def test_thresholds_come_from_the_runs_settings(tmp_path):
    run = _run(tmp_path / "run", SWEEP, settings={"ship_max_delta_error": 0.005})
    rec = recommend(run)
    assert rec.objective == Objective("smallest", 0.005, MAX_CONFIDENT_SWAPPED)
    assert rec.outcomes["a8w7"].outcome == "outside" and rec.choice == "a8w8"
    assert Objective.from_settings({}) == Objective("smallest", MAX_DELTA_ERROR, MAX_CONFIDENT_SWAPPED)
    with pytest.raises(ValueError):
        Objective("cheapest")


def test_a_mixed_model_slower_than_float_and_too_few_confident_predictions_are_warned_of(tmp_path):
    deployment = {"float": FLOAT, "a8w8": _timed(100, 2000.0), "mixed": _timed(75, 400.0)}
    rec = recommend(_run(tmp_path / "run", deployment, unsure=N - 10), Objective(allow_slower=True))  # 10 confident
    assert rec.float_confident == 10 < MIN_CONFIDENT
    assert rec.choice == "mixed"  # smallest, swaps nothing
    assert any("mixed (the choice) is slower than float" in w for w in rec.warnings)
    assert any("only 10 predictions" in w for w in rec.warnings)


def test_no_quantized_configuration_within_the_thresholds_means_ship_float(tmp_path):
    rec = recommend(_run(tmp_path / "run", {"float": FLOAT, "a8w5": _timed(100, 2000.0), "a8w4": _timed(50, 900.0)}))
    assert rec.choice == "float" and rec.runner_up is None
    assert any("ship the float model" in w for w in rec.warnings)


def test_an_untimed_run_ranks_by_size_and_error_and_says_so(tmp_path):
    sizes = {name: Deployment(4 * w, w, 0, 64) for name, w in (("float", 400), ("a8w8", 100), ("a8w7", 100))}
    rec = recommend(_run(tmp_path / "run", sizes))
    assert rec.choice == "a8w8" and rec.outcomes["a8w7"].outcome == "equal_cost"
    assert any("not timed" in w for w in rec.warnings)


def test_recommendation_json_is_strict_and_the_report_opens_each_section_with_it(tmp_path):
    run = _run(tmp_path / "run", SWEEP)
    build_report([tmp_path / "run"], tmp_path / "out")

    def refuse(token):
        raise ValueError(token)

    document = json.loads((tmp_path / "out" / "recommendation.json").read_text(), parse_constant=refuse)
    assert document["format"] == 1
    (entry,) = document["runs"]
    assert (entry["model"], entry["choice"], entry["runner_up"]) == ("toy", "a8w8", "a8w7")
    assert entry["objective"]["max_delta_top1_error"] == MAX_DELTA_ERROR and entry["float_confident"] == 980
    configs = {c["config"]: c for c in entry["configs"]}
    assert configs["a8w8"]["rank"] == 1 and configs["a8w4"]["rank"] is None
    assert configs["a8w7"]["equal_to"] == "a8w8" and configs["a8w4"]["outcome"] == "collapsed"
    assert configs["a8w8"]["weight_vs_float"] == 0.25 and configs["a8w8"]["confident_swapped"] == 0
    speed = configs["a8w8"]["speed_vs_float"]
    assert speed["value"] == pytest.approx(2.0) and speed["low"] == pytest.approx(1900 / 1050)
    assert entry["sentence"] == sentence(recommend(run)) and entry["sentence"].startswith("toy: ship a8w8 (")
    assert recommendation_json([recommend(run)]) == (tmp_path / "out" / "recommendation.json").read_text()
    report = (tmp_path / "out" / "report.md").read_text()
    section = report[report.index("## toy"):]
    assert section.split("\n\n")[1].startswith("**What to ship**: **a8w8**")
    assert "**a8w7** (equal cost): stores and runs as a8w8 does: int8 containers" in section


def test_by_default_a_configuration_slower_than_float_is_not_recommended(tmp_path):
    """Shipping a model slower than the float model it replaces is a loss: by default it is outside
    the thresholds, said so, and the smallest configuration that is not slower is chosen."""
    deployment = {"float": FLOAT, "a8w8": _timed(100, 2000.0), "w4": _timed(50, 600.0)}
    rec = recommend(_run(tmp_path / "run", deployment))
    assert rec.choice == "a8w8" and rec.outcomes["w4"].outcome == "outside"
    assert "slower than float on this CPU" in rec.outcomes["w4"].reason
