"""The engine's floor: how close a ptqcal sweep comes to ONNX Runtime alone running its models.

    python bench/floor.py [--quick] [--part resnet56|lite0|all]

For one sweep, in the same minutes:

- **the floor**: the sum over every configuration the run evaluated (float, each quantized model) of
  bare ``session.run`` over the same images, pre-normalised in memory, at the run's batch size,
  with the best session settings for this CPU (found here among ORT's threads, spinning, arena,
  memory pattern, execution mode and optimisation level: printed);
- **ptqcal end to end** (``ptqcal run`` in this process, fresh run folder), its ratio to the floor,
  and where the difference goes, from a second fresh run with its steps timed: export, calibration,
  quantization, evaluation beyond the floor, the deployed-vs-simulated check, deployment timing,
  report (decoding counts in the evaluation that first reads each image);
- the batch size that gives ORT the most images/s (32 ... 512), and whether the logits depend on it;
- calibration against one float pass over the same images.

Models: ResNet56 (random weights, CIFAR-shaped, 1,024 calibration / 10,000 evaluation images from
the real CIFAR-100 images of ../shared, flipped and shifted to the count) and EfficientNet-Lite0 on
JPEGs made from the 270 real ImageNet samples (flips, crops, rescales: ``stream.make_images``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RESNET56_TARGET = 1.15  # end to end / floor, the issue's targets
LITE0_TARGET = 1.25
CALIBRATION_TARGET = 3.0  # calibration / one float pass

# Candidate session settings: ORT's defaults, then one change at a time
SETTINGS = {
    "ORT defaults": {},
    "intra-op threads = physical cores": {"threads": "cores"},
    "no spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
    "arena off": {"enable_cpu_mem_arena": False},
    "memory pattern off": {"enable_mem_pattern": False},
    "parallel execution": {"execution_mode": "parallel"},
    "extended optimisation (no layout change)": {"level": "extended"},
}


def session(path: Path, setting: dict):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if setting.get("threads") == "cores":
        from ptqcal.quantize.histogram import usable_cores

        options.intra_op_num_threads = usable_cores()
    for key, value in setting.get("config", {}).items():
        options.add_session_config_entry(key, value)
    if "enable_cpu_mem_arena" in setting:
        options.enable_cpu_mem_arena = setting["enable_cpu_mem_arena"]
    if "enable_mem_pattern" in setting:
        options.enable_mem_pattern = setting["enable_mem_pattern"]
    if setting.get("execution_mode") == "parallel":
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if setting.get("level") == "extended":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_batches(sess, inputs: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Seconds of ``session.run`` alone over ``inputs`` in batches (after one warm-up batch), and the
    logits."""
    name = sess.get_inputs()[0].name
    sess.run(None, {name: inputs[:batch]})
    total, logits = 0.0, []
    for start in range(0, len(inputs), batch):
        part = np.ascontiguousarray(inputs[start:start + batch])
        begin = time.perf_counter()
        logits.append(sess.run(None, {name: part})[0])
        total += time.perf_counter() - begin
    return total, np.concatenate(logits)


def bare_seconds(sess, inputs: np.ndarray, batch: int) -> float:
    return timed_batches(sess, inputs, batch)[0]


def best_settings(models: dict[str, Path], inputs: np.ndarray, batch: int) -> dict[str, str]:
    """For each model, the setting of :data:`SETTINGS` with the shortest bare pass over ``inputs``."""
    best = {}
    for config, path in models.items():
        times = {label: bare_seconds(session(path, setting), inputs, batch) for label, setting in SETTINGS.items()}
        best[config] = min(times, key=times.get)
        row = ", ".join(f"{label} {seconds:.2f}" for label, seconds in times.items())
        print(f"    settings, {config} ({len(inputs)} images, batch {batch}), seconds: {row}")
    return best


def floor(models: dict[str, Path], inputs: np.ndarray, batch: int, settings: dict[str, str]) -> dict[str, float]:
    """Bare ``session.run`` seconds of each configuration over all ``inputs`` with its best setting."""
    return {config: bare_seconds(session(path, SETTINGS[settings[config]]), inputs, batch)
            for config, path in models.items()}


def batch_sizes(path: Path, inputs: np.ndarray, sizes=(32, 64, 128, 256, 512)) -> tuple[dict[int, float], bool]:
    """Images/s of bare ``session.run`` at each batch size, and whether the logits are bitwise
    the same at every size."""
    sess = session(path, {})
    timed = {size: timed_batches(sess, inputs, size) for size in sizes}
    rates = {size: len(inputs) / seconds for size, (seconds, _) in timed.items()}
    same = all(np.array_equal(timed[sizes[0]][1], logits) for _, logits in timed.values())
    return rates, same


# Where a run's time goes: these functions are wrapped with timers for a second fresh run (a
# profiler's overhead would inflate the Python-heavy phases, e.g. drawing, twofold). A phase called
# inside another counts there (the check's simulated-path logits count under the check).
PHASES = {
    "export (or loading the .onnx)": ("ptqcal.pipeline", "_export"),
    "quant_pre_process": ("ptqcal.steps", "prepare_for_quantization"),
    "choosing batches": ("ptqcal.steps", "choose_batches"),
    "calibration": ("ptqcal.steps", "calibrate"),
    "quantization": ("ptqcal.steps", "quantize_config"),
    "evaluation (logits of every configuration)": ("ptqcal.steps", "model_logits"),
    "deployed-vs-simulated check": ("ptqcal.checks", "check_deployment"),
    "deployment timing": ("ptqcal.steps", "deployment"),
    "float ops of the deployed graph": ("ptqcal.checks", "deployed_float_ops"),
    "report (figures, tables)": ("ptqcal.pipeline", "report_once"),
    "run record": ("ptqcal.evaluate.record", "RunRecord.save"),
}


def phase_times(cfg) -> tuple[float, dict[str, float]]:
    """Wall seconds of ``run(cfg)`` and each phase's own seconds (``other``: the rest)."""
    import importlib

    from ptqcal.pipeline import run

    seconds = dict.fromkeys(PHASES, 0.0)
    stack: list[float] = []  # the outer phase's start

    def wrap(label, fn):
        def timed(*args, **kwargs):
            if stack:  # inside another phase: counted there
                return fn(*args, **kwargs)
            stack.append(time.perf_counter())
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - stack.pop()
        return timed

    originals = []
    for label, (module_name, attribute) in PHASES.items():
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        originals.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrap(label, getattr(owner, name)))
    try:
        start = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - start
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    seconds["other"] = wall - sum(seconds.values())
    return wall, seconds


def report(label: str, ours: float, floor_by_config: dict[str, float], wall: float, phases: dict[str, float],
           target: float) -> dict[str, float]:
    bare = sum(floor_by_config.values())
    print(f"  {label}: the floor (bare session.run, every configuration): {bare:.1f} s "
          f"({', '.join(f'{c} {s:.1f}' for c, s in floor_by_config.items())})")
    print(f"  {label}: ptqcal end to end {ours:.1f} s = {ours / bare:.2f}x the floor (target <= {target}x)")
    print(f"  {label}: where the time goes (a second fresh run, {wall:.1f} s, its steps timed; the evaluation "
          f"includes the float logits of the calibration images):")
    for name, seconds in phases.items():
        print(f"    {name:44s} {seconds:7.1f} s  {100 * seconds / wall:5.1f}%")
    evaluation = phases["evaluation (logits of every configuration)"]
    print(f"    evaluation beyond the floor: {evaluation - bare:.1f} s")
    return {f"{label}: ptqcal end to end / floor": ours / bare}


def resnet56(quick: bool, folder: Path) -> dict[str, float]:
    from images import cifar_images

    from ptqcal.config import RunConfig
    from ptqcal.models.preprocess import CIFAR100_PREPROCESS
    from ptqcal.pipeline import run

    n_calib, n_eval, bits = (256, 2000, [8, 4]) if quick else (1024, 10_000, [8, 7, 6, 5, 4])
    data = folder / "cifar.npz"
    evaluation, calib = cifar_images(n_eval, 0), cifar_images(n_calib, 1)
    np.savez(data, images=evaluation, labels=np.zeros(n_eval, dtype=np.int64),
             calib_images=calib, calib_labels=np.zeros(n_calib, dtype=np.int64))
    cfg = RunConfig(model="cifar_resnet56", weights=Path("random"), dataset=str(data), calib_size=n_calib,
                    weight_bits=tuple(bits), out=folder / "run56", progress=False, quiet=True,
                    cache_dir=folder / "models")
    start = time.perf_counter()
    run(cfg)
    ours = time.perf_counter() - start
    return compare(cfg, ours, CIFAR100_PREPROCESS(evaluation), CIFAR100_PREPROCESS(calib), "ResNet56",
                   RESNET56_TARGET)


def compare(cfg, ours: float, inputs: np.ndarray, calib: np.ndarray, label: str, target: float,
            sample: int = 1024) -> dict[str, float]:
    """The floor of the run ``cfg`` wrote (its models, ``inputs`` pre-normalised, its batch), ptqcal's
    ``ours`` seconds against it, where they go, settings and batch sizes measured on ``sample``
    images, and calibration against one float pass over ``calib``."""
    run_dir = cfg.out
    measured = json.loads((run_dir / "run.json").read_text())["deployment"]
    batch = measured["float"]["batch_size"]  # the evaluation batch the run chose
    models = {p.stem.removeprefix("model_"): p for p in sorted(run_dir.glob("model_*.onnx"))}
    models = {"float": models.pop("float"), **models}
    settings = best_settings({c: models[c] for c in ("float", "a8w8")}, inputs[:sample], batch)
    print(f"    best: {settings}")
    chosen = {config: settings["float" if config == "float" else "a8w8"] for config in models}
    floor_by_config = floor(models, inputs, batch, chosen)
    wall, phases = phase_times(replace(cfg, out=run_dir.with_name(run_dir.name + "-timed")))
    ratios = report(label, ours, floor_by_config, wall, phases, target)
    agreement = {c: measured[c]["throughput"] * floor_by_config[c] / len(inputs) for c in floor_by_config
                 if measured.get(c, {}).get("throughput")}
    print(f"  {label}: the run's images/s ({measured['float'].get('throughput_source')}) / the floor's: "
          + ", ".join(f"{c} {r:.2f}" for c, r in agreement.items()))
    float_pass = bare_seconds(session(models["float"], {}), calib, batch)
    print(f"  {label}: calibration {phases['calibration']:.1f} s vs one float pass over the same "
          f"{len(calib)} images {float_pass:.1f} s: {phases['calibration'] / float_pass:.1f}x "
          f"(target <= {CALIBRATION_TARGET}x)")
    for config in ("float", "a8w8"):
        rates, same = batch_sizes(models[config], inputs[:2 * sample])
        print(f"  {label}: {config} images/s by batch size: " + ", ".join(f"{b}: {r:.0f}" for b, r in rates.items())
              + f"; logits {'identical' if same else 'NOT identical'} across batch sizes")
    ratios[f"{label}: calibration / one float pass"] = phases["calibration"] / float_pass
    return ratios


def lite0(quick: bool, folder: Path) -> dict[str, float]:
    import stream

    from ptqcal.config import RunConfig
    from ptqcal.models import inspect_onnx, onnx_preprocess
    from ptqcal.pipeline import run

    if not (stream.SHARED / "data/imagenet_samples/labels.csv").exists():
        print("  skipped: ../shared/data/imagenet_samples is not here")
        return {}
    n_eval, n_calib = (270, 128) if quick else (1000, 256)
    labels = stream.make_images(n_eval + n_calib, folder / "jpegs")
    model = stream.export_lite0(folder)
    cfg = RunConfig(model=str(model), dataset="csv", data_dir=labels, calib_size=n_calib, eval_size=n_eval,
                    weight_bits=(8, 7, 6, 5, 4) if not quick else (8, 4), out=folder / "runlite", progress=False,
                    quiet=True)
    start = time.perf_counter()
    run(cfg)
    ours = time.perf_counter() - start
    from ptqcal import steps
    from ptqcal.cache import Cache

    preprocess = onnx_preprocess(inspect_onnx(model))
    images = steps.draw_images(steps.load_run_dataset(cfg), cfg, preprocess, Cache(folder / "pixels"))
    inputs = preprocess(images.eval.materialise().images)
    calib = preprocess(images.calib.materialise().images)
    return compare(cfg, ours, inputs, calib, "EfficientNet-Lite0", LITE0_TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("resnet56", "lite0", "all"), default="all")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="ptqcal-floor-") as tmp:
        if args.part in ("resnet56", "all"):
            ratios.update(resnet56(args.quick, Path(tmp)))
        if args.part in ("lite0", "all"):
            ratios.update(lite0(args.quick, Path(tmp)))
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")


if __name__ == "__main__":
    main()
