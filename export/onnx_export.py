"""PyTorch -> ONNX: logits out, dynamic batch, BatchNorm folded into Conv, checked against PyTorch."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ptqcal.atomic import atomic_path

from .names import INPUT_NAME, OUTPUT_NAME

DEFAULT_OPSET = 17
FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float  # between ONNX Runtime's and PyTorch's logits on the check inputs
    num_checked: int


def export_onnx(model: torch.nn.Module, check_inputs: np.ndarray, path: str | Path,
                opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> ExportResult:
    """Export ``model`` in eval mode and verify the graph and its logits.

    BatchNorm is folded by :func:`fold_batchnorm`, then by the TorchScript exporter
    (``dynamo=False``) for any pair FX could not reach; that exporter also emits
    ``GlobalAveragePool`` (which ORT quantizes) and needs no onnxscript. The file is written
    atomically once every check has passed.
    """
    path = Path(path)
    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(check_inputs, dtype=np.float32))
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings(), _attention_as_ops():
        warnings.simplefilter("ignore")
        torch.onnx.export(fold_batchnorm(model), (x[:1],), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
        expected = model(x).numpy()
        graph = onnx.load(str(tmp))
        check_graph(graph)
        if metadata:  # e.g. the preprocessing, so that the file alone says how to feed it
            onnx.helper.set_model_props(graph, metadata)
            onnx.save(graph, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        actual = session.run(None, {INPUT_NAME: x.numpy()})[0]
    return ExportResult(path, float(np.max(np.abs(actual - expected))), len(x))


@contextlib.contextmanager
def _attention_as_ops():
    """Without gradients, ``nn.MultiheadAttention`` takes a fused fast path
    (``aten::_native_multi_head_attention``) that has no ONNX export; switched off for the export
    only, so attention is traced as MatMul/Softmax ops, and restored after."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with each Conv -> BatchNorm (and Linear -> BatchNorm1d) pair folded.

    The folding is torch's ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``, what torch.ao's
    quantization fusion calls, so the exported weights are bit for bit the ones a torch.ao-quantized
    copy of the model starts from; the exporter's own folding differs in the last bit, which moves
    rounding ties of the quantized weights. FX only finds the pairs: the folded layers replace the
    originals in place (the BatchNorm becomes an Identity), so the ONNX node names keep the module
    path (``/layer1/layer1.0/conv1/Conv``). A model FX cannot trace is returned as it is, and the
    exporter folds it.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - FX tracing fails in many ways (TraceError, TypeError, ...)
        return model
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and calls[node.target] == 1 and calls[source.target] == 1):
            continue
        layer, norm = modules[source.target], modules[node.target]
        if (isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None
                and isinstance(layer, FOLDABLE)):  # without running statistics BatchNorm cannot fold
            fuse = fuse_linear_bn_eval if isinstance(layer, torch.nn.Linear) else fuse_conv_bn_eval
            folded.set_submodule(source.target, fuse(layer, norm))
            folded.set_submodule(node.target, torch.nn.Identity())
    return folded


def check_graph(model: onnx.ModelProto) -> None:
    """Raise if a BatchNormalization survived export or the graph ends in a Softmax."""
    leftover = [n.name or n.op_type for n in model.graph.node if n.op_type == "BatchNormalization"]
    if leftover:
        raise ValueError(f"BatchNorm not folded into a Conv: {', '.join(leftover)}")
    last = next(n for n in model.graph.node if OUTPUT_NAME in n.output)
    if last.op_type == "Softmax":
        raise ValueError("the exported graph ends in Softmax; export the logits")
