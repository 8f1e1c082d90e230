"""ONNX Runtime static QDQ quantization with a streaming histogram calibrator.

What a configuration is (:mod:`.spec`) and how ranges are chosen (:mod:`.ranges`) import without
onnxruntime; the calibrator and the quantizer import it on first use.
"""

from .ranges import RANGE_METHODS, CalibMethod, mse_range
from .spec import BIT_WIDTHS, QuantizeError, QuantSpec, WeightScale

_LAZY = {"ArrayDataReader": "calibrate", "BatchDataReader": "calibrate", "CalibrationRanges": "calibrate", "TensorHistogram": "histogram",
         "calibration_tensors": "calibrate", "collect_histograms": "calibrate", "compute_ranges": "calibrate",
         "load_histograms": "histogram", "save_histograms": "histogram", "prepare": "qdq",
         "quantize_qdq": "qdq", "layers_to_exclude": "qdq", "weight_layer_names": "qdq"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BIT_WIDTHS", "RANGE_METHODS", "CalibMethod", "QuantSpec", "QuantizeError", "WeightScale", "mse_range",
           *_LAZY]
