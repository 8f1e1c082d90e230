"""ONNX Runtime static QDQ quantization with a streaming histogram calibrator."""

from .calibrate import (ArrayDataReader, CalibrationRanges, TensorHistogram, calibration_tensors,
                        collect_histograms, compute_ranges, load_histograms, save_histograms)
from .qdq import QuantSpec, prepare, quantize_qdq
from .ranges import RANGE_METHODS, mse_range

__all__ = ["RANGE_METHODS", "ArrayDataReader", "CalibrationRanges", "QuantSpec", "TensorHistogram",
           "calibration_tensors", "collect_histograms", "compute_ranges", "load_histograms", "mse_range",
           "prepare", "quantize_qdq", "save_histograms"]
