"""ONNX Runtime static QDQ quantization with a streaming histogram calibrator.

What a configuration is (:mod:`.spec`), how ranges are chosen (:mod:`.ranges`) and what a graph
says about its quantization (:mod:`.graph`) import without onnxruntime; the calibrator
(:mod:`.calibrate`) and the quantizer (:mod:`.qdq`) import it on first use.
"""

from .ranges import RANGE_METHODS, CalibMethod, mse_range
from .spec import BIT_WIDTHS, QuantizeError, QuantSpec, WeightScale

_LAZY = {"ArrayDataReader": "calibrate", "BatchDataReader": "calibrate", "CalibrationRanges": "calibrate",
         "collect_histograms": "calibrate", "compute_ranges": "calibrate",
         "TensorHistogram": "histogram", "load_histograms": "histogram", "save_histograms": "histogram",
         "prepare": "qdq", "quantize_qdq": "qdq",
         # graph queries: onnx only (ORT's registry is read by op_types_to_quantize when called)
         "calibration_tensors": "graph", "clipped_biases": "graph", "weight_sizes": "graph",
         "layers_to_exclude": "graph", "op_types_to_quantize": "graph", "quantized_tensors": "graph",
         "ranges_set_by_ort": "graph", "weight_bytes": "graph", "weight_layer_names": "graph",
         # what a graph is (onnx only) and other toolchains' quantizations (onnxruntime, optional extras)
         "GraphCensus": "census", "census_lines": "census", "graph_census": "census",
         "PEERS": "peers", "PeerError": "peers", "run_peer": "peers"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BIT_WIDTHS", "RANGE_METHODS", "CalibMethod", "QuantSpec", "QuantizeError", "WeightScale", "mse_range",
           *_LAZY]
