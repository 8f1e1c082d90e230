"""How far two runs of one quantized configuration agree: ORT's deployed and simulated paths, and
ptqcal's ONNX Runtime model against PyTorch's ``torch.ao`` quantization of the same network."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import logit_margin, quantization_change, top_k_error


@dataclass(frozen=True)
class PathAgreement:
    """How far ORT's fused integer kernels (deployed) and float ops between Q/DQ (simulated)
    agree for one quantized model on the same images."""

    config: str
    images: int
    max_abs_logit_diff: float
    top1_agreement: float  # fraction of images with the same top-1 prediction


def compare_paths(config: str, deployed: np.ndarray, simulated: np.ndarray) -> PathAgreement:
    """Compare the deployed and simulated logits of one quantized model on the same images."""
    return PathAgreement(config, len(deployed), float(np.max(np.abs(deployed - simulated))),
                         float(np.mean(deployed.argmax(1) == simulated.argmax(1))))


@dataclass(frozen=True)
class TorchAgreement:
    """How far ptqcal's ORT model and torch.ao's agree for one configuration (fractions)."""

    config: str
    top1_agreement: float  # ONNX Runtime vs PyTorch quantized predictions
    max_abs_logit_diff: float
    onnx_top1_error: float
    torch_top1_error: float
    onnx_swapped: float  # predictions each quantized model changed from the float model's
    torch_swapped: float
    # the largest float top-1 minus top-2 logit among the images the two disagree on (0 if none):
    # two faithful quantizers should part only where the float model itself barely decides
    disagreement_max_float_margin: float


def torch_agreement(config: str, float_logits: np.ndarray, onnx_logits: np.ndarray, torch_logits: np.ndarray,
                    labels: np.ndarray) -> TorchAgreement:
    """Agreement of two quantized models' logits, each also against the float model's."""
    disagree = onnx_logits.argmax(1) != torch_logits.argmax(1)
    return TorchAgreement(config, float(np.mean(~disagree)), float(np.max(np.abs(onnx_logits - torch_logits))),
                          top_k_error(onnx_logits, labels), top_k_error(torch_logits, labels),
                          quantization_change(float_logits, onnx_logits, labels).swap_rate,
                          quantization_change(float_logits, torch_logits, labels).swap_rate,
                          float(logit_margin(float_logits)[disagree].max(initial=0.0)))
