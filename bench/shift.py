"""The cost of corruptions as a run axis: EfficientNet-Lite0 with 3 corruptions x 3 severities over the
real ImageNet samples of ../shared, against the same run clean and against the floor.

    python bench/shift.py [--quick]

- *clean*: ``ptqcal run`` of Lite0 (packaged ImageNet weights) at weight bits 8 and 4, untimed, from an
  empty cache;
- *shifted*: the same run with ``--corruptions gaussian_noise contrast jpeg_compression --severities 1 3
  5``, from an empty cache: 9 cells x 3 models (float, a8w8, a8w4) more;
- *added*: the shifted run into the clean run's folder, whose cache holds everything but the cells;
- *floor* of what the corruptions add: each cell's pixels corrupted by ``corrupt_pixels`` in one call
  (timed per image and corruption), normalised, and the run's three model files run by a bare
  ``session.run`` over them in the run's evaluation batches.

The ratio added / floor says what ptqcal's streaming, caching and bookkeeping cost on top of corrupting
and inferring. ``--quick``: 64 evaluation images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

CORRUPTIONS = ("gaussian_noise", "contrast", "jpeg_compression")
SEVERITIES = (1, 3, 5)
CALIB = 64


def _run(model: Path, labels: Path, out: Path, eval_size: int, *extra: str) -> float:
    from ptqcal.cli import main

    start = time.perf_counter()
    code = main(["run", "--model", str(model), "--dataset", "csv", "--data-dir", str(labels), "--weight-bits", "8",
                 "4", "--calib-size", str(CALIB), "--eval-size", str(eval_size), "--no-timing", "--no-progress",
                 "--quiet", "--out", str(out), *extra])
    assert code == 0
    return time.perf_counter() - start


def _floor(out: Path, labels: Path, eval_size: int) -> tuple[float, dict[str, float]]:
    """Seconds to corrupt every cell and run the run's three models on it bare; seconds per image by
    corruption (mean over severities)."""
    import onnxruntime as ort

    from ptqcal import steps
    from ptqcal.cache import Cache
    from ptqcal.config import RunConfig
    from ptqcal.data.corrupt import Corruption, corrupt_pixels
    from ptqcal.models import inspect_onnx, onnx_preprocess

    cfg = RunConfig(model=str(out / "model_float.onnx"), dataset="csv", data_dir=labels, calib_size=CALIB,
                    eval_size=eval_size)
    preprocess = onnx_preprocess(inspect_onnx(out / "model_float.onnx"))
    cache = Cache(out / "cache")
    images = steps.draw_images(steps.load_run_dataset(cfg), cfg, preprocess, cache)
    pixels = images.eval.materialise().images
    sessions = [ort.InferenceSession(str(out / f"model_{name}.onnx"), providers=["CPUExecutionProvider"])
                for name in ("float", "a8w8", "a8w4")]
    batch = steps.choose_batches(steps.prepare_for_quantization(cache, out / "model_float.onnx"), preprocess, cfg).eval
    total, per_image = 0.0, {name: 0.0 for name in CORRUPTIONS}
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            start = time.perf_counter()
            corrupted = corrupt_pixels(pixels, Corruption(name, severity), 0, np.arange(len(pixels)))
            corrupting = time.perf_counter() - start
            per_image[name] += corrupting / len(pixels) / len(SEVERITIES)
            inputs = preprocess(corrupted)
            start = time.perf_counter()
            for session in sessions:
                for first in range(0, len(inputs), batch):
                    session.run(None, {session.get_inputs()[0].name: inputs[first:first + batch]})
            total += corrupting + time.perf_counter() - start
    return total, per_image


def main() -> None:
    import stream

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    labels = stream.SHARED / "data/imagenet_samples/labels.csv"
    if not labels.exists():
        print("skipped: ../shared/data/imagenet_samples is not here")
        return
    eval_size = 64 if args.quick else 270 - CALIB
    with tempfile.TemporaryDirectory(prefix="ptqcal-shift-") as tmp:
        folder = Path(tmp)
        model = stream.export_lite0(folder)
        clean = _run(model, labels, folder / "clean", eval_size)
        cells = ["--corruptions", *CORRUPTIONS, "--severities", *map(str, SEVERITIES)]
        shifted = _run(model, labels, folder / "shifted", eval_size, *cells)
        added = _run(model, labels, folder / "clean", eval_size, *cells)
        again = _run(model, labels, folder / "clean", eval_size, *cells)
        floor, per_image = _floor(folder / "clean", labels, eval_size)
    print(f"EfficientNet-Lite0, {eval_size} evaluation images, {len(CORRUPTIONS)} corruptions x {len(SEVERITIES)} "
          f"severities, weight bits 8 and 4:")
    print(f"  clean run {clean:.1f} s; shifted run {shifted:.1f} s ({shifted / clean:.2f}x clean); the cells alone "
          f"(the clean run's cache) {added:.1f} s; a re-run from the cache {again:.1f} s")
    print(f"  what the corruptions add: {added:.1f} s against a floor of {floor:.1f} s (corrupt + bare session.run): "
          f"{added / floor:.2f}x")
    for name, seconds in per_image.items():
        print(f"  {name}: {1000 * seconds:.1f} ms per image (mean over severities {', '.join(map(str, SEVERITIES))})")


if __name__ == "__main__":
    main()
