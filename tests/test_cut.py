"""Cutting a float graph at a weight layer, against the whole graph: the cut holds what the rest
needs from before the layer (a residual branch, the input read again, batch-sized shape arithmetic;
no constant), the graph after it computes what the whole graph does, and the activations at the
cuts are the whole graph's, kept in memory or streamed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import save_classifier

pytest.importorskip("onnxruntime")


def _residual_model(path):
    """shape arithmetic on the input (-> [N, -1]), conv1 -> relu (r), conv2(r) + r, x a Constant,
    + the input again, reshaped to [N, -1] by the shape computed first, fc."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, (6, 256)).astype(np.float32), "w3"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [helper.make_node("Shape", ["input"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="n"),
             helper.make_node("Concat", ["n", "minus_one"], ["flat_shape"], axis=0, name="flat_shape"),
             helper.make_node("Conv", ["input", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(0.5, np.float32)),
                              name="k"),
             helper.make_node("Conv", ["r", "w2"], ["b"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Add", ["b", "r"], ["s"], name="residual"),
             helper.make_node("Mul", ["s", "k"], ["m"], name="half"),
             helper.make_node("Add", ["m", "input"], ["t"], name="input_again"),
             helper.make_node("Reshape", ["t", "flat_shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3"], ["logits"], transB=1, name="fc")]
    return onnx.load(str(save_classifier(path, "residual", nodes, inits, 6)))


def _session(model):
    from ptqcal.evaluate.runner import make_session

    return make_session(model.SerializeToString())


def _whole(model, inputs, tensors):
    """``tensors`` of the whole graph (exposed as outputs) on ``inputs``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name != "logits")
    return dict(zip([o.name for o in copy.graph.output], _session(copy).run(None, {"input": inputs})))


def test_a_cut_holds_the_residual_branch_the_input_read_again_and_the_shape_but_no_constant(tmp_path):
    from ptqcal.evaluate.cut import layer_cuts

    cuts = {cut.layer: cut for cut in layer_cuts(_residual_model(tmp_path / "m.onnx"))}
    assert cuts["conv1"].tensors == ("input", "flat_shape") and cuts["conv1"].start == 3
    assert cuts["conv2"].tensors == ("input", "flat_shape", "r")  # not k (a Constant): the rest computes it
    assert cuts["fc"].tensors == ("f",)


def test_the_graph_after_each_cut_computes_what_the_whole_graph_does(tmp_path):
    from ptqcal.evaluate.cut import CutGraph

    model = _residual_model(tmp_path / "m.onnx")
    inputs = np.random.default_rng(1).normal(size=(5, 1, 8, 8)).astype(np.float32)
    graph = CutGraph(model, inputs.shape)
    for cut in graph.cuts:
        whole = _whole(model, inputs, cut.tensors)
        suffix = graph.extract(cut.tensors, ["logits"])
        assert [i.name for i in suffix.graph.input] == list(cut.tensors)
        assert "k" not in [i.name for i in suffix.graph.input] and len(suffix.graph.node) < len(model.graph.node)
        logits = _session(suffix).run(None, {name: whole[name] for name in cut.tensors})[0]
        np.testing.assert_allclose(logits, whole["logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("budget", [None, 0])
def test_the_activations_at_the_cuts_are_the_whole_graphs_kept_or_streamed(budget, tmp_path):
    """Batches of 4, 4 and 2 (the shape tensor is each batch's own); read in graph order, then an
    earlier cut again. Kept: the input is read once for all the cuts; streamed (a budget of 0 bytes):
    once each time a cut is read, and no cut is kept."""
    from ptqcal.evaluate.cut import CutActivations, CutGraph

    model = _residual_model(tmp_path / "m.onnx")
    inputs = np.random.default_rng(2).normal(size=(10, 1, 8, 8)).astype(np.float32)
    reads = []

    def batches():
        reads.append(1)
        return (inputs[start:start + 4] for start in range(0, 10, 4))

    graph = CutGraph(model, inputs.shape)
    activations = CutActivations(graph, batches, 10, _session, budget)
    for cut in [*graph.cuts, graph.cuts[1]]:
        for _ in range(2):
            feeds = list(activations.feeds(cut))
            assert [len(feed[cut.tensors[0]]) for feed in feeds] == [4, 4, 2]
            for name in cut.tensors:
                whole = np.concatenate([_whole(model, inputs[s:s + 4], cut.tensors)[name] for s in range(0, 10, 4)])
                np.testing.assert_allclose(np.concatenate([feed[name] for feed in feeds]), whole, rtol=1e-6, atol=1e-6)
    assert len(reads) == (2 if budget is None else 8)  # kept: once, and once for the earlier cut
    assert (activations._kept is None) == (budget == 0)


def test_bytes_per_image_follow_the_shapes(tmp_path):
    from ptqcal.evaluate.cut import CutGraph

    graph = CutGraph(_residual_model(tmp_path / "m.onnx"), (32, 1, 8, 8))
    sizes = {cut.layer: graph.bytes(cut) for cut in graph.cuts}
    assert sizes == {"conv1": 4 * 64 + 8 * 2, "conv2": 4 * 64 + 8 * 2 + 4 * 4 * 64, "fc": 4 * 256}


def _tied_model(path):
    """flatten -> relu -> first(w) -> relu -> second(w, the same weight) -> head."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 0.2, (64, 64)).astype(np.float32), "w")
    head = numpy_helper.from_array(rng.normal(0, 0.3, (6, 64)).astype(np.float32), "head_w")
    nodes = [helper.make_node("Flatten", ["input"], ["x"], name="flat"),
             helper.make_node("Relu", ["x"], ["x1"], name="relu"),
             helper.make_node("Gemm", ["x1", "w"], ["y"], transB=1, name="first"),
             helper.make_node("Relu", ["y"], ["y1"], name="relu_first"),
             helper.make_node("Gemm", ["y1", "w"], ["z"], transB=1, name="second"),
             helper.make_node("Gemm", ["z", "head_w"], ["logits"], transB=1, name="head")]
    return onnx.load(str(save_classifier(path, "tied", nodes, [w, head], 6)))


def test_weights_read_by_two_layers_are_cut_before_the_first(tmp_path):
    """A weight shared by two Gemms: both layers' cut is before the first that reads it."""
    from ptqcal.evaluate.cut import layer_cuts

    cuts = {cut.layer: cut for cut in layer_cuts(_tied_model(tmp_path / "m.onnx"))}
    assert cuts["first"].start == cuts["second"].start == 2 and cuts["second"].tensors == ("x1",)


def _stage_model(path):
    """A stage of residual blocks, as in a ResNet (16 channels, a multiple of ORT's NCHWc blocks):
    stem -> relu (x0); per block: conv_a -> relu -> conv_b, + the block's input, relu; pool, fc."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32), "stem_w"),
             numpy_helper.from_array(rng.normal(0, 0.2, (6, 16)).astype(np.float32), "fc_w")]
    nodes = [helper.make_node("Conv", ["input", "stem_w"], ["stem"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["stem"], ["x0"], name="stem_relu")]
    for block in range(3):
        x, a, b = f"x{block}", f"a{block}", f"b{block}"
        inits += [numpy_helper.from_array(rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32), f"w{conv}{block}")
                  for conv in "ab"]
        nodes += [helper.make_node("Conv", [x, f"wa{block}"], [f"{a}_pre"], pads=[1, 1, 1, 1], name=f"conv_a{block}"),
                  helper.make_node("Relu", [f"{a}_pre"], [a], name=f"relu_a{block}"),
                  helper.make_node("Conv", [a, f"wb{block}"], [b], pads=[1, 1, 1, 1], name=f"conv_b{block}"),
                  helper.make_node("Add", [b, x], [f"s{block}"], name=f"add{block}"),
                  helper.make_node("Relu", [f"s{block}"], [f"x{block + 1}"], name=f"relu_b{block}")]
    nodes += [helper.make_node("GlobalAveragePool", ["x3"], ["pooled"], name="pool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1, name="fc")]
    return onnx.load(str(save_classifier(path, "stage", nodes, inits, 6, ("N", 3, 8, 8))))


def _optimized_ops(model, path):
    """(domain, op type) of every node of ``model`` as ORT's CPU session optimises it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [(node.domain, node.op_type) for node in onnx.load(str(path)).graph.node]


def test_after_a_cut_in_a_residual_stage_orts_blocked_layout_fuses_every_add_as_in_the_whole_graph(tmp_path):
    """Cut at a block's second conv, the block's input (read by its Add) is a graph input: ORT's NCHWc
    transformer left that Add and every one after it in plain layout. With the cut's inputs blocked
    the graph after the cut fuses as the whole graph does (no plain Add), and computes its logits."""
    from ptqcal.evaluate.cut import CutGraph, extract

    model = _stage_model(tmp_path / "m.onnx")
    whole_ops = _optimized_ops(model, tmp_path / "whole.onnx")
    if ("", "Add") in whole_ops or not any(domain == "com.microsoft.nchwc" for domain, _ in whole_ops):
        pytest.skip("ORT uses no NCHWc layout for this graph on this CPU")
    inputs = np.random.default_rng(4).normal(size=(5, 3, 8, 8)).astype(np.float32)
    graph = CutGraph(model, inputs.shape)
    cut = next(cut for cut in graph.cuts if cut.layer == "conv_b0")
    assert cut.tensors == ("x0", "a0")
    plain = extract(model, cut.tensors, ["logits"], graph.types)
    assert [op for op in _optimized_ops(plain, tmp_path / "plain.onnx") if op == ("", "Add")]  # what it fixes
    suffix = graph.extract(cut.tensors, ["logits"])
    assert ("", "Add") not in _optimized_ops(suffix, tmp_path / "suffix.onnx")
    assert [i.name for i in suffix.graph.input] == ["x0", "a0"]
    whole = _whole(model, inputs, cut.tensors)
    logits = _session(suffix).run(None, {name: whole[name] for name in cut.tensors})[0]
    np.testing.assert_allclose(logits, whole["logits"], rtol=1e-6, atol=1e-6)


def test_the_identity_conv_before_a_blocked_input_passes_every_finite_value_exactly():
    """Finite values of every magnitude (subnormal to 1e30, zeros, negatives) through the added 1x1
    Conv, into a residual Add (of a Conv whose weights are 0: the Add gives back its input exactly).
    An input that no such node reads (``side``: a Relu alone) is left as it is; the Conv's name is
    its own (a node of the graph has the name it would take first)."""
    import onnxruntime as ort

    from ptqcal.evaluate.cut import blocked

    shape = ["N", 24, 5, 5]
    nodes = [helper.make_node("Conv", ["x", "zero"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "x"], ["y"], name="residual"),
             helper.make_node("Relu", ["side"], ["r"], name="x_identity")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
                                           for name in ("x", "side")],
                              [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape) for name in "yr"],
                              [numpy_helper.from_array(np.zeros((24, 24, 1, 1), np.float32), "zero")])
    model = blocked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [node.op_type for node in model.graph.node] == ["Conv", "Conv", "Add", "Relu"]
    assert list(model.graph.node[3].input) == ["side"] and len({node.name for node in model.graph.node}) == 4
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(3, 24, 5, 5)) * 10.0 ** rng.integers(-40, 30, (3, 24, 5, 5))).astype(np.float32)
    x[0, :3] = 0.0
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(["y"], {"x": x, "side": x})[0], x)
