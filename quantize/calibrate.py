"""A streaming histogram calibrator fed through ONNX Runtime's ``CalibrationDataReader`` protocol.

ORT's own histogram calibrators keep every intermediate output of every calibration batch in
memory until ``compute_data`` (gigabytes for a ResNet56 on 1,024 images) and offer no L2 search.
Here one pass keeps one fixed-size histogram per tensor, merged batch by batch the way
``torch.ao.quantization.HistogramObserver`` merges them when the range grows, so memory is
``#tensors x bins`` whatever the number of images. Every range method is then computed from the
same histograms: one calibration pass serves every method and every activation bit width.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from ptqcal.atomic import atomic_path
from ptqcal.progress import progress_bar

from .graph import calibration_tensors, ranges_set_by_ort
from .histogram import DEFAULT_BINS, HistogramBinner, TensorHistogram, usable_cores
from .ranges import CalibMethod, range_from_histogram
from .spec import QuantizeError


class ArrayDataReader(CalibrationDataReader):
    """Batches of a preprocessed ``(N, C, H, W)`` array, as ORT's calibration protocol wants them."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 64):
        self.input_name = input_name
        self.inputs = inputs
        self.batch_size = batch_size
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.inputs):
            return None
        batch = self.inputs[self._start:self._start + self.batch_size]
        self._start += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.batch_size)


class BatchDataReader(CalibrationDataReader):
    """Ready model-input batches from ``batches()`` (called again on ``rewind``), e.g. images
    decoded and normalised in a background thread: the calibration set is never held whole."""

    def __init__(self, input_name: str, batches: Callable[[], Iterator[np.ndarray]], num_batches: int | None = None):
        self.input_name = input_name
        self._batches = batches
        self._iterator = batches()
        self._num_batches = num_batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iterator, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._iterator = self._batches()

    def __len__(self) -> int:
        return self._num_batches or 0


def collect_histograms(model_path: str | Path, reader: CalibrationDataReader, bins: int = DEFAULT_BINS,
                       progress: bool = True, threads: int = 0,
                       exclude: tuple[str, ...] = ()) -> dict[str, TensorHistogram]:
    """One pass over ``reader``: run the model with every calibration tensor exposed as an output
    and bin them, except those whose range ORT takes from the next node (:func:`ranges_set_by_ort`
    for a quantization that keeps ``exclude``'s nodes float), which point to that range instead."""
    model = onnx.load(str(model_path))
    names = calibration_tensors(model)
    derived = ranges_set_by_ort(model, exclude)
    binned = [name for name in names if name not in derived]
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in binned if n not in existing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.intra_op_num_threads = threads  # 0: ORT's default
    # ORT's threads would spin waiting for work while the binning threads want the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    histograms = {name: TensorHistogram(bins) for name in binned}
    total = (len(reader) or None) if hasattr(reader, "__len__") else None
    with (progress_bar(total, "calibrate", "batch", progress) as bar,
          HistogramBinner(histograms, threads or usable_cores()) as binner):
        while (feed := reader.get_next()) is not None:
            values = dict(zip(outputs, session.run(outputs, feed)))
            values.update(feed)
            binner.submit(values)  # binned while ORT runs the next batch; freed once counted
            del values, feed
            bar.update()
        binner.wait()
    histograms.update({name: TensorHistogram(bins, same_as=derived[name]) for name in names if name in derived})
    return {name: histograms[name] for name in names}


@dataclass(frozen=True)
class CalibrationRanges:
    """Per-tensor activation ranges of one calibration run; saved as JSON and reusable."""

    method: str
    bits: int
    num_images: int
    ranges: dict[str, tuple[float, float]]
    derived: tuple[str, ...] = ()  # tensors given another's range, as ORT would (ranges_set_by_ort)

    def save(self, path: str | Path, used: set[str] | None = None) -> Path:
        """Write the ranges as JSON; with ``used`` (the tensors a quantized graph quantizes), the
        others go under ``unused_ranges`` so the file says which ranges the graph uses."""
        path = Path(path)
        keep = self.ranges if used is None else {k: v for k, v in self.ranges.items() if k in used}
        payload = {"method": self.method, "bits": self.bits, "num_images": self.num_images,
                   "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in keep.items()},
                   "derived": list(self.derived)}
        if used is not None:
            payload["unused_ranges"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.ranges.items()
                                        if k not in used}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationRanges":
        """Ranges saved by :meth:`save`; :class:`QuantizeError` for anything else."""
        try:
            payload = json.loads(Path(path).read_text())
            stored = {**payload.get("unused_ranges", {}), **payload["ranges"]}
            ranges = {str(k): (float(lo), float(hi)) for k, (lo, hi) in stored.items()}
            derived = tuple(str(name) for name in payload.get("derived", []))
            loaded = cls(str(payload["method"]), int(payload["bits"]), int(payload["num_images"]), ranges, derived)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QuantizeError(f"{path} is not a calibration ranges file ({type(exc).__name__})",
                                setting="calib_ranges") from exc
        bad = next((k for k, (lo, hi) in ranges.items() if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi)),
                   None)
        if bad is not None:  # a reversed range would quantize silently, a NaN one fail inside ORT
            raise QuantizeError(f"{path}: the range of {bad!r} is {list(ranges[bad])}, not a finite low <= high",
                                setting="calib_ranges")
        return loaded

    def check_fits(self, model: onnx.ModelProto, act_bits: tuple[int, ...],
                   exclude: tuple[str, ...] = ()) -> "CalibrationRanges":
        """Raise :class:`QuantizeError` unless these ranges cover every calibration tensor of
        ``model``, were computed for the only activation bit width asked for, and took no tensor's
        range from a node that ``exclude`` keeps float (ORT then needs the tensor's own)."""
        if tuple(act_bits) != (self.bits,):
            raise QuantizeError(f"the saved ranges are {self.bits}-bit ranges: quantize activations to "
                                f"{self.bits} bits only, with one calibration draw", setting="calib_ranges")
        missing = sorted(set(calibration_tensors(model)) - set(self.ranges))
        if missing:
            raise QuantizeError(f"the saved ranges do not fit this model: no range for {', '.join(missing[:3])}"
                                + (" …" if len(missing) > 3 else ""), setting="calib_ranges")
        return self.check_derived(model, exclude)

    def check_derived(self, model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> "CalibrationRanges":
        """Raise :class:`QuantizeError` if a range was taken from a Relu/Clip that a quantization
        keeping ``exclude``'s nodes float leaves float: ORT would then use the tensor's own range,
        which was never measured (calibrate with the same ``exclude``)."""
        own_needed = sorted(set(self.derived) - set(ranges_set_by_ort(model, exclude)))
        if own_needed:
            raise QuantizeError(f"the ranges have no own range for {', '.join(own_needed[:3])}"
                                + (" …" if len(own_needed) > 3 else "") + " (the node after it was quantized "
                                "when they were calibrated, and is kept float now)", setting="calib_ranges")
        return self


def compute_ranges(histograms: dict[str, TensorHistogram], method: str, bits: int = 8,
                   num_images: int = 0, percentile: float = 99.99) -> CalibrationRanges:
    """Turn collected histograms into ranges with one of :data:`RANGE_METHODS`; a tensor that was
    not binned (``same_as``) gets the range ORT would give it."""
    method = CalibMethod(method).value  # ValueError for an unknown one
    ranges = {name: range_from_histogram(h.counts, h.lo, h.hi, method, bits, percentile)
              for name, h in histograms.items() if h.counts is not None}
    derived = tuple(name for name, h in histograms.items() if h.same_as and h.same_as in ranges)
    ranges.update({name: ranges[histograms[name].same_as] for name in derived})
    return CalibrationRanges(method, bits, num_images, {name: ranges[name] for name in histograms if name in ranges},
                             derived)


# Ops whose output torch.ao quantizes with their input's scale and zero point
TORCH_SHARED_QPARAM_OPS = ("GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape")


def share_input_ranges(graph, ranges):
    """Give the outputs of :data:`TORCH_SHARED_QPARAM_OPS` their input's range, as torch.ao does
    (ORT calibrates them separately: a pooled tensor gets a range of its own, 3x finer on ResNet20)."""
    shared = dict(ranges.ranges)
    for node in graph.node:  # graph order, so chains (pool -> flatten) inherit from the start
        if node.op_type in TORCH_SHARED_QPARAM_OPS and node.input[0] in shared:
            shared[node.output[0]] = shared[node.input[0]]
    return CalibrationRanges(ranges.method, ranges.bits, ranges.num_images, shared)
