"""Nothing moved: the default run and the authors' ResNet20 on the shared real images give the
numbers ptqcal 0.2.0 gave (a check against the previous release's output, not a source of truth;
the truths are tested elsewhere). 0.2.0 wrote percent; 0.3 writes fractions."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file

from ptqcal.evaluate.cpu import cpu_flags, has_vnni
from ptqcal.evaluate.metrics import FRACTION, Metrics

HERE = Path(__file__).parent / "regression"
RENAMED = {"swapped_pct": "swapped", "delta_top1_error_pp": "delta_top1_error",
           "correct_to_wrong_pct": "correct_to_wrong", "wrong_to_correct_pct": "wrong_to_correct",
           "wrong_to_other_wrong_pct": "wrong_to_other_wrong"}


def _previous(name: str) -> dict:
    """The previous release's numbers for ``name``, as recorded on a CPU whose kernels are this one's:
    ORT's integer kernels differ with VNNI (see test_cpu_kernels.py), and float ones with AVX-512 (the
    trained digits models, most numbers of the run). A skip, before any run, where none was."""
    cpu = {"vnni": has_vnni(), "avx512": "avx512f" in (cpu_flags() or ())}
    for path in sorted(HERE.glob(f"{name}*.json")):
        previous = json.loads(path.read_text())
        if {key: previous[key] for key in cpu} == cpu:
            return {**previous, "file": path.name}
    pytest.skip(f"{name} was not recorded on a CPU whose kernels are this one's ({cpu})")


@pytest.fixture
def previous_default() -> dict:
    """Asked for before the session's default run, so that a CPU with no record skips without it."""
    return _previous("default_run")


def _same_numbers(previous: dict, metrics_file: Path) -> int:
    runs = {run["model"]: {c["config"]: c for c in run["configs"]}
            for run in json.loads(metrics_file.read_text())["runs"]}
    compared = 0
    for model, configs in previous["runs"].items():
        assert list(runs[model]) == list(configs)
        for config, values in configs.items():
            for old_key, old in values.items():
                if old_key.endswith("_temperature"):  # 0.3 fits the temperature on held-out images on purpose
                    continue
                key = RENAMED.get(old_key, old_key)
                expected = old / 100 if Metrics.unit(key) == FRACTION else old
                now = runs[model][config][key]
                assert now is not None and math.isclose(now, expected, rel_tol=1e-9, abs_tol=1e-12), \
                    f"{model} {config} {key}: {now} != {expected} ({previous['file']}: {previous['cpu']})"
                compared += 1
    return compared


@pytest.mark.slow
def test_the_default_run_gives_the_previous_releases_numbers(previous_default, default_run):
    assert default_run.code == 0
    assert _same_numbers(previous_default, default_run.out / "metrics.json") > 180


@pytest.mark.slow
def test_the_authors_resnet20_gives_the_previous_releases_numbers(tmp_path):
    from ptqcal.cli import main

    previous = _previous("resnet20_cifar120")
    test = np.load(shared_file("data/cifar100/test_head20.npz"))
    train = np.load(shared_file("data/cifar100/train_subset.npz"))
    weights = shared_file("models/cifar100_resnet20.pth")
    data = tmp_path / "c120.npz"
    np.savez(data, images=np.concatenate([test["images"], train["images"]]),
             labels=np.concatenate([test["labels"], train["labels"]]),
             calib_images=train["images"], calib_labels=train["labels"])
    assert main(["run", "--model", "cifar_resnet20", "--weights", str(weights), "--dataset", str(data),
                 "--calib-size", "100", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert _same_numbers(previous, tmp_path / "run" / "metrics.json") > 90
