"""Per-layer attribution: the whole graph run for every (layer, bits), as attribution did, against
the graph cut at each layer (``ptqcal.evaluate.cut``), side by side in one run.

    python bench/attribute.py [--quick] [--part resnet56|lite0|all] [--repeats N]

Both ways take the same model, images, batches, widths (8 and 4) and layers, in this process, one
after the other (the whole graph first, then alternating; the least of ``--repeats`` runs counts);
their results are compared (the same swaps, the SQNR to float rounding). ``attribute``'s ``memo``
picks the layers: a layer left out is answered without running anything, in both ways alike. The
whole-graph way runs twice: as it was, and with the cut way's session options (no spinning while
idle), so the ratio the cut alone gives is printed too.

What bounds the ratio: the cut way runs, for each (layer, bits), the graph after the layer's cut;
the whole-graph way the whole graph (and twice more on 32 images, for the SQNR). So the ratio is
about 1 / the mean share of the graph's time that comes after a layer's cut: about a half when the
layers' costs are spread evenly, as in ResNet56 (its three stages take about a third each).

- ResNet56 (random weights, seed 0) on 512 CIFAR-sized real images (``images.cifar_images``; quick:
  256 images, every 3rd layer), batches of 128;
- EfficientNet-Lite0 with its packaged ImageNet weights on the 270 real ImageNet samples of
  ../shared decoded by ptqcal.data, batches of 32, every weight layer (quick: 96 images, every 10th).

The whole-graph way is the attribution before the cut, kept here verbatim (``whole_graph``) but for
its ``spinning`` switch (on by default, as it was).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

TARGET = 2.0  # whole graph / cut, the target
NO_SPIN = "whole graph, no spinning"  # the whole-graph way with the cut's session options
WIDTHS = (8, 4)
SCALE = "torch"


def whole_graph(model_path, batches, labels, widths, weight_scale, memo, spinning=True):
    """Attribution before the cut: every (layer, bits) runs the whole float graph with that layer's
    weights quantized over every image, and again over the first images with the layer's output
    exposed (the float graph too, once a layer). ``spinning=False``: its sessions with the cut way's
    session options (the only line changed from the attribution before the cut)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    from ptqcal.evaluate.attribution import CONFIDENT, SQNR_IMAGES, Attribution, LayerEffect
    from ptqcal.evaluate.metrics import quantization_change
    from ptqcal.evaluate.runner import make_session
    from ptqcal.quantize.graph import weighted_nodes
    from ptqcal.quantize.qdq import with_layer_weights_quantized

    def outputs(model, limit=None, tensor=None):
        if tensor is not None:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            copy.graph.output.append(onnx.ValueInfoProto(name=tensor))
            model = copy
        session = make_session(model.SerializeToString(), spinning=spinning)
        feed = session.get_inputs()[0].name
        parts = [session.run(None, {feed: batch}) for batch in batches(limit)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    model = onnx.load(str(model_path))
    float_logits = outputs(model)[0]
    confident = quantization_change(float_logits, float_logits, labels).float_confidence >= CONFIDENT
    effects = []
    for node in weighted_nodes(model):
        output, reference = node.output[0], []
        for bits in widths:
            def measure(node=node, output=output, reference=reference, bits=bits):
                variant = with_layer_weights_quantized(model, node.name, bits, weight_scale)
                logits = outputs(variant)[0]
                layer_output = outputs(variant, SQNR_IMAGES, output)[1]
                if not reference:
                    reference.append(outputs(model, SQNR_IMAGES, output)[1])
                change = quantization_change(float_logits, logits, labels)
                swapped, held = change.confident_swaps(CONFIDENT)
                return LayerEffect(node.name, bits, change.swap_rate, swapped / held if held else float("nan"),
                                   change.delta_top1_error, float(sqnr(reference[0], layer_output)))

            effects.append(memo(node.name, bits, measure))
    return Attribution(effects, len(labels), int(confident.sum()))


def timed(model_path: Path, inputs: np.ndarray, labels: np.ndarray, batch: int, chosen: set[str],
          repeats: int) -> tuple[dict, dict]:
    """Each way's (wall, process CPU) seconds, the least of ``repeats`` runs (the order alternating,
    the whole graph first), and its effects on the ``chosen`` layers."""
    from ptqcal.evaluate.attribution import LayerEffect, attribute

    skipped = LayerEffect("", 0, 0.0, 0.0, 0.0, 0.0)

    def memo(layer, bits, compute):
        return compute() if layer in chosen else skipped

    def batches(limit):
        end = len(inputs) if limit is None else min(limit, len(inputs))
        return (inputs[start:min(start + batch, end)] for start in range(0, end, batch))

    ways = [("whole graph", whole_graph), (NO_SPIN, partial(whole_graph, spinning=False)), ("cut", attribute)]
    seconds, results = {}, {}
    for repeat in range(repeats):
        for way, function in ways if repeat % 2 == 0 else ways[::-1]:
            cpu, start = time.process_time(), time.perf_counter()
            results[way] = [e for e in function(model_path, batches, labels, WIDTHS, SCALE, memo=memo).effects
                            if e is not skipped]
            now = time.perf_counter() - start, time.process_time() - cpu
            seconds[way] = tuple(map(min, zip(seconds.get(way, now), now)))
    return seconds, results


def side_by_side(label: str, model_path: Path, inputs: np.ndarray, labels: np.ndarray, batch: int,
                 every: int, repeats: int) -> dict[str, float]:
    """The ways on every ``every``-th weight layer; prints their seconds, ratios and agreement."""
    import onnx

    from ptqcal.evaluate.cut import CUT_BYTES, CutGraph
    from ptqcal.quantize.graph import weight_layer_names

    layers = weight_layer_names(onnx.load(str(model_path)))
    chosen = set(layers[::every])
    seconds, results = timed(model_path, inputs, labels, batch, chosen, repeats)
    graph = CutGraph(onnx.load(str(model_path)), inputs[:1].shape)
    sizes = [graph.bytes(cut) * len(inputs) for cut in graph.cuts if cut.layer in chosen]
    kept = [size for size in sizes if size <= CUT_BYTES]
    same = all((a.swapped, a.delta_top1_error) == (b.swapped, b.delta_top1_error) for a, b in
               zip(results["whole graph"], results["cut"]))
    worst = max(abs(a.sqnr_db - b.sqnr_db) for a, b in zip(results["whole graph"], results["cut"]))
    ratio = seconds["whole graph"][0] / seconds["cut"][0]
    options = seconds[NO_SPIN][0] / seconds["cut"][0]
    print(f"  {label}: {len(chosen)} of {len(layers)} weight layers x widths {WIDTHS}, {len(inputs)} images, "
          f"batches of {batch}, least of {repeats} run(s) each")
    for way, (wall, cpu) in seconds.items():
        print(f"    {way:24s} {wall:7.1f} s  (process CPU {cpu:7.1f} s)")
    print(f"    whole graph / cut: {ratio:.2f}x wall, {seconds['whole graph'][1] / seconds['cut'][1]:.2f}x CPU "
          f"(target >= {TARGET}x); with the cut's session options: {options:.2f}x wall")
    print(f"    the same swaps and top-1 changes: {'yes' if same else 'NO'}; SQNR largest difference {worst:.2g} dB")
    print(f"    cuts kept in memory: {len(kept)} of {len(sizes)} (largest kept {max(kept, default=0) / 2 ** 20:.0f} MiB; "
          f"largest streamed {max(set(sizes) - set(kept), default=0) / 2 ** 20:.0f} MiB)")
    return {f"{label}: whole graph / cut": ratio, f"{label}: whole graph without spinning / cut": options}


def resnet56(quick: bool, folder: Path, repeats: int) -> dict[str, float]:
    from images import cifar_images

    from ptqcal.export import export_onnx
    from ptqcal.models import RANDOM_WEIGHTS, get_model_entry
    from ptqcal.models.preprocess import CIFAR100_PREPROCESS
    from ptqcal.quantize import prepare

    count = 256 if quick else 512
    inputs = CIFAR100_PREPROCESS(cifar_images(count, 0))
    labels = np.random.default_rng(0).integers(0, 100, count)
    export_onnx(get_model_entry("cifar_resnet56").build(RANDOM_WEIGHTS, None, folder), inputs[:8], folder / "r56.onnx")
    prepared = prepare(folder / "r56.onnx", folder / "r56-prepared.onnx")
    return side_by_side("ResNet56", prepared, inputs, labels, 128, 3 if quick else 1, repeats)


def lite0(quick: bool, folder: Path, repeats: int) -> dict[str, float]:
    from images import SHARED

    from ptqcal.data import Pixels, load_csv
    from ptqcal.export import export_onnx
    from ptqcal.models import get_model_entry
    from ptqcal.quantize import prepare

    table = SHARED / "data/imagenet_samples/labels.csv"
    if not table.exists():
        print("  EfficientNet-Lite0: skipped, ../shared/data/imagenet_samples is not here")
        return {}
    entry = get_model_entry("efficientnet_lite0")
    split = load_csv(table)
    split = split.take(np.arange(96)) if quick else split
    pixels = Pixels(split, entry.preprocess)
    inputs = entry.preprocess(pixels.materialise().images)
    export_onnx(entry.build(None, None, folder), inputs[:2], folder / "lite0.onnx")
    prepared = prepare(folder / "lite0.onnx", folder / "lite0-prepared.onnx")
    return side_by_side("EfficientNet-Lite0", prepared, inputs, pixels.labels, 32, 10 if quick else 1, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("resnet56", "lite0", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each way, alternating (default: 1; "
                        "quick: 2); the least time counts")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="ptqcal-attribute-") as tmp:
        if args.part in ("resnet56", "all"):
            ratios.update(resnet56(args.quick, Path(tmp), repeats))
        if args.part in ("lite0", "all"):
            ratios.update(lite0(args.quick, Path(tmp), repeats))
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")


if __name__ == "__main__":
    main()
