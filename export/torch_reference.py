"""The same quantization done by PyTorch (``torch.ao`` FX, simulated), to cross-check ORT's graphs.

Per-channel symmetric weights (``PerChannelMinMaxObserver``), per-tensor affine activations with
``HistogramObserver``, BatchNorm folded by ``prepare_fx``, calibrated on the same batches. Imports
torch: not part of ``ptqcal.quantize``'s torch-free API.
"""

from __future__ import annotations

import copy
import warnings
from typing import Iterable

import numpy as np
import torch
from torch.ao.quantization import HistogramObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx


class BitWidthHistogramObserver(HistogramObserver):
    """HistogramObserver whose L2 search targets 2**b levels (PyTorch keeps 256 for any quint8 range)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dst_nbins = self.quant_max - self.quant_min + 1


def qconfig(weight_bits: int, act_bits: int) -> QConfig:
    return QConfig(
        activation=BitWidthHistogramObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=2 ** act_bits - 1,
                                                       reduce_range=False),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                  quant_min=-(2 ** (weight_bits - 1)),
                                                  quant_max=2 ** (weight_bits - 1) - 1),
    )


def torch_fake_quant(model: torch.nn.Module, calib_batches: Iterable[np.ndarray], weight_bits: int,
                     act_bits: int = 8, quantize_logits: bool = False) -> torch.nn.Module:
    """A calibrated PyTorch reference-quantized copy of ``model`` (runs in float between Q/DQ).

    ``model`` itself is left as it was: FX shares the parameters of modules it does not fuse
    (a Linear's weight), and the reference weights are fake-quantized in place below.
    """
    batches = [torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)) for b in calib_batches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = prepare_fx(copy.deepcopy(model).eval(), QConfigMapping().set_global(qconfig(weight_bits, act_bits)),
                              (batches[0][:1],))
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        reference = convert_to_reference_fx(prepared)
    clamp_reference_weights(reference)
    if not quantize_logits:
        dequantize_outputs(reference)
    return reference


def dequantize_outputs(reference: torch.fx.GraphModule) -> None:
    """Return the float outputs instead of their quantize -> dequantize, like ptqcal's float logits."""
    output = next(node for node in reference.graph.nodes if node.op == "output")

    def unquantized(node):
        if isinstance(node, torch.fx.Node) and node.target == "dequantize":
            quantize = node.args[0]
            if isinstance(quantize, torch.fx.Node) and quantize.target is torch.quantize_per_tensor:
                return quantize.args[0]
        return node

    output.args = torch.fx.node.map_arg(output.args, unquantized)
    reference.graph.eliminate_dead_code()
    reference.recompile()


def clamp_reference_weights(reference: torch.nn.Module) -> None:
    """Fake-quantize the reference modules' weights onto [quant_min, quant_max].

    Reference modules re-quantize their weight with ``torch.quantize_per_channel``, which clamps
    only to int8's range: a "4-bit" weight could take the code 8. ``fake_quantize_per_channel_affine``
    (what the paper's fake-quant modules run) clamps to the b-bit range; its result is already on
    the grid, so the later re-quantization leaves it unchanged.
    """
    with torch.no_grad():
        for module in reference.modules():
            if getattr(module, "weight_qscheme", None) in (torch.per_channel_affine, torch.per_channel_symmetric):
                module.weight.copy_(torch.fake_quantize_per_channel_affine(
                    module.weight, module.weight_scale, module.weight_zero_point.to(torch.int32),
                    module.weight_axis_int, module.weight_quant_min, module.weight_quant_max))


def torch_logits(model: torch.nn.Module, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference model's quantize_per_tensor is deprecated
        return torch.cat([model(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size])))
                          for i in range(0, len(inputs), batch_size)]).numpy()
