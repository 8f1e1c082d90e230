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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from tqdm.auto import tqdm

from ptqcal.atomic import atomic_path

from .ranges import CalibMethod, range_from_histogram
from .spec import QuantizeError

DEFAULT_BINS = 2048


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when asked or when ``TQDM_DISABLE`` is set (an explicit argument
    would override tqdm's own reading of it), else ``None``, which shows a bar only on a terminal."""
    wanted_off = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return True if not progress or wanted_off else None
UPSAMPLE_RATE = 16  # as HistogramObserver: sub-bins used when re-binning onto a wider range


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


def histc(x: np.ndarray, bins: int, lo: np.float32, hi: np.float32, inside: bool = False) -> np.ndarray:
    """``torch.histc``: equal-width bins over [lo, hi], values outside ignored, hi in the last bin.

    ``inside=True`` promises every value lies in [lo, hi] (as when the range was just widened to
    cover them) and skips the masking copy.
    """
    if not inside:
        x = x[(x >= lo) & (x <= hi)]
    if hi == lo:
        return np.bincount(np.zeros(len(x), dtype=np.intp), minlength=bins).astype(np.float32)
    index = x - lo
    index *= np.float32(bins)
    index /= hi - lo
    index = index.astype(np.intp)
    np.minimum(index, bins - 1, out=index)
    return np.bincount(index, minlength=bins).astype(np.float32)


@dataclass
class TensorHistogram:
    """The running histogram of one tensor over [lo, hi]."""

    bins: int = DEFAULT_BINS
    lo: np.float32 = field(default_factory=lambda: np.float32(np.inf))
    hi: np.float32 = field(default_factory=lambda: np.float32(-np.inf))
    counts: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        if x.size == 0:
            return
        x_lo, x_hi = x.min(), x.max()
        if not (np.isfinite(x_lo) and np.isfinite(x_hi)):  # rare: drop inf/NaN, as the observer does
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            x_lo, x_hi = x.min(), x.max()
        if self.counts is None:
            self.lo, self.hi = x_lo, x_hi
            self.counts = histc(x, self.bins, x_lo, x_hi, inside=True)
            return
        new_lo, new_hi = min(self.lo, x_lo), max(self.hi, x_hi)
        update = histc(x, self.bins, new_lo, new_hi, inside=True)
        if new_lo == self.lo and new_hi == self.hi:
            self.counts = self.counts + update
        else:
            self.counts = update + self._rebin(new_lo, new_hi)
            self.lo, self.hi = new_lo, new_hi

    def _rebin(self, new_lo: np.float32, new_hi: np.float32) -> np.ndarray:
        """Move the current histogram onto [new_lo, new_hi] (HistogramObserver._combine_histograms)."""
        if self.lo == self.hi:
            return histc(np.array([self.lo], dtype=np.float32), self.bins, new_lo, new_hi) * self.counts.sum()
        fine = np.repeat(self.counts, UPSAMPLE_RATE) / UPSAMPLE_RATE
        width = (self.hi - self.lo) / np.float32(self.bins * UPSAMPLE_RATE)
        mids = np.linspace(self.lo, self.hi, self.bins * UPSAMPLE_RATE + 1, dtype=np.float32)[:-1] + width / 2
        edges = np.linspace(new_lo, new_hi, self.bins + 1, dtype=np.float32)
        target = np.clip(np.searchsorted(edges, mids, side="right") - 1, 0, self.bins - 1)
        return np.bincount(target, weights=fine, minlength=self.bins).astype(np.float32)


def calibration_tensors(model: onnx.ModelProto) -> list[str]:
    """Float activations that enter or leave a node (what ORT's calibrators select), in graph order."""
    model = onnx.shape_inference.infer_shapes(model)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    typed = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    initializers = {init.name for init in model.graph.initializer}
    names: dict[str, None] = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            if name and name not in initializers and typed.get(name) in float_types:
                names[name] = None
    return list(names)


def collect_histograms(model_path: str | Path, reader: CalibrationDataReader, bins: int = DEFAULT_BINS,
                       progress: bool = True, threads: int = 0) -> dict[str, TensorHistogram]:
    """One pass over ``reader``: run the model with every calibration tensor exposed as an output."""
    model = onnx.load(str(model_path))
    names = calibration_tensors(model)
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.intra_op_num_threads = threads  # 0: ORT's default
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    histograms = {name: TensorHistogram(bins) for name in names}
    total = (len(reader) or None) if hasattr(reader, "__len__") else None
    with tqdm(total=total, desc="calibrate", unit="batch", disable=bar_disabled(progress), leave=False) as bar:
        while (feed := reader.get_next()) is not None:
            values = dict(zip(outputs, session.run(outputs, feed)))
            values.update(feed)
            for name, histogram in histograms.items():
                histogram.update(values.pop(name))  # free each output once counted: one batch alive at a time
            del values, feed
            bar.update()
    return histograms


@dataclass(frozen=True)
class CalibrationRanges:
    """Per-tensor activation ranges of one calibration run; saved as JSON and reusable."""

    method: str
    bits: int
    num_images: int
    ranges: dict[str, tuple[float, float]]

    def save(self, path: str | Path, used: set[str] | None = None) -> Path:
        """Write the ranges as JSON; with ``used`` (the tensors a quantized graph quantizes), the
        others go under ``unused_ranges`` so the file says which ranges the graph uses."""
        path = Path(path)
        keep = self.ranges if used is None else {k: v for k, v in self.ranges.items() if k in used}
        payload = {"method": self.method, "bits": self.bits, "num_images": self.num_images,
                   "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in keep.items()}}
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
            return cls(str(payload["method"]), int(payload["bits"]), int(payload["num_images"]), ranges)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QuantizeError(f"{path} is not a calibration ranges file ({type(exc).__name__})",
                                setting="calib_ranges") from exc

    def check_fits(self, model: onnx.ModelProto, act_bits: tuple[int, ...]) -> "CalibrationRanges":
        """Raise :class:`QuantizeError` unless these ranges cover every calibration tensor of
        ``model`` and were computed for the only activation bit width asked for."""
        if tuple(act_bits) != (self.bits,):
            raise QuantizeError(f"the saved ranges are {self.bits}-bit ranges: quantize activations to "
                                f"{self.bits} bits only, with one calibration draw", setting="calib_ranges")
        missing = sorted(set(calibration_tensors(model)) - set(self.ranges))
        if missing:
            raise QuantizeError(f"the saved ranges do not fit this model: no range for {', '.join(missing[:3])}"
                                + (" …" if len(missing) > 3 else ""), setting="calib_ranges")
        return self


def compute_ranges(histograms: dict[str, TensorHistogram], method: str, bits: int = 8,
                   num_images: int = 0, percentile: float = 99.99) -> CalibrationRanges:
    """Turn collected histograms into ranges with one of :data:`RANGE_METHODS`."""
    method = CalibMethod(method).value  # ValueError for an unknown one
    ranges = {name: range_from_histogram(h.counts, h.lo, h.hi, method, bits, percentile)
              for name, h in histograms.items() if h.counts is not None}
    return CalibrationRanges(method, bits, num_images, ranges)


def save_histograms(histograms: dict[str, TensorHistogram], path: str | Path) -> None:
    """All of a calibration pass in one ``.npz``: any method and bit width can be computed later."""
    with open(path, "wb") as handle:
        np.savez(handle, names=np.array(list(histograms), dtype=str),
                 lo=np.array([h.lo for h in histograms.values()], dtype=np.float32),
                 hi=np.array([h.hi for h in histograms.values()], dtype=np.float32),
                 counts=np.stack([h.counts for h in histograms.values()]))


def load_histograms(path: str | Path) -> dict[str, TensorHistogram]:
    with np.load(path) as stored:
        bins = stored["counts"].shape[1]
        return {str(name): TensorHistogram(bins, lo, hi, counts)
                for name, lo, hi, counts in zip(stored["names"], stored["lo"], stored["hi"], stored["counts"])}
