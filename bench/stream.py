"""Streaming on an ImageNet-sized model: flat memory and evaluation speed (EfficientNet-Lite0, 224 px).

    python bench/stream.py [--quick]

1. memory: peak RSS of a whole ``ptqcal run`` (float + a8w8, 256 calibration images) on 1,000 and
   on 10,000 evaluation images, each run in a fresh process (``ru_maxrss``), and their ratio;
2. speed: the float evaluation of 1,000 images through ptqcal's stream (decode -> normalise ->
   ``session.run`` with a prefetch thread), with the pixels decoded on the way or read from the
   pixel cache, against bare ``session.run`` on the same images decoded and normalised beforehand,
   at the batch ptqcal chooses;
3. the deployed-vs-simulated check: the run on 1,000 images again with ``--check-images 0``.

Images: the 270 real ImageNet samples of ../shared, each made into several by a horizontal flip, a
crop of 70-100% of its side at a seeded position, and a rescale of the short side to 230-300 px
(JPEG quality 90), so decoding costs what real photos cost. The model is exported to ONNX once
(the runs measured take the ``.onnx`` file, as users do, without torch in the process).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("PTQCAL_SHARED", HERE.parents[1] / "shared"))
warnings.filterwarnings("ignore")


def make_images(count: int, folder: Path) -> Path:
    """``count`` JPEGs made from the real samples, listed with their labels in ``labels.csv``."""
    from PIL import Image

    from ptqcal.data import load_csv

    source = load_csv(SHARED / "data/imagenet_samples/labels.csv")
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        original = source.images[index % len(source)]
        with Image.open(original) as image:
            image = image.convert("RGB")
            if (index // len(source)) % 2:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            side = rng.uniform(0.7, 1.0)
            w, h = image.size
            cw, ch = int(w * side), int(h * side)
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((left, top, left + cw, top + ch))
            short = int(rng.integers(230, 301))
            scale = short / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BILINEAR)
            name = f"{index:05d}.jpg"
            image.save(folder / name, quality=90)
        rows.append((name, int(source.labels[index % len(source)])))
    with open(folder / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    return folder / "labels.csv"


def export_lite0(folder: Path) -> Path:
    """EfficientNet-Lite0 as ONNX with its preprocessing in the metadata (in a child process, so
    that torch never enters the processes measured)."""
    path = folder / "lite0.onnx"
    code = ("import sys, numpy as np\n"
            "from ptqcal.models import get_model_entry\nfrom ptqcal.export import export_onnx\n"
            "from ptqcal.models.preprocess import METADATA_KEY\n"
            "entry = get_model_entry('efficientnet_lite0')\n"
            "x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)\n"
            "export_onnx(entry.build(None, None, sys.argv[2]), x, sys.argv[1],"
            " metadata={METADATA_KEY: entry.preprocess.to_metadata()})\n")
    subprocess.run([sys.executable, "-c", code, str(path), str(folder)], check=True)
    return path


def run_peak(model: Path, labels: Path, eval_size: int, out: Path, *extra: str) -> tuple[float, float]:
    """Peak RSS (MB) and wall time (s) of one ``ptqcal run`` in a fresh process."""
    code = ("import json, resource, sys, time\nfrom ptqcal.cli import main\nstart = time.perf_counter()\n"
            "code = main(sys.argv[1:])\n"
            "print(json.dumps([code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            "time.perf_counter() - start]))\n")
    args = ["run", "--model", str(model), "--dataset", "csv", "--data-dir", str(labels), "--weight-bits", "8",
            "--calib-size", "256", "--eval-size", str(eval_size), "--no-progress", "--quiet", "--out", str(out), *extra]
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    status, peak, seconds = json.loads(completed.stdout.strip().splitlines()[-1])
    assert status == 0, completed.stderr
    return peak, seconds


def speed(model: Path, labels: Path, count: int, folder: Path) -> dict[str, float]:
    """Float evaluation images/s: bare session.run on ready arrays vs ptqcal's stream."""
    from ptqcal import steps
    from ptqcal.cache import Cache
    from ptqcal.config import RunConfig
    from ptqcal.data import load_csv
    from ptqcal.evaluate import make_session
    from ptqcal.models import inspect_onnx, onnx_preprocess
    from ptqcal.data.pixels import Pixels

    preprocess = onnx_preprocess(inspect_onnx(model))
    split = load_csv(labels).take(np.arange(count))
    prepared = steps.prepare_for_quantization(Cache(folder / "prep"), model)
    batch = steps.choose_batches(prepared, preprocess, RunConfig()).eval
    cfg = RunConfig(batch_size=batch, progress=False)
    timings = {}
    for name, pixel_cache in (("stream, decoding", folder / "pixels"), ("stream, pixels cached", folder / "pixels")):
        pixels = Pixels(split, preprocess, Cache(pixel_cache))
        start = time.perf_counter()
        steps.model_logits(Cache(folder / f"logits-{len(timings)}"), model, pixels, preprocess, cfg, "float")
        timings[name] = count / (time.perf_counter() - start)
    ready = [preprocess(b) for b in Pixels(split, preprocess, Cache(folder / "pixels")).batches(batch)]
    start = time.perf_counter()  # from the session's creation, as the stream's timing is
    session = make_session(model)
    for inputs in ready:
        session.run(None, {session.get_inputs()[0].name: inputs})
    timings["bare session.run"] = count / (time.perf_counter() - start)
    for name, rate in timings.items():
        print(f"  {name:24s} {rate:6.1f} images/s (batch {batch})")
    return {"stream with decoding / bare": timings["stream, decoding"] / timings["bare session.run"],
            "stream from pixel cache / bare": timings["stream, pixels cached"] / timings["bare session.run"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 and 1,000 images instead of 1,000 and 10,000")
    parser.add_argument("--part", choices=("all", "speed", "memory"), default="all")
    args = parser.parse_args()
    if not (SHARED / "data/imagenet_samples/labels.csv").exists():
        print("skipped: ../shared/data/imagenet_samples is not here")
        return
    small, large = (200, 1000) if args.quick else (1000, 10_000)
    with tempfile.TemporaryDirectory(prefix="ptqcal-stream-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        count = large + 256 if args.part != "speed" else small
        labels = make_images(count, folder / "images")
        print(f"made {count} images in {time.perf_counter() - start:.0f} s")
        model = export_lite0(folder)
        ratios = speed(model, labels, small, folder / "speed") if args.part != "memory" else {}
        peaks, seconds_small = {}, 0.0
        for count in (small, large) if args.part != "speed" else ():
            peak, seconds = run_peak(model, labels, count, folder / f"run{count}")
            peaks[count] = peak
            seconds_small = seconds if count == small else seconds_small
            print(f"  ptqcal run, {count:6d} evaluation images: peak RSS {peak:7.0f} MB, {seconds:6.1f} s")
        if peaks:
            ratios[f"peak RSS: {large} / {small} images"] = peaks[large] / peaks[small]
            _, unchecked = run_peak(model, labels, small, folder / "unchecked", "--check-images", "0")
            print(f"  ptqcal run, {small:6d} evaluation images, --check-images 0: {unchecked:6.1f} s")
            ratios["run without the path check / with it (64 images)"] = unchecked / seconds_small
    print("\nratios")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")


if __name__ == "__main__":
    main()
