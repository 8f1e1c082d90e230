"""Other toolchains' quantizers as configurations beside ptqcal's own, each as its documentation
gives it: ONNX Runtime's static quantizer (QDQ and QOperator), ONNX Runtime's weight-only int4
MatMulNBits quantizer (round to nearest and HQQ) and NNCF's post-training quantization.

Every peer takes a prepared float model (:func:`.qdq.prepare`), a ``CalibrationDataReader`` of
calibration batches (rewound before use) and the path to write. Each works inside a private folder
beside that path, so nothing is left in $TMPDIR or beside the input, and the file appears whole
(:func:`ptqcal.atomic.atomic_path`). Each gives the same bytes for the same inputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from ptqcal.atomic import atomic_path
from ptqcal.cache import scratch_folder
from .qdq import _ort_temporary_files, _ort_warnings_held
from .spec import QuantizeError


class PeerError(QuantizeError):
    """A peer toolchain that cannot quantize this model, or is not installed."""


@dataclass(frozen=True)
class Peer:
    """One peer configuration: ``quantize(prepared_path, reader, out_path)`` writes the model."""

    name: str
    description: str
    quantize: Callable[[Path, CalibrationDataReader, Path], None]
    modules: tuple[str, ...] = ()  # what it imports beyond ptqcal's own dependencies
    extra: str | None = None  # the ptqcal extra that installs them

    def unavailable(self) -> str | None:
        """One line saying why this peer cannot run here, or ``None``."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if not missing:
            return None
        return (f"peer {self.name} is unavailable: it needs {', '.join(missing)} "
                f"(pip install 'ptqcal[{self.extra}]')")

    def __call__(self, prepared_path: str | Path, reader: CalibrationDataReader, out_path: str | Path) -> Path:
        reason = self.unavailable()
        if reason:
            raise PeerError(reason, setting="peers")
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(reader, "rewind"):
            reader.rewind()
        self.quantize(Path(prepared_path), reader, out_path)
        return out_path


@contextlib.contextmanager
def _work_folder(out_path: Path) -> Iterator[Path]:
    """A private folder beside the output (inside the run's cache; /tmp may be another file system),
    also where ORT's own temporary folders go for the call."""
    with scratch_folder(out_path.parent, ".ptqcal-peer-") as tmp, \
            _ort_temporary_files(tmp), _ort_warnings_held():
        yield Path(tmp)


def _save(model: onnx.ModelProto, out_path: Path) -> None:
    with atomic_path(out_path) as target:
        onnx.save(model, str(target))


# ONNX Runtime's static quantizer. Its documentation ("Quantize ONNX models", data type selection):
# "S8S8 with QDQ is the default setting and balances performance and accuracy. It should be the
# first choice. [...] S8S8 with QOperator will be slow on x86-64 CPUs and should be avoided in
# general." So QDQ takes int8 activations and weights (also quantize_static's defaults) and QOperator
# uint8 activations with int8 weights (U8S8). MinMax calibration (its default); per-channel weights
# ("can improve the accuracy for models whose weight ranges are large"), as every configuration
# here has them. reduce_range stays off (its default): the documentation asks for it with U8S8 per
# channel only on AVX2/AVX-512 CPUs without VNNI, against saturation. The graph outputs are
# quantized too, as ORT does by default.
def _ort_static(quant_format: QuantFormat, activation_type: QuantType) -> Callable:
    def quantize(prepared_path: Path, reader: CalibrationDataReader, out_path: Path) -> None:
        with _work_folder(out_path) as tmp:
            # ORT writes "<input>-inferred.onnx" beside its input: the input is a private copy
            private = tmp / "prepared.onnx"
            onnx.save(onnx.load(str(prepared_path)), str(private))
            partial = tmp / "model.onnx"
            quantize_static(str(private), str(partial), reader, quant_format=quant_format, per_channel=True,
                            activation_type=activation_type, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            with atomic_path(out_path) as target:
                os.replace(partial, target)
    return quantize


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a stored 2-D weight (what MatMulNBits can take)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2]


def gemms_as_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm with a stored weight (no transA, alpha = beta = 1) as MatMul + Add, the same
    arithmetic: ORT's MatMulNBits quantizer takes only MatMul, and a classifier's head is a Gemm.
    Returns how many were rewritten."""
    initializers = {init.name: init for init in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        name = node.name or f"Gemm_{rewritten}"
        matrix = f"{node.input[1]}_matmul_{name}"
        model.graph.initializer.append(numpy_helper.from_array(
            np.ascontiguousarray(weight.T if attrs.get("transB", 0) else weight), matrix))
        bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], matrix], [product], name=name))
        if bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{name}_bias"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    return rewritten


_IMPORT = threading.Lock()
# NNCF imports torch's C++ extension loader (when torch is there), which warns that there is no CUDA
TORCH_CPP_LOGGER = "torch.utils.cpp_extension"


@contextlib.contextmanager
def _errors_only(*names: str) -> Iterator[None]:
    """For the block, these loggers pass only errors (their levels restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _matmul_nbits():
    """ORT's matmul_nbits_quantizer, imported without its ``logging.basicConfig(level=INFO)``
    configuring the root logger: a handler held on the root for the import makes that call a no-op."""
    with _IMPORT:
        root, held = logging.getLogger(), logging.NullHandler()
        root.addHandler(held)
        try:
            from onnxruntime.quantization import matmul_nbits_quantizer
        finally:
            root.removeHandler(held)
    return matmul_nbits_quantizer


# Weight-only int4 with MatMulNBits, with the quantizer's own defaults but the block size:
# asymmetric 4-bit blocks along K, float activations. "rtn" is ORT's default algorithm (round to
# nearest from each block's min and max, in ORT's C++ kernel); ORT's separate "rtn" method (its
# port of Intel Neural Compressor) fails on an odd number of output columns (10 classes) with a
# reshape error, so it is not used. HQQ (half-quadratic quantization) needs torch.
def _nbits(algorithm: str, block_size: int) -> Callable:
    def quantize(prepared_path: Path, reader: CalibrationDataReader, out_path: Path) -> None:
        nbits = _matmul_nbits()
        model = onnx.load(str(prepared_path))
        gemms_as_matmuls(model)
        if not weight_matmuls(model):
            raise PeerError(f"{prepared_path.name} has no MatMul/Gemm weights; ORT's weight-only int4 covers only "
                            "those", setting="peers")
        config = (nbits.HQQWeightOnlyQuantConfig(block_size=block_size) if algorithm == "hqq"
                  else nbits.DefaultWeightOnlyQuantConfig(block_size=block_size))
        with _work_folder(out_path), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch on ORT's read-only numpy weights (HQQ)
            quantizer = nbits.MatMulNBitsQuantizer(model, block_size=block_size, algo_config=config)
            quantizer.process()
        _save(quantizer.model.model, out_path)
    return quantize


def _import_nncf():
    """NNCF with its telemetry off and nothing written to $HOME. Its telemetry wrapper reads NNCF_CI
    when it is imported (then never again): set for the import and restored after. openvino_telemetry
    (an NNCF dependency) writes a client id and usage counts under ~/intel when NNCF builds its
    sender at import, even before NNCF_CI switches sending off: hidden for the import, so NNCF takes
    its no-telemetry stub."""
    if "nncf" in sys.modules:
        return sys.modules["nncf"]
    with _IMPORT:
        saved_env = os.environ.get("NNCF_CI")
        hide = "openvino_telemetry" not in sys.modules
        os.environ["NNCF_CI"] = saved_env or "1"
        if hide:
            sys.modules["openvino_telemetry"] = None  # an ImportError for NNCF's `from openvino_telemetry import`
        try:
            with _errors_only(TORCH_CPP_LOGGER):
                import nncf
        finally:
            if hide:
                sys.modules.pop("openvino_telemetry", None)
            if saved_env is None:
                os.environ.pop("NNCF_CI", None)
            else:
                os.environ["NNCF_CI"] = saved_env  # as it was, an empty value included
    return nncf


class _Samples:
    """The reader's batches as single-image feeds, as NNCF's documentation asks (batch size 1: its
    statistics are per sample); iterable again (the reader is rewound), with its length known."""

    def __init__(self, reader: CalibrationDataReader):
        self.reader = reader
        self.count = sum(len(next(iter(feed.values()))) for feed in self._batches())

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        if hasattr(self.reader, "rewind"):
            self.reader.rewind()
        while (feed := self.reader.get_next()) is not None:
            yield feed

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for feed in self._batches():
            rows = len(next(iter(feed.values())))
            for row in range(rows):
                yield {name: values[row:row + 1] for name, values in feed.items()}


# NNCF's post-training quantization of the ONNX model with its defaults (preset PERFORMANCE:
# symmetric int8 weights per channel and activations per tensor), on every calibration image
# (subset_size; NNCF's default takes 300). "nncf" runs without bias correction, "nncf-fbc" with
# NNCF's default fast bias correction.
def _nncf(fast_bias_correction: bool) -> Callable:
    def quantize(prepared_path: Path, reader: CalibrationDataReader, out_path: Path) -> None:
        nncf = _import_nncf()
        samples = _Samples(reader)
        if not samples.count:
            raise PeerError("NNCF needs calibration images; the reader gave none", setting="peers")
        options = {} if fast_bias_correction else {
            "advanced_parameters": nncf.AdvancedQuantizationParameters(disable_bias_correction=True)}
        # NNCF logs warnings and draws rich progress bars on stdout, with no switch for the bars
        with _work_folder(out_path), contextlib.redirect_stdout(io.StringIO()), \
                _errors_only("nncf", TORCH_CPP_LOGGER):
            quantized = nncf.quantize(onnx.load(str(prepared_path)), nncf.Dataset(samples),
                                      subset_size=samples.count, fast_bias_correction=fast_bias_correction, **options)
        _save(quantized, out_path)
    return quantize


def _peers() -> dict[str, Peer]:
    peers = [
        Peer("ort-qdq", "ONNX Runtime quantize_static: QDQ, int8 activations and weights (S8S8), MinMax, per "
             "channel", _ort_static(QuantFormat.QDQ, QuantType.QInt8)),
        Peer("ort-qop", "ONNX Runtime quantize_static: QOperator, uint8 activations, int8 weights (U8S8), MinMax, "
             "per channel", _ort_static(QuantFormat.QOperator, QuantType.QUInt8)),
    ]
    for block in (32, 128):
        peers += [
            Peer(f"nbits-rtn-b{block}", f"ONNX Runtime MatMulNBits: weight-only int4, round to nearest, block "
                 f"{block} (MatMul/Gemm weights only)", _nbits("rtn", block), ("onnx_ir",), "nbits"),
            Peer(f"nbits-hqq-b{block}", f"ONNX Runtime MatMulNBits: weight-only int4, HQQ, block {block} "
                 "(MatMul/Gemm weights only)", _nbits("hqq", block), ("onnx_ir", "torch"), "nbits,torch"),
        ]
    peers += [
        Peer("nncf", "NNCF post-training quantization, default preset, no bias correction", _nncf(False),
             ("nncf",), "nncf"),
        Peer("nncf-fbc", "NNCF post-training quantization, default preset, fast bias correction", _nncf(True),
             ("nncf",), "nncf"),
    ]
    return {peer.name: peer for peer in peers}


PEERS: dict[str, Peer] = _peers()


def run_peer(name: str, prepared_path: str | Path, reader: CalibrationDataReader, out_path: str | Path) -> Path:
    """Quantize with the peer called ``name``; :class:`PeerError` (one line) for an unknown or
    unavailable peer or a model it cannot take."""
    if name not in PEERS:
        raise PeerError(f"no peer toolchain is called {name!r} (choose from {', '.join(PEERS)})", setting="peers")
    return PEERS[name](prepared_path, reader, out_path)
