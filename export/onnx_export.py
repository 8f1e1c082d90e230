"""PyTorch -> ONNX: logits out, dynamic batch, BatchNorm folded into Conv, checked against PyTorch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ptqcal.atomic import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float  # between ONNX Runtime's and PyTorch's logits on the check inputs
    num_checked: int


def export_onnx(model: torch.nn.Module, check_inputs: np.ndarray, path: str | Path,
                opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export ``model`` in eval mode and verify the graph and its logits.

    BatchNorm is folded by :func:`fold_batchnorm`, then by the TorchScript exporter
    (``dynamo=False``) for any pair FX could not reach; that exporter also emits
    ``GlobalAveragePool`` (which ORT quantizes) and needs no onnxscript. The file is written
    atomically once every check has passed.
    """
    path = Path(path)
    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(check_inputs, dtype=np.float32))
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fold_batchnorm(model), (x[:1],), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
        expected = model(x).numpy()
        check_graph(onnx.load(str(tmp)))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        actual = session.run(None, {INPUT_NAME: x.numpy()})[0]
    return ExportResult(path, float(np.max(np.abs(actual - expected))), len(x))


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with each Conv -> BatchNorm pair folded by ``fuse_conv_bn_eval``.

    That is the function torch.ao's quantization fusion calls, so the exported weights are bit for
    bit the ones a torch.ao-quantized copy of the model starts from; the exporter's own folding
    differs in the last bit, which moves rounding ties of the quantized weights. A model FX cannot
    trace is returned as it is, and the exporter folds it.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - FX tracing fails in many ways (TraceError, TypeError, ...)
        return model


def check_graph(model: onnx.ModelProto) -> None:
    """Raise if a BatchNormalization survived export or the graph ends in a Softmax."""
    leftover = [n.name or n.op_type for n in model.graph.node if n.op_type == "BatchNormalization"]
    if leftover:
        raise ValueError(f"BatchNorm not folded into a Conv: {', '.join(leftover)}")
    last = next(n for n in model.graph.node if OUTPUT_NAME in n.output)
    if last.op_type == "Softmax":
        raise ValueError("the exported graph ends in Softmax; export the logits")
