"""How much memory a classifier's activations take per image, read from its graph (no session).

The batch a run evaluates (and calibrates) with is chosen from these sizes and a memory budget: at
224 pixels a batch of 256 makes ONNX Runtime hold gigabytes of activations, and calibration, which
copies every intermediate tensor out of the session, many times more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx


@dataclass(frozen=True)
class ActivationBytes:
    """Per image: the most activation bytes alive at once when the graph runs node by node (what
    ORT's memory planner must hold), the bytes of every activation together, and of those a
    calibration pass bins (it exposes them as outputs)."""

    peak: int
    total: int
    binned: int


def activation_bytes(model_path: str | Path, input_shape: tuple[int, ...],
                     not_exposed: frozenset[str] = frozenset()) -> ActivationBytes:
    """Sizes for one input of ``input_shape`` (batch dimension included, set to 1), from ONNX
    shape inference with that shape fixed; tensors whose shape stays unknown count as empty.
    ``not_exposed``: tensors a calibration pass does not bin, left out of ``binned``."""
    model = onnx.load(str(model_path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in constants)
    dims = graph_input.type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, *input_shape[1:])):
        dim.Clear()
        dim.dim_value = size
    del model.graph.value_info[:]  # shapes inferred with open dimensions would stay open
    model = onnx.shape_inference.infer_shapes(model)
    sizes = {value.name: _bytes(value) for value in [*model.graph.input, *model.graph.value_info,
                                                     *model.graph.output] if value.name not in constants}
    last_use = {name: index for index, node in enumerate(model.graph.node) for name in node.input}
    last_use.update({output.name: len(model.graph.node) for output in model.graph.output})
    live = sizes.get(graph_input.name, 0)
    peak = live
    for index, node in enumerate(model.graph.node):
        live += sum(sizes.get(name, 0) for name in node.output)
        peak = max(peak, live)
        live -= sum(sizes.get(name, 0) for name in {*node.input, *node.output}
                    if name and name not in constants and last_use.get(name, index) <= index)
    return ActivationBytes(peak, sum(sizes.values()),
                           sum(size for name, size in sizes.items() if name not in not_exposed))


def _bytes(value: onnx.ValueInfoProto) -> int:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape") or not tensor.elem_type:
        return 0
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
    return math.prod(dims) * itemsize


def size_text(count: float) -> str:
    """Bytes as people read them: ``9.2 MiB``."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} GiB"


def batch_for(budget: int, per_image: int, largest: int) -> int:
    """The largest batch (at most ``largest``) whose ``per_image`` bytes fit ``budget``; at least 1."""
    return int(max(1, min(largest, budget // max(per_image, 1))))


# The batch policy. Per image, from the graph's activation sizes: ORT's CPU arena extends itself in
# powers of two, so it can reserve up to twice what is live (measured 1.3-1.7x on EfficientNet-Lite0
# at 224 px, batches of 32 to 83, and a peak RSS above the budget with 1.5x); the simulated path also
# keeps each activation's quantized and dequantized copies. Calibration holds the tensors it bins in
# ORT and the copies in numpy of two batches (one binned while ORT runs the next): 3x what it bins.
# Its batch fits that and, as it always did, twice every activation, so that the batches, and so the
# histograms (merged batch by batch), stay those of earlier versions wherever both fit.
ARENA_FACTOR = 2.0
SIMULATED_FACTOR = 2.0
CALIBRATION_FACTOR = 3.0  # x the tensors calibration bins
CALIBRATION_ALL_FACTOR = 2.0  # x every activation
CALIB_BATCH = 32  # largest calibration batch: every activation of a batch is in memory at once


@dataclass(frozen=True)
class BatchPlan:
    """The batch sizes a run evaluates, checks the simulated path and calibrates with, and what one
    image needs (``sizes``); ``fits`` is False when even one image exceeds the budget."""

    eval: int
    check: int
    calib: int
    sizes: ActivationBytes
    fits: bool


def plan_batches(sizes: ActivationBytes, input_bytes: int, budget: int, largest: int, deployed: bool) -> BatchPlan:
    """The largest batches (up to ``largest``, and :data:`CALIB_BATCH` for calibration) whose
    activations and ``input_bytes`` of prepared input per image fit ``budget`` bytes; ``deployed``:
    the evaluation runs on the fused integer kernels (else on the simulated path)."""
    deployed_need = ARENA_FACTOR * sizes.peak + input_bytes
    simulated_need = ARENA_FACTOR * SIMULATED_FACTOR * sizes.peak + input_bytes
    calibration_need = max(CALIBRATION_FACTOR * sizes.binned, CALIBRATION_ALL_FACTOR * sizes.total) + input_bytes
    evaluation = deployed_need if deployed else simulated_need
    return BatchPlan(batch_for(budget, evaluation, largest), batch_for(budget, simulated_need, largest),
                     batch_for(budget, calibration_need, CALIB_BATCH), sizes,
                     fits=max(evaluation, calibration_need) <= budget)
