"""Run an ONNX classifier on CPU over preprocessed inputs and keep its logits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from ptqcal.errors import InputError
from ptqcal.progress import bar_disabled


class SessionError(InputError):
    """A model ONNX Runtime cannot load or run (unknown operators, custom domains, bad graphs)."""


def execution_provider(name: str) -> str:
    """ORT's full provider name for ``name`` (``CPU`` or ``CPUExecutionProvider``); raises
    :class:`SessionError` when this onnxruntime build does not have it."""
    full = name if name.endswith("ExecutionProvider") else f"{name}ExecutionProvider"
    available = ort.get_available_providers()
    if full not in available:
        raise SessionError(f"execution provider {name!r} is not available in this onnxruntime build (available: "
                           f"{', '.join(p.removesuffix('ExecutionProvider') for p in available)})", setting="provider")
    return full


def make_session(model: str | Path | bytes, fused: bool = True, optimized_model_path: str | Path | None = None,
                 provider: str = "CPU", threads: int = 0, spinning: bool = True) -> ort.InferenceSession:
    """The one session factory: ``model`` (a path, or a serialised ModelProto) on ``provider`` (CPU
    by default) with ``threads`` intra-op threads (0: ORT's default, one per physical core).
    ``fused=False`` keeps Q/DQ around float ops (the simulated path); the default lets ORT fuse them
    into integer kernels such as QLinearConv (the deployed path). ``spinning=False`` keeps the
    session's idle threads from spin-waiting for work: for a caller that keeps several sessions
    alive and runs them in turn, whose idle threads would take the cores from the one running."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    providers = [execution_provider(provider)]
    name = "the model" if isinstance(model, bytes) else Path(model).name
    if providers[0] != "CPUExecutionProvider":
        # ORT would run on the CPU whatever the provider cannot, without a word, and the report would
        # name the provider: every node must run where asked (ORT's own refusal is logged as fatal only)
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options.log_severity_level = 4
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind error types for graphs it cannot run
        reason = " ".join(str(exc).split())[:300]
        if "fallback to CPU EP has been explicitly disabled" in reason:
            raise SessionError(f"execution provider {provider!r} cannot run every node of {name} (ONNX Runtime would "
                               "run the others on the CPU): choose a provider that runs the whole model",
                               setting="provider") from None
        raise SessionError(f"ONNX Runtime cannot run {name}: {reason}") from None


def predict(session: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 256, desc: str = "evaluate",
            progress: bool = True, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Logits for every row of ``inputs``, batch by batch, with a progress bar (only on a terminal;
    ``TQDM_DISABLE=1`` turns it off).

    ``transform`` turns each slice into model input (e.g. uint8 pixels -> normalised float32),
    so a large dataset is never held in memory as float32 all at once.
    """
    batches = (inputs[start:start + batch_size] for start in range(0, len(inputs), batch_size))
    return predict_batches(session, (transform(b) for b in batches) if transform else batches, len(inputs), desc,
                           progress)


def predict_batches(session: ort.InferenceSession, batches: Iterable[np.ndarray], total: int | None = None,
                    desc: str = "evaluate", progress: bool = True,
                    timings: list[tuple[int, float]] | None = None) -> np.ndarray:
    """Logits of a stream of ready model-input batches (e.g. decoded and normalised in a background
    thread while the session runs); only the logits are kept. ``timings`` gets (images, seconds)
    of each ``session.run``."""
    input_name = session.get_inputs()[0].name
    chunks = []
    with tqdm(total=total, desc=desc, unit="img", disable=bar_disabled(progress), leave=False) as bar:
        for batch in batches:
            feed = {input_name: np.ascontiguousarray(batch)}
            start = time.perf_counter()
            try:
                chunks.append(session.run(None, feed)[0])
            except Exception as exc:  # ORT's pybind errors: the graph fails on real input
                reason = " ".join(str(exc).split())[:300]
                raise SessionError(f"ONNX Runtime failed to run the model: {reason}") from None
            if timings is not None:
                timings.append((len(batch), time.perf_counter() - start))
            bar.update(len(batch))
    return np.concatenate(chunks).astype(np.float32, copy=False)


# Ops that move or reshape data without arithmetic (in float or not, they change no value)
DATA_MOVEMENT_OPS = {"Shape", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Concat",
                     "Slice", "Identity", "Cast", "Constant", "Expand", "Split", "Equal", "Where"}
INTEGER_OPS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "QuantizeLinear", "DequantizeLinear",
               "DynamicQuantizeLinear", "QAttention")


def deployed_float_ops(model_path: str | Path, work_dir: str | Path, provider: str = "CPU") -> dict[str, int]:
    """Op types (with counts) that still compute in float in the graph ORT runs for a quantized
    model: what it has no integer kernel for (LayerNorm, GELU's Erf, int4-weight Convs, ...)."""
    import onnx

    target = Path(work_dir) / (Path(model_path).stem + ".optimized.onnx")
    make_session(model_path, optimized_model_path=target, provider=provider)
    counts: dict[str, int] = {}
    for node in onnx.load(str(target)).graph.node:
        if node.op_type not in DATA_MOVEMENT_OPS and not node.op_type.startswith(INTEGER_OPS):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def optimized_op_types(model_path: str | Path, work_dir: str | Path, fused: bool = True) -> set[str]:
    """Op types of the graph ORT actually runs after its optimisations (to check fusion)."""
    import onnx

    target = Path(work_dir) / (Path(model_path).stem + ".optimized.onnx")
    make_session(model_path, fused=fused, optimized_model_path=target)
    return {node.op_type for node in onnx.load(str(target)).graph.node}

