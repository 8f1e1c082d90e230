"""A float graph cut at a weight layer: what quantizing that layer alone cannot change is computed
once, and only the graph after the cut runs again for each change.

The **cut** of a layer is the set of activations the rest of the graph needs from before it: in
graph order (ONNX keeps nodes topologically sorted), every tensor produced before the first node
that reads the layer's weight (or a graph input) and read by that node or any later one, residual
branches included. Constants (initializers, and what nodes compute from constants alone) are no
part of a cut: the graph after it keeps them, so ORT still folds them.

:class:`CutActivations` computes a model's float activations at its layers' cuts over a stream of
input batches, one cut after another: each from the last one kept in memory (only the nodes between
the two run), or from the input batches. A cut is kept (every batch of it) when its tensors for all
the images fit a byte budget; a larger one is computed again, batch by batch, each time it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from ptqcal.quantize.graph import weighted_nodes

CUT_BYTES = 512 * 2 ** 20  # a cut kept in memory for every image at most takes this many bytes

Feed = dict[str, np.ndarray]  # a batch of a cut: tensor name -> values


@dataclass(frozen=True)
class Cut:
    """Where the graph is cut for ``layer`` (a weight node's name; ``output``, its output): ``start``
    is the graph-order index of the first node that reads the layer's weight, ``tensors`` what the
    nodes from there on need from before it (in the order they are produced)."""

    layer: str
    start: int
    tensors: tuple[str, ...]
    output: str


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers, and the outputs of nodes that read only constants (``Constant`` nodes first)."""
    constants = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(name in constants for name in inputs)):
            constants.update(node.output)
    return constants


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph's inputs that are no initializer (older files list the initializers as inputs too)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def layer_cuts(model: onnx.ModelProto) -> list[Cut]:
    """The cut of every weight layer (:func:`ptqcal.quantize.graph.weighted_nodes`), in graph order."""
    nodes = list(model.graph.node)
    constants = constant_tensors(model)
    produced_at = {name: -1 for name in graph_inputs(model)}
    for index, node in enumerate(nodes):
        produced_at.update({name: index for name in node.output if name})
    last_read = {name: len(nodes) for name in (model.graph.output[0].name,)}  # the logits are read "after" all
    for index, node in enumerate(nodes):
        for name in node.input:
            last_read[name] = max(last_read.get(name, -1), index)
    order = sorted((at, position, name) for position, (name, at) in enumerate(produced_at.items()))
    cuts = []
    for node in weighted_nodes(model):
        start = min(i for i, n in enumerate(nodes) if node.input[1] in n.input)
        tensors = tuple(name for at, _, name in order
                        if at < start and last_read.get(name, -1) >= start and name not in constants)
        cuts.append(Cut(node.name, start, tensors, node.output[0]))
    return cuts


def extract(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str],
            types: dict[str, onnx.ValueInfoProto]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs`` (the graph's inputs are those of
    ``inputs`` it reads, typed from ``types``: a shape-inferred copy's value infos), with the
    initializers, value infos, opsets and functions it needs. Names read only inside a node's own
    subgraphs (``If``, ``Loop``: no classifier here has them) are not followed."""
    graph, given = model.graph, set(inputs)
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    initializers = {init.name for init in graph.initializer}
    chosen: set[int] = set()
    read: set[str] = set()
    pending = [name for name in outputs if name not in given]
    while pending:
        name = pending.pop()
        if name in given:
            read.add(name)
        elif name and name not in initializers:
            if name not in producer:
                raise ValueError(f"{name} is neither given nor computed by a node of the graph")
            if producer[name] not in chosen:
                chosen.add(producer[name])
                pending.extend(graph.node[producer[name]].input)
    nodes = [node for index, node in enumerate(graph.node) if index in chosen]
    names = {name for node in nodes for name in (*node.input, *node.output)}
    def typed(name: str) -> onnx.ValueInfoProto:
        return types[name] if name in types else onnx.ValueInfoProto(name=name)

    sub = helper.make_graph(
        nodes, f"{graph.name}_cut", [typed(name) for name in inputs if name in read], [typed(name) for name in outputs],
        [init for init in graph.initializer if init.name in names],
        value_info=[value for value in graph.value_info if value.name in names - given - set(outputs)])
    copy = helper.make_model(sub, opset_imports=list(model.opset_import), functions=list(model.functions))
    copy.ir_version = model.ir_version
    return copy


def blocked(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place) with a 1x1 Conv of identity weights after each 4-D float input
    (its channels known) that a node other than a Conv reads together with a Conv's output (a residual
    Add); the input's readers read that Conv's output instead.

    Why: ORT's NCHWc transformer (its blocked layout on CPU) turns an elementwise node such as Add into
    the blocked layout only when every input already is, and a graph input is not (a Conv's input is
    reordered). A cut input that a residual Add reads (a block's shortcut) left every Add after it in
    that stage in plain layout, with a reorder on each side of every convolution: 8 Adds and 18
    reorders after a cut in ResNet56's first stage. After the identity Conv, the stage is blocked and
    fused as in the whole graph (3% of ResNet56's attribution, bench/attribute.py). The Conv gives each
    value back exactly (one product by 1, the others by 0) where all channels at its position are
    finite, -0 as +0; an infinite or NaN activation would make its position's other channels NaN."""
    graph = model.graph
    convolved = {name for node in graph.node if node.op_type == "Conv" for name in node.output}
    taken = {name for node in graph.node for name in (node.name, *node.input, *node.output)}
    taken |= {value.name for value in [*graph.initializer, *graph.input, *graph.output]}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)

    def unused(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    added = []
    for value in graph.input:
        tensor, dims = value.type.tensor_type, value.type.tensor_type.shape.dim
        if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or not dims[1].dim_value or not any(
                node.op_type != "Conv" and convolved & set(node.input) for node in readers.get(value.name, [])):
            continue
        channels, output = dims[1].dim_value, unused(f"{value.name}_blocked")
        weight = onnx.numpy_helper.from_array(np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1),
                                              unused(f"{value.name}_identity"))
        graph.initializer.append(weight)
        for node in readers[value.name]:
            node.input[:] = [output if name == value.name else name for name in node.input]
        added.append(helper.make_node("Conv", [value.name, weight.name], [output], name=weight.name))
    nodes = [*added, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every activation's value info (ONNX shape inference on a copy; the graph's own kept first)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {value.name: value for value in inferred.graph.value_info}
    types.update({value.name: value for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]
                  if value.type.tensor_type.elem_type})
    return types


def bytes_per_image(model: onnx.ModelProto, input_shape: Sequence[int]) -> dict[str, int]:
    """Each activation's bytes for one input of ``input_shape`` (its batch dimension set to 1), from
    shape inference with that shape fixed (data propagated through shape arithmetic); a tensor whose
    shape stays unknown counts as empty."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    first = next(value for value in copy.graph.input if value.name in graph_inputs(copy))
    dims = first.type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, *input_shape[1:])):
        dim.Clear()
        dim.dim_value = size
    del copy.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(copy, data_prop=True)
    sizes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape") and tensor.elem_type:
            extent = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
            sizes[value.name] = int(np.prod(extent)) * helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
    return sizes


class CutGraph:
    """A float model with what cutting it needs: its cuts, activation types and sizes (on first use)."""

    def __init__(self, model: onnx.ModelProto, input_shape: Sequence[int]):
        self.model = model
        self.input = graph_inputs(model)[0]
        self.cuts = layer_cuts(model)
        self._shape = tuple(input_shape)
        self._types: dict[str, onnx.ValueInfoProto] | None = None
        self._sizes: dict[str, int] | None = None

    @property
    def types(self) -> dict[str, onnx.ValueInfoProto]:
        if self._types is None:
            self._types = tensor_types(self.model)
        return self._types

    def bytes(self, cut: Cut) -> int:
        """Bytes of ``cut``'s tensors for one image."""
        if self._sizes is None:
            self._sizes = bytes_per_image(self.model, self._shape)
        return sum(self._sizes.get(name, 0) for name in cut.tensors)

    def extract(self, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
        """:func:`extract` of the model, its inputs :func:`blocked`."""
        return blocked(extract(self.model, inputs, outputs, self.types))


Session = Callable[[onnx.ModelProto], object]  # a model -> an ORT session to run it


class CutActivations:
    """The float activations at ``graph``'s cuts over the ``images`` input batches ``batches()``
    yields (the same batches at every call), asked for in graph order (a cut before the one kept is
    computed from the input batches again). Each cut is computed from the last one kept; it is kept
    itself when its tensors for every image take at most ``budget`` bytes (default
    :data:`CUT_BYTES`; the one kept before it is let go batch by batch meanwhile), and otherwise
    computed batch by batch each time it is read."""

    def __init__(self, graph: CutGraph, batches: Callable[[], Iterable[np.ndarray]], images: int, session: Session,
                 budget: int | None = None):
        self._graph, self._batches, self._images = graph, batches, images
        self._session, self._budget = session, CUT_BYTES if budget is None else budget
        self._kept: tuple[Cut, list[Feed]] | None = None
        self._segment: tuple[tuple, object] | None = None  # the last segment's session (reused when streaming)

    def feeds(self, cut: Cut) -> Iterable[Feed]:
        """``cut``'s tensors, batch by batch (every batch's values for each tensor of ``cut.tensors``)."""
        if self._kept is not None and self._kept[0] == cut:
            return self._kept[1]
        source = self._kept if self._kept is not None and self._kept[0].start <= cut.start else None
        if self._images * self._graph.bytes(cut) > self._budget:
            return self._chain(cut, source)
        if source is not None:  # let go of each batch of the cut kept before once the new one has it
            self._kept, batches = None, source[1]
            source = (source[0], (batches.pop(0) for _ in range(len(batches))))
        self._kept = (cut, list(self._chain(cut, source)))
        return self._kept[1]

    def _chain(self, cut: Cut, source: tuple[Cut, Iterable[Feed]] | None) -> Iterator[Feed]:
        """``cut`` batch by batch from ``source`` (a cut before it and its batches) or the input batches."""
        known = source[0].tensors if source is not None else (self._graph.input,)
        new = tuple(name for name in cut.tensors if name not in known)
        session = self._session_for(known, new) if new else None
        names = [value.name for value in session.get_inputs()] if session is not None else []
        feeds = source[1] if source is not None else ({self._graph.input: batch} for batch in self._batches())
        for feed in feeds:
            values = dict(zip(new, session.run(list(new), {name: feed[name] for name in names}))) if new else {}
            yield {name: feed[name] if name in feed else values[name] for name in cut.tensors}

    def _session_for(self, known: tuple[str, ...], new: tuple[str, ...]):
        if self._segment is None or self._segment[0] != (known, new):
            self._segment = None  # the previous session goes before the next one is made
            self._segment = ((known, new), self._session(self._graph.extract(known, new)))
        return self._segment[1]
