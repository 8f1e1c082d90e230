"""Peak memory and time of ptqcal's streaming calibrator vs ONNX Runtime's Percentile calibrator.

Each measurement runs in a fresh subprocess and reports that process's peak RSS (VmHWM), so the
numbers include the Python interpreter and the ONNX Runtime session; the model is a ResNet56 of CIFAR shape (random weights: memory
and time do not depend on them).

    python bench/calibration.py [--images 256 2048] [--model resnet56]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
method, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
from ptqcal.quantize import ArrayDataReader
images = np.random.default_rng(0).normal(size=(n, 3, 32, 32)).astype(np.float32)

def peak_kb():
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork + exec
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

baseline = peak_kb()
start = time.perf_counter()
if method == "ptqcal":
    from ptqcal.quantize import collect_histograms, compute_ranges
    ranges = compute_ranges(collect_histograms(model, ArrayDataReader("input", images, 32), progress=False),
                            "percentile")
    count = len(ranges.ranges)
else:
    import tempfile
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(model, augmented_model_path=f"{tmp}/augmented.onnx",
                                       calibrate_method=CalibrationMethod.Percentile)
        calibrator.collect_data(ArrayDataReader("input", images, 32))
        count = len(calibrator.compute_data().data)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": peak_kb() / 1024, "input_mb": images.nbytes / 2**20,
                  "baseline_mb": baseline / 1024, "tensors": count}))
"""


def build_model(depth: int, folder: Path) -> Path:
    import torch

    from ptqcal.export import export_onnx
    from ptqcal.models.resnet import CifarResNet
    from ptqcal.quantize import prepare

    torch.manual_seed(0)
    model = CifarResNet(depth, 100).eval()
    sample = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    export_onnx(model, sample, folder / "float.onnx")
    return prepare(folder / "float.onnx", folder / "prepared.onnx")


def measure(method: str, model: Path, images: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(model), str(images)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(image_counts: list[int], depth: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(depth, Path(tmp))
        for images in image_counts:
            for method in ("ptqcal", "ort-percentile"):
                row = {"method": method, "images": images, **measure(method, model, images)}
                rows.append(row)
                print(f"  {method:15s} {images:5d} images: {row['seconds']:7.1f} s, peak RSS {row['peak_mb']:8.0f} MB "
                      f"(inputs {row['input_mb']:.0f} MB, {row['tensors']} tensors)", flush=True)
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    by = {(r["method"], r["images"]): r for r in rows}
    counts = sorted({r["images"] for r in rows})
    small, large = counts[0], counts[-1]
    return {
        f"ORT/ptqcal peak memory at {large}": by["ort-percentile", large]["peak_mb"] / by["ptqcal", large]["peak_mb"],
        f"ptqcal peak memory {large}/{small} images": by["ptqcal", large]["peak_mb"] / by["ptqcal", small]["peak_mb"],
        f"ORT peak memory {large}/{small} images": by["ort-percentile", large]["peak_mb"] / by["ort-percentile", small]["peak_mb"],
        f"ORT/ptqcal time at {large}": by["ort-percentile", large]["seconds"] / by["ptqcal", large]["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--depth", type=int, default=56)
    args = parser.parse_args()
    rows = run(args.images, args.depth)
    for name, value in ratios(rows).items():
        print(f"{name}: {value:.2f}x")


if __name__ == "__main__":
    main()
