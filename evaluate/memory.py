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


def batch_for(budget: int, per_image: int, largest: int) -> int:
    """The largest batch (at most ``largest``) whose ``per_image`` bytes fit ``budget``; at least 1."""
    return int(max(1, min(largest, budget // max(per_image, 1))))
