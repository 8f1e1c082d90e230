"""PyTorch -> ONNX export with BatchNorm folding, verified against PyTorch's logits.

The graph's names import without torch (a run reads them without loading PyTorch); the exporter
imports it on first use.
"""

from .names import INPUT_NAME, OUTPUT_NAME

_TORCH = {"ExportResult", "check_graph", "export_onnx"}


def __getattr__(name: str):
    if name in _TORCH:
        from . import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ExportResult", "check_graph", "export_onnx"]
