"""What one calibration pass bins: not the tensors whose range ORT's quantizer replaces (the graphs
ORT writes stay byte for byte those it writes when every tensor is calibrated), and the same counts
whatever the number of binning threads."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import save_classifier
from ptqcal.quantize import (ArrayDataReader, CalibrationRanges, QuantizeError, QuantSpec, collect_histograms,
                             compute_ranges, quantize_qdq)
from ptqcal.quantize.graph import ranges_set_by_ort
from ptqcal.quantize.histogram import HistogramBinner, TensorHistogram

ACTIVATIONS = ("relu_in", "relu1", "clip2", "relu3", "clip3", "clip_kept", "relu5")


def _conv(rng, name, src, dst, channels_in, channels_out):
    values = rng.normal(0, 0.4, (channels_out, channels_in, 3, 3)).astype(np.float32)
    weight = numpy_helper.from_array(values, f"{name}_w")
    return helper.make_node("Conv", [src, weight.name], [dst], name=name, pads=[1, 1, 1, 1]), weight


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """Every case of ORT's rule: a Relu on the graph input, Conv -> Relu and Conv -> Clip (taken),
    Relu -> Clip (a chain: kept), a Clip the quantization keeps float (kept), a Conv output that
    feeds two nodes (kept)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(np.float32(6.0), "six"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 4 * 8 * 8)).astype(np.float32), "fc_w")]
    nodes = [helper.make_node("Relu", ["input"], ["r0"], name="relu_in")]
    for conv, activations in [(("conv1", "r0", "c1", 1, 4), [("Relu", "c1", "a1", "relu1")]),
                              (("conv2", "a1", "c2", 4, 4), [("Clip", "c2", "a2", "clip2")]),
                              (("conv3", "a2", "c3", 4, 4),
                               [("Relu", "c3", "a3", "relu3"), ("Clip", "a3", "a3b", "clip3")]),
                              (("conv4", "a3b", "c4", 4, 4), [("Clip", "c4", "a4", "clip_kept")]),
                              (("conv5", "a4", "c5", 4, 4), [("Relu", "c5", "a5", "relu5")])]:
        node, weight = _conv(rng, *conv)
        nodes.append(node)
        inits.append(weight)
        nodes += [helper.make_node(op, [src, *(["zero", "six"] if op == "Clip" else [])], [dst], name=name)
                  for op, src, dst, name in activations]
    nodes += [helper.make_node("Add", ["a5", "c5"], ["s5"], name="add5"),
              helper.make_node("Flatten", ["s5"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1)]
    # not prepared: ORT's graph optimisation would fuse the Relu -> Clip chain away
    return save_classifier(tmp_path_factory.mktemp("derived") / "model.onnx", "derived", nodes, inits, 3)


def test_only_the_single_consumer_inputs_of_quantized_relu_and_clip_are_taken(model_path):
    taken = ranges_set_by_ort(onnx.load(str(model_path)), exclude=("clip_kept",))
    assert taken == {"c1": "a1", "c2": "a2"}  # not the graph input, the chain, the kept Clip, or c5 (two consumers)
    assert "c4" in ranges_set_by_ort(onnx.load(str(model_path)))  # its Clip quantized: taken


@pytest.mark.parametrize("act_bits", [8, 4])
def test_the_quantized_graph_is_the_one_from_every_tensor_calibrated(model_path, tmp_path, act_bits):
    x = np.random.default_rng(1).normal(size=(96, 1, 8, 8)).astype(np.float32)
    exclude = ("clip_kept",)
    fast = collect_histograms(model_path, ArrayDataReader("input", x, 32), progress=False, exclude=exclude)
    # keeping every Relu/Clip float for the calibration makes it bin every tensor: ORT's own rule then
    # decides, from the real histograms, what the quantized graph uses
    every = collect_histograms(model_path, ArrayDataReader("input", x, 32), progress=False, exclude=ACTIVATIONS)
    assert {name for name, h in fast.items() if h.same_as} == {"c1", "c2"}
    assert not any(h.same_as for h in every.values()) and fast.keys() == every.keys()
    spec = QuantSpec(4, act_bits, exclude=exclude)
    paths = [quantize_qdq(model_path, tmp_path / f"{kind}.onnx", compute_ranges(h, "mse", act_bits, len(x)), spec)
             for kind, h in (("fast", fast), ("every", every))]
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_saved_ranges_that_took_a_range_refuse_a_run_that_keeps_that_node_float(model_path, tmp_path):
    x = np.random.default_rng(2).normal(size=(32, 1, 8, 8)).astype(np.float32)
    ranges = compute_ranges(collect_histograms(model_path, ArrayDataReader("input", x, 32), progress=False), "minmax")
    assert set(ranges.derived) == {"c1", "c2", "c4"} and ranges.ranges["c4"] == ranges.ranges["a4"]
    loaded = CalibrationRanges.load(ranges.save(tmp_path / "ranges.json"))
    assert loaded == ranges
    graph = onnx.load(str(model_path))
    assert loaded.check_fits(graph, (8,)) is loaded
    with pytest.raises(QuantizeError, match="no own range for c4"):
        loaded.check_fits(graph, (8,), exclude=("clip_kept",))
    # quantizing with a node kept float that the calibration quantized: refused, not guessed
    with pytest.raises(QuantizeError, match="no own range for c4"):
        quantize_qdq(model_path, tmp_path / "q.onnx", ranges, QuantSpec(8, 8, exclude=("clip_kept",)))
    assert not (tmp_path / "q.onnx").exists()


def test_binning_in_threads_gives_the_histograms_of_one_tensor_at_a_time():
    rng = np.random.default_rng(3)
    batches = [{f"t{i}": rng.standard_t(3, size=rng.integers(1, 300_000)).astype(np.float32) * (1 + b)
                for i in range(6)} for b in range(4)]  # ranges grow batch after batch: re-binning
    alone = {name: TensorHistogram() for name in batches[0]}
    for batch in batches:
        for name, values in batch.items():
            alone[name].update(values)
    threaded = {name: TensorHistogram() for name in batches[0]}
    with HistogramBinner(threaded, workers=3) as binner:
        for batch in batches:
            values = dict(batch)
            binner.submit(values)  # returns at once: binned while the next batch is made
            assert not values  # handed over, so each is freed once counted
        binner.wait()
    for name, histogram in alone.items():
        assert (threaded[name].lo, threaded[name].hi) == (histogram.lo, histogram.hi)
        np.testing.assert_array_equal(threaded[name].counts, histogram.counts)
