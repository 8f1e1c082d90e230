"""PyTorch -> ONNX export with BatchNorm folding, verified against PyTorch's logits."""

from .onnx_export import INPUT_NAME, OUTPUT_NAME, ExportResult, check_graph, export_onnx

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ExportResult", "check_graph", "export_onnx"]
