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
