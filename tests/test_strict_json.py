"""run.json and metrics.json are strict JSON: no NaN or Infinity token (every JSON parser reads
them); an undefined number is null, read back as NaN or None."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_record_with_undefined_numbers_writes_strict_json_and_reads_them_back(tmp_path):
    from ptqcal.analysis import build_report
    from ptqcal.evaluate import RunRecord
    from ptqcal.evaluate.attribution import Attribution, LayerEffect
    from ptqcal.evaluate.deploy import Deployment
    from ptqcal.evaluate.record import ConfigInfo, ConfigKind

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    logits = (rng.normal(size=(60, 4)) + 2 * np.eye(4)[labels]).astype(np.float32)
    # a8w8 swaps nothing: its Δ error per swapped prediction is undefined (NaN in memory)
    record = RunRecord("m", labels, {"float": logits, "a8w8": logits.copy()},
                       deployment={"float": Deployment(100, 80, 1, 8, float("nan"), float("inf"), None)},
                       attribution=Attribution([LayerEffect("conv", 8, 0.0, float("nan"), 0.0, float("inf"))], 60, 0),
                       seconds=float("nan"), summary={"ratio": float("nan")},
                       descriptors={"float": ConfigInfo("float", ConfigKind.FLOAT),
                                    "a8w8": ConfigInfo("a8w8", ConfigKind.UNIFORM, 8, 8)})
    record.save(tmp_path / "run")
    run = _strict((tmp_path / "run" / "run.json").read_text())
    assert run["seconds"] is None and run["deployment"]["float"]["latency_ms"] is None
    back = RunRecord.load(tmp_path / "run")
    assert math.isnan(back.attribution.effects[0].confident_swapped)
    build_report([tmp_path / "run"], tmp_path / "report")
    metrics = _strict((tmp_path / "report" / "metrics.json").read_text())
    row = next(c for c in metrics["runs"][0]["configs"] if c["config"] == "a8w8")
    assert row["swapped"] == 0 and row["delta_error_per_swapped"] is None


@pytest.mark.slow
def test_a_real_runs_json_files_are_strict(tmp_path):
    pytest.importorskip("sklearn")
    from ptqcal.cli import main

    assert main(["run", "--model", "digits_resnet8", "--weight-bits", "8", "4", "--no-timing", "--no-progress",
                 "--quiet", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "models")]) == 0
    for name in ("run.json", "metrics.json", "guard.json"):
        _strict((tmp_path / "run" / name).read_text())
