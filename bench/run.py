"""ptqcal's speed and memory, each measured against its baseline in the same run.

    python bench/run.py [--quick]

1. the paper's sweep (float + a8w8..a8w4) on a CIFAR ResNet56: ptqcal end to end (export, one
   MSE calibration, QDQ graphs, deployed evaluation, report) vs PyTorch fake-quant done the
   paper's way (FakeQuantize modules with HistogramObserver activations and per-channel symmetric
   weights, BN folded, a fresh calibration per bit width), vs torch.ao's faster reference quantized
   model, and a re-run of ptqcal on its cache;
2. calibration memory and time: ptqcal's streaming histograms vs ORT's Percentile calibrator;
3. inference images/s: deployed int8 (QLinearConv) vs float ORT vs PyTorch float, batch 1 and 256,
   and ptqcal's evaluation loop vs bare ``session.run`` on pre-loaded arrays;
4. ImageNet-sized input: EfficientNet-Lite0 on the real ImageNet samples, decoding in worker
   threads vs one thread;
5. model size on disk: float vs a8w8 vs a8w4;
6. the engine's floor (``floor.py``): for the sweep of 1. and for an EfficientNet-Lite0 sweep on JPEGs,
   ptqcal end to end against ONNX Runtime alone running every configuration over the same images,
   where the difference goes, the best session settings and batch size, calibration against one
   float pass.

Real CIFAR-100 / ImageNet images come from ../shared (repeated with flips and shifts to the count)
when present, else random pixels. ResNet56 has random weights (seed 0): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from images import SHARED, cifar_images  # noqa: E402  (the folder is on the path from here on)
warnings.filterwarnings("ignore")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# --- 1. the sweep ------------------------------------------------------------------------------------

def fake_quant_model(model, weight_bits: int, act_bits: int = 8):
    """The paper's simulation: FakeQuantize modules (HistogramObserver activations, per-channel
    symmetric weights) inserted by ``prepare_qat_fx``, whose Conv-BN modules fold BatchNorm with
    its running statistics in eval mode."""
    import copy

    import torch
    from torch.ao.quantization import (FakeQuantize, HistogramObserver, PerChannelMinMaxObserver, QConfig,
                                       QConfigMapping)
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    qconfig = QConfig(
        activation=FakeQuantize.with_args(observer=HistogramObserver, quant_min=0, quant_max=2 ** act_bits - 1,
                                          dtype=torch.quint8, reduce_range=False),
        weight=FakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=-(2 ** (weight_bits - 1)),
                                      quant_max=2 ** (weight_bits - 1) - 1, dtype=torch.qint8,
                                      qscheme=torch.per_channel_symmetric, ch_axis=0))
    example = (torch.zeros(1, 3, 32, 32),)
    return prepare_qat_fx(copy.deepcopy(model).train(), QConfigMapping().set_global(qconfig), example).eval()


def torch_sweep(model, calib: np.ndarray, evaluation: np.ndarray, bits: list[int], reference: bool = False) -> float:
    """Float evaluation, then for each bit width a fresh calibration and a simulated evaluation:
    with FakeQuantize modules (the paper's way), or with torch.ao's reference quantized model.
    Returns seconds."""
    import torch
    from torch.ao.quantization import disable_fake_quant, disable_observer, enable_fake_quant, enable_observer

    from ptqcal.models.preprocess import CIFAR100_PREPROCESS
    from ptqcal.export.torch_reference import torch_fake_quant, torch_logits

    start = time.perf_counter()
    x_eval, x_calib = CIFAR100_PREPROCESS(evaluation), CIFAR100_PREPROCESS(calib)
    batches = [x_calib[i:i + 64] for i in range(0, len(x_calib), 64)]
    torch_logits(model, x_eval, 256)
    for b in bits:
        if reference:
            torch_logits(torch_fake_quant(model, batches, b, 8), x_eval, 256)
            continue
        simulated = fake_quant_model(model, b)
        simulated.apply(enable_observer)
        simulated.apply(disable_fake_quant)
        with torch.no_grad():
            for batch in batches:
                simulated(torch.from_numpy(batch))
        simulated.apply(disable_observer)
        simulated.apply(enable_fake_quant)
        torch_logits(simulated, x_eval, 256)
    return time.perf_counter() - start


def sweep(quick: bool, folder: Path) -> dict[str, float]:
    import torch

    from ptqcal.config import RunConfig
    from ptqcal.models import get_model_entry
    from ptqcal.pipeline import run

    n_calib, n_eval, bits = (128, 512, [8, 4]) if quick else (1024, 10_000, [8, 7, 6, 5, 4])
    data = folder / "cifar.npz"
    np.savez(data, images=cifar_images(n_eval, 0), labels=np.zeros(n_eval, dtype=np.int64),
             calib_images=cifar_images(n_calib, 1), calib_labels=np.zeros(n_calib, dtype=np.int64))
    cfg = RunConfig(model="cifar_resnet56", weights=Path("random"), dataset=str(data), calib_size=n_calib,
                    weight_bits=tuple(bits), out=folder / "run", progress=False, cache_dir=folder / "models")
    _, ours = timed(run, cfg)
    _, again = timed(run, cfg)
    model = get_model_entry("cifar_resnet56").build(Path("random"), None, folder)
    torch.set_num_threads(os.cpu_count() or 1)
    calib, evaluation = np.load(data)["calib_images"], np.load(data)["images"]
    baseline = torch_sweep(model, calib, evaluation, bits)
    reference = torch_sweep(model, calib, evaluation, bits, reference=True)
    print(f"  sweep of ResNet56, {n_calib} calibration / {n_eval} evaluation images, weights {bits}:")
    print(f"    PyTorch fake-quant, FakeQuantize modules (the paper's way): {baseline:7.1f} s")
    print(f"    PyTorch, torch.ao reference quantized model:                {reference:7.1f} s")
    print(f"    ptqcal end to end:                                          {ours:7.1f} s")
    print(f"    ptqcal re-run on its cache:                                 {again:7.1f} s")
    from ptqcal.models.preprocess import CIFAR100_PREPROCESS

    import floor

    # the engine's floor for this very run: its models, its images, its batch size
    engine = floor.compare(cfg, ours, CIFAR100_PREPROCESS(evaluation), CIFAR100_PREPROCESS(calib), "ResNet56 sweep",
                           floor.RESNET56_TARGET, 256 if quick else 1024)
    return {"sweep: PyTorch fake-quant / ptqcal": baseline / ours,
            "sweep: PyTorch reference model / ptqcal": reference / ours,
            "sweep: ptqcal re-run / first run": again / ours, **engine}


# --- 3. inference -------------------------------------------------------------------------------------

LATENCY_AGREEMENT = 0.2  # the run's a8w8/float latency ratio should agree with the benchmark's this well


def images_per_second(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        count += len(batch)
    return count / (time.perf_counter() - start)


def inference(quick: bool, folder: Path) -> dict[str, float]:
    import torch

    from ptqcal.evaluate import make_session, optimized_op_types, predict

    run_dir = folder / "run"
    float_path, int8_path = run_dir / "model_float.onnx", run_dir / "model_a8w8.onnx"
    assert "QLinearConv" in optimized_op_types(int8_path, folder), "a8w8 must run the deployed integer path"
    from ptqcal.models import get_model_entry

    model = get_model_entry("cifar_resnet56").build(Path("random"), None, folder)
    sessions = {"float ORT": make_session(float_path), "a8w8 ORT (QLinearConv)": make_session(int8_path)}
    seconds = 1.0 if quick else 6.0
    rows = {}
    rng = np.random.default_rng(0)
    for batch_size in (1, 256):
        x = rng.normal(size=(batch_size, 3, 32, 32)).astype(np.float32)
        for name, session in sessions.items():
            rows[name, batch_size] = images_per_second(lambda b, s=session: s.run(None, {"input": b}), x, seconds)
        with torch.no_grad():
            rows["PyTorch float", batch_size] = images_per_second(lambda b: model(torch.from_numpy(b)), x, seconds)
    for (name, batch_size), value in rows.items():
        print(f"  {name:24s} batch {batch_size:3d}: {value:9.0f} images/s")
    # the evaluator's own overhead: predict() over uint8 pixels vs session.run on ready float batches
    session = sessions["a8w8 ORT (QLinearConv)"]
    from ptqcal.models.preprocess import CIFAR100_PREPROCESS

    pixels = cifar_images(2048 if quick else 8192, 2)
    ready = CIFAR100_PREPROCESS(pixels)
    _, bare = timed(lambda: [session.run(None, {"input": ready[i:i + 256]}) for i in range(0, len(ready), 256)])
    _, ours = timed(predict, session, pixels, 256, progress=False, transform=CIFAR100_PREPROCESS)
    print(f"  evaluation loop: bare session.run {len(ready) / bare:.0f} images/s, ptqcal predict {len(ready) / ours:.0f}")
    # the run's own deployment numbers (batch-1 median latency) against this benchmark's batch-1 timing
    import json

    measured = json.loads((run_dir / "run.json").read_text())["deployment"]
    in_run = measured["a8w8"]["latency_ms"] / measured["float"]["latency_ms"]
    here = rows["float ORT", 1] / rows["a8w8 ORT (QLinearConv)", 1]
    agreement = in_run / here
    print(f"  latency a8w8 / float at batch 1: {in_run:.2f} in the run's report, {here:.2f} here "
          f"({'within' if abs(agreement - 1) <= LATENCY_AGREEMENT else 'NOT within'} {LATENCY_AGREEMENT:.0%})")
    return {"latency a8w8 / float: the run's report / this benchmark": agreement,
            "inference: a8w8 / float ORT at batch 256": rows["a8w8 ORT (QLinearConv)", 256] / rows["float ORT", 256],
            "inference: a8w8 / float ORT at batch 1": rows["a8w8 ORT (QLinearConv)", 1] / rows["float ORT", 1],
            "inference: float ORT / PyTorch float at batch 256": rows["float ORT", 256] / rows["PyTorch float", 256],
            "evaluator: ptqcal predict / bare session.run (throughput)": bare / ours}


# --- 4. ImageNet-sized input ----------------------------------------------------------------------

def imagenet(quick: bool, folder: Path) -> dict[str, float]:
    labels = SHARED / "data/imagenet_samples/labels.csv"
    if not labels.exists():
        print("  skipped: ../shared/data/imagenet_samples is not here")
        return {}
    from ptqcal.data import decode_images, load_csv
    from ptqcal.evaluate import make_session, predict
    from ptqcal.export import export_onnx
    from ptqcal.models import get_model_entry

    entry = get_model_entry("efficientnet_lite0")
    split = load_csv(labels)
    cfg = entry.preprocess
    sample, _ = decode_images(split.take(np.arange(8)), cfg.input_size, cfg.resize)
    path = export_onnx(entry.build(None, None, folder), cfg(sample.images), folder / "lite0.onnx").path
    session = make_session(path)
    results = {}
    for workers in (1, os.cpu_count() or 1):
        cpu_before = time.process_time()
        start = time.perf_counter()
        decoded, _ = decode_images(split, cfg.input_size, cfg.resize, workers=workers)
        decode_seconds = time.perf_counter() - start
        predict(session, decoded.images, 64, progress=False, transform=cfg)
        wall = time.perf_counter() - start
        cpu = (time.process_time() - cpu_before) / wall / (os.cpu_count() or 1)
        results[workers] = (len(decoded) / decode_seconds, len(decoded) / wall, cpu)
        print(f"  EfficientNet-Lite0, {len(decoded)} images, {workers} decode thread(s): decode "
              f"{results[workers][0]:.0f} images/s, decode + inference {results[workers][1]:.0f} images/s, "
              f"CPU use {100 * cpu:.0f}%")
    many = os.cpu_count() or 1
    return {f"decode: {many} threads / 1 thread": results[many][0] / results[1][0],
            f"decode + inference: {many} threads / 1 thread": results[many][1] / results[1][1]}


# --- 5. sizes ----------------------------------------------------------------------------------------------

def sizes(folder: Path) -> dict[str, float]:
    from ptqcal.quantize.graph import weight_bytes

    run_dir = folder / "run"
    float_path = run_dir / "model_float.onnx"
    float_size, float_weights = float_path.stat().st_size, weight_bytes(float_path)
    out = {}
    for name in ("a8w8", "a8w4"):
        path = run_dir / f"model_{name}.onnx"
        size, weights = path.stat().st_size, weight_bytes(path)
        print(f"  {name}: file {size / 1e6:.2f} MB vs float {float_size / 1e6:.2f} MB; "
              f"weights {weights / 1e6:.3f} MB vs {float_weights / 1e6:.3f} MB")
        out[f"size: {name} / float (file)"] = size / float_size
        out[f"size: {name} / float (weights)"] = weights / float_weights
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, for CI (< 5 minutes)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ptqcal-bench-") as tmp:
        folder = Path(tmp)
        print("1. sweep")
        ratios.update(sweep(args.quick, folder))
        print("2. calibration memory")
        import calibration

        counts = [64, 256] if args.quick else [256, 2048]
        ratios.update(calibration.ratios(calibration.run(counts, 56)))
        print("3. inference")
        ratios.update(inference(args.quick, folder))
        print("4. ImageNet-sized input")
        ratios.update(imagenet(args.quick, folder))
        print("5. model size")
        ratios.update(sizes(folder))
        print("6. EfficientNet-Lite0 sweep against the engine's floor")
        if args.quick:  # minutes more: the whole benchmark has it, and bench/floor.py --part lite0
            print("  skipped with --quick (python bench/floor.py --part lite0 --quick runs it alone)")
        else:
            import floor

            ratios.update(floor.lite0(False, folder / "lite0"))
    print("\nratios")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
