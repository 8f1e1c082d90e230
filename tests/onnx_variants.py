"""The same classifier with another input, made by editing its graph (no torch): what TensorFlow
converters and edge toolchains hand users (NHWC, uint8 pixels normalised inside the graph, open
height and width)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def input_variant(source: Path, target: Path, layout: str = "NCHW", pixels: tuple | None = None,
                  open_size: bool = False) -> Path:
    """``source`` (an NCHW float classifier) behind a new input: NHWC (a Transpose in front), uint8
    pixels normalised in the graph by ``pixels = (pixel_max, mean, std)``, and/or symbolic H and W."""
    model = onnx.load(str(source))
    graph = model.graph
    old = graph.input[0]
    channels, height, width = (d.dim_value for d in old.type.tensor_type.shape.dim[1:])
    if open_size:
        height, width = "H", "W"
    shape = ["N", channels, height, width] if layout == "NCHW" else ["N", height, width, channels]
    new_name, nodes, inits, current = "pixels", [], [], "pixels"
    if pixels is not None:
        pixel_max, mean, std = pixels
        constant_shape = (1, channels, 1, 1) if layout == "NCHW" else (1, 1, 1, channels)
        inits += [numpy_helper.from_array(np.float32(pixel_max), "v_pixel_max"),
                  numpy_helper.from_array(np.broadcast_to(np.float32(mean), constant_shape).copy(), "v_mean"),
                  numpy_helper.from_array(np.broadcast_to(np.float32(std), constant_shape).copy(), "v_std")]
        nodes += [helper.make_node("Cast", [current], ["v_float"], to=TensorProto.FLOAT),
                  helper.make_node("Div", ["v_float", "v_pixel_max"], ["v_unit"]),
                  helper.make_node("Sub", ["v_unit", "v_mean"], ["v_centred"]),
                  helper.make_node("Div", ["v_centred", "v_std"], ["v_normal"])]
        current = "v_normal"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [current], ["v_nchw"], perm=[0, 3, 1, 2]))
        current = "v_nchw"
    nodes.append(helper.make_node("Identity", [current], [old.name]))
    elem = TensorProto.UINT8 if pixels is not None else TensorProto.FLOAT
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info(new_name, elem, shape))
    graph.initializer.extend(inits)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    if open_size:  # shapes inferred for the fixed size would contradict the open one
        del graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target
