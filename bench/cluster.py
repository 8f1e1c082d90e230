"""ptqcal on Ray: the overhead of ``--ray`` against the local path, and a scaling model for a cluster.

    python bench/cluster.py [--quick]

1. overhead: the ResNet56 sweep (random weights, CIFAR-sized images as in ``bench/run.py``; float +
   a8w8..a8w4) run locally and with ``--ray`` (a Ray started on this machine for the run, 2 CPUs),
   alternating, each on a fresh run folder (the model cache shared). Ray's own start and stop are
   timed apart, so the overhead of the tasks themselves shows.
2. scaling model: the same sweep, and EfficientNet-Lite0 on ImageNet-sized JPEGs (``stream.make_images``),
   run with an executor that does what Ray does one task at a time — the same tasks, the same
   batch-aligned shards — and times each. A node of this machine's kind (2 cores) then runs one task
   at a time at that speed (ONNX Runtime uses both cores), so N nodes finish a phase (export,
   calibration, quantization, inference) in ceil(tasks / N) rounds of its mean task. The driver's own
   work (timing, checks, report, the run folder) is the run's wall time minus every task's; it is
   kept as measured when the images grow (it is mostly per configuration). Predicted: 8 and 64
   nodes, for the sweep as run and for 50,000 evaluation images (ImageNet's validation set).
3. Lite0 with attribution (``--attribute``) at 4 weight widths, its (layer, bits) measurements
   timed as the tasks ``--ray`` runs (each replays the float activations up to its layer's cut,
   so a task costs about one pass over the attribution's images). They run on the attribution's
   own images (512 by default), not the evaluation images: the phase does not grow with them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

PHASES = ("_export", "calibrate", "quantize_config", "inference", "attribution_float", "layer_effect")
SCALED = ("inference",)  # the phases whose tasks grow with the evaluation images
ATTRIBUTION_BITS = (8, 6, 5, 4)
NODES = (1, 8, 64)


class TimedTasks:
    """The Local executor, but split and timed as Ray's tasks are (an :class:`ptqcal.executors.Executor`)."""

    side_by_side = False
    runs_ahead = True  # attribution's measurements as the tasks Ray runs, each timed

    def __init__(self):
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def task_threads(self, cfg):
        return cfg.threads  # one task at a time, with every core (the model's node)

    def map(self, fn, calls):
        results = []
        for args in calls:
            start = time.perf_counter()
            results.append(fn(*args))
            self.seconds[fn.__name__].append(time.perf_counter() - start)
        return results

    def warm_logits(self, cache, jobs, cfg):
        from ptqcal.executors import shards
        from ptqcal.steps import check_logits

        for job in jobs:
            if cache.has(job.kind, job.key(cfg), "npy"):
                continue
            parts = []
            for start, count in shards(len(job.pixels.labels), cfg.batch_size):
                began = time.perf_counter()
                parts.append(job.compute(cfg, start, count, progress=False))
                self.seconds["inference"].append(time.perf_counter() - began)
            logits = np.concatenate(parts)
            cache.array(job.kind, job.key(cfg), lambda: logits, check_logits)

    def close(self):
        pass


def timed_run(cfg, executor=None) -> float:
    from ptqcal.pipeline import run

    start = time.perf_counter()
    run(cfg, executor)
    return time.perf_counter() - start


def ray_start_stop() -> float:
    """Seconds to start and stop a local Ray the way ``--ray`` does."""
    from ptqcal.executors import LOCAL, RayCluster

    start = time.perf_counter()
    RayCluster(LOCAL).close()
    return time.perf_counter() - start


def overhead(cfg, folder: Path, rounds: int) -> dict[str, float]:
    local, ray = [], []
    for index in range(rounds):  # alternating, so that both see the same minutes of the machine
        local.append(timed_run(replace(cfg, out=folder / f"local{index}")))
        ray.append(timed_run(replace(cfg, out=folder / f"ray{index}", ray="local")))
    same = (folder / "local0" / "metrics.json").read_text() == (folder / "ray0" / "metrics.json").read_text()
    print(f"  the same metrics.json with and without Ray: {'yes' if same else 'NO'}")
    startup = min(ray_start_stop() for _ in range(2))
    best_local, best_ray = min(local), min(ray)
    print(f"  local: {', '.join(f'{t:.1f}' for t in local)} s; --ray: {', '.join(f'{t:.1f}' for t in ray)} s; "
          f"Ray start + stop alone: {startup:.1f} s")
    return {"--ray / local (best of each)": best_ray / best_local,
            "--ray without Ray's start and stop / local": (best_ray - startup) / best_local}


def scaling(name: str, cfg, n_eval: int) -> dict[str, float]:
    """Per-phase task counts and mean seconds of one sweep, and its predicted wall time on N nodes."""
    tasks = TimedTasks()
    wall = timed_run(cfg, tasks)
    work = sum(sum(v) for v in tasks.seconds.values())
    driver = wall - work
    print(f"  {name}: {wall:.1f} s on this machine; tasks {work:.1f} s, the driver's own work {driver:.1f} s")
    for phase in PHASES:
        times = tasks.seconds.get(phase, [])
        if times:
            print(f"    {phase:16s} {len(times):4d} tasks, mean {np.mean(times):6.2f} s, max {np.max(times):6.2f} s")
    out = {}
    for images, label in ((n_eval, "as run"), (50_000, "50,000 images")):
        scale = images / n_eval  # inference tasks grow with the images; the other phases do not
        predicted = {}
        for nodes in NODES:
            total = driver  # timing, checks and the report: mostly per configuration, not per image
            for phase in PHASES:
                times = tasks.seconds.get(phase, [])
                if not times:
                    continue
                count = math.ceil(len(times) * (scale if phase in SCALED else 1))
                total += math.ceil(count / nodes) * float(np.mean(times))
            predicted[nodes] = total
        print(f"    predicted, {label}: " + ", ".join(f"{n} node{'s' * (n > 1)} {t:.0f} s" for n, t in predicted.items()))
        for nodes in NODES[1:]:
            out[f"{name}, {label}: 1 node / {nodes} nodes (predicted speed-up)"] = predicted[1] / predicted[nodes]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--part", choices=("overhead", "scaling"), help="only one of the two")
    args = parser.parse_args()
    from images import cifar_images

    from ptqcal.config import RunConfig

    n_calib, n_eval, bits = (256, 2000, (8, 4)) if args.quick else (1024, 10_000, (8, 7, 6, 5, 4))
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ptqcal-bench-cluster-") as tmp:
        folder = Path(tmp)
        data = folder / "cifar.npz"
        np.savez(data, images=cifar_images(n_eval, 0), labels=np.zeros(n_eval, dtype=np.int64),
                 calib_images=cifar_images(n_calib, 1), calib_labels=np.zeros(n_calib, dtype=np.int64))
        cfg = RunConfig(model="cifar_resnet56", weights=Path("random"), dataset=str(data), calib_size=n_calib,
                        weight_bits=bits, progress=False, quiet=True, cache_dir=folder / "models")
        print(f"1. --ray against the local path: ResNet56, {n_calib} calibration / {n_eval} evaluation images, "
              f"weights {list(bits)}, {os.cpu_count()} CPUs")
        if args.part != "scaling":
            ratios.update(overhead(cfg, folder, 1 if args.quick else 2))
        if args.part == "overhead":
            return _print(ratios)
        print("2. scaling model")
        ratios.update(scaling("ResNet56", replace(cfg, out=folder / "timed"), n_eval))
        if (HERE.parents[1] / "shared" / "data/imagenet_samples/labels.csv").exists():
            import stream

            count = 540 if args.quick else 2_700
            labels = stream.make_images(count, folder / "jpegs")
            model = stream.export_lite0(folder)
            lite = RunConfig(model=str(model), dataset="csv", data_dir=labels, calib_size=256, weight_bits=bits,
                             progress=False, quiet=True, out=folder / "lite0")
            ratios.update(scaling("EfficientNet-Lite0", lite, count - 256))
            print(f"3. EfficientNet-Lite0 with attribution at weights {list(ATTRIBUTION_BITS)}")
            attributed = replace(lite, weight_bits=ATTRIBUTION_BITS, attribute=True, out=folder / "lite0-attribute",
                                 attribution_size=128 if args.quick else None)
            ratios.update(scaling("EfficientNet-Lite0 + attribution", attributed, count - 256))
    _print(ratios)


def _print(ratios: dict[str, float]) -> None:
    print("\nratios")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")


if __name__ == "__main__":
    main()
