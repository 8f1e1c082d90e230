"""What a run checks of each quantized graph it evaluates: how far ORT's deployed and simulated paths
agree, and what ORT still computes in float when it runs the graph (cached steps, as
:mod:`ptqcal.steps`'s)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cache import Cache, file_digest, make_key, scratch_folder
from .config import RunConfig
from .data.pixels import Pixels
from .models import PreprocessCfg
from .steps import KEYED, model_logits
from .versions import versions


def check_deployment(cache: Cache, path: Path, name: str, evaluated: np.ndarray, pixels: Pixels,
                     preprocess: PreprocessCfg, cfg: RunConfig, batch_size: int):
    """How far the deployed (fused integer kernels) and simulated paths of one quantized model
    agree on the first ``cfg.check_images`` images (a :class:`~ptqcal.evaluate.PathAgreement`), or
    ``None`` when the check is off. ``evaluated`` are the run's logits of the model on ``pixels``
    (on ``cfg.execution``'s path): only the other path is computed, in batches of ``batch_size``."""
    from .evaluate import compare_paths

    count = min(cfg.check_images, len(evaluated))
    if count == 0:
        return None
    deployed = cfg.execution == "deployed"
    other = model_logits(cache, path, pixels, preprocess, replace(cfg, batch_size=batch_size), "check", not deployed,
                         "check-logits", count)
    ours = evaluated[:count]
    return compare_paths(name, ours, other) if deployed else compare_paths(name, other, ours)


def deployed_float_ops(cache: Cache, path: Path, cfg: RunConfig) -> dict[str, int]:
    """What ORT still computes in float when it runs the quantized model at ``path`` (op type ->
    count), from the graph it optimises for ``cfg.provider``."""
    from .evaluate.runner import deployed_float_ops as count

    def write(tmp: Path) -> None:
        with scratch_folder(tmp.parent, ".ptqcal-optimized-") as folder:
            tmp.write_text(json.dumps(count(path, str(folder), cfg.provider)))

    key = make_key(file_digest(path), versions(KEYED), cfg.provider)
    return json.loads(cache.file("float-ops", key, "json", write).read_text())
