"""Run float and quantized ONNX models on CPU and measure accuracy, calibration and swaps.

The metrics and the run record import without onnxruntime (so saved logits can be analysed
anywhere); the runner functions import it on first use.
"""

from .metrics import (ECE_BINS, ClassificationAccumulator, Metrics, QuantizationChange, ReliabilityCurve,
                      classification_metrics, expected_calibration_error, log_softmax, nll, quantization_change,
                      reliability_curve, reliability_of_logits, softmax, top_k_error)
from .record import FORMAT_VERSION, RunRecord, RunRecordError
from .agreement import PathAgreement, TorchAgreement, compare_paths, torch_agreement
from .results import FLOAT_NAME, REPEAT_MARK, ConfigResult, Execution, evaluate_logits

_RUNNER = {"make_session", "optimized_op_types", "predict"}


def __getattr__(name: str):
    if name in _RUNNER:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ECE_BINS", "FLOAT_NAME", "FORMAT_VERSION", "REPEAT_MARK", "ClassificationAccumulator", "ConfigResult", "Execution",
           "Metrics", "PathAgreement", "QuantizationChange", "TorchAgreement", "ReliabilityCurve", "RunRecord", "RunRecordError",
           "classification_metrics", "compare_paths", "evaluate_logits", "expected_calibration_error", "log_softmax",
           "make_session", "nll", "optimized_op_types", "predict", "quantization_change", "reliability_curve",
           "reliability_of_logits", "softmax", "top_k_error", "torch_agreement"]
