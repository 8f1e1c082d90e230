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

    Uses the TorchScript exporter (``dynamo=False``): in eval mode it folds BatchNorm into the
    preceding Conv while exporting, emits ``GlobalAveragePool`` (which ORT quantizes) and needs no
    onnxscript. The file is written atomically once every check has passed.
    """
    path = Path(path)
    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(check_inputs, dtype=np.float32))
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:1],), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
        expected = model(x).numpy()
        check_graph(onnx.load(str(tmp)))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        actual = session.run(None, {INPUT_NAME: x.numpy()})[0]
    return ExportResult(path, float(np.max(np.abs(actual - expected))), len(x))


def check_graph(model: onnx.ModelProto) -> None:
    """Raise if a BatchNormalization survived export or the graph ends in a Softmax."""
    leftover = [n.name or n.op_type for n in model.graph.node if n.op_type == "BatchNormalization"]
    if leftover:
        raise ValueError(f"BatchNorm not folded into a Conv: {', '.join(leftover)}")
    last = next(n for n in model.graph.node if OUTPUT_NAME in n.output)
    if last.op_type == "Softmax":
        raise ValueError("the exported graph ends in Softmax; export the logits")
