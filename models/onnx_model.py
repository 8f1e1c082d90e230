"""What a user's ``.onnx`` classifier takes and returns, read from the graph (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from .preprocess import DIGITS_PREPROCESS, IMAGENET_PREPROCESS, PreprocessCfg
from .weights import ModelError


@dataclass(frozen=True)
class OnnxModelInfo:
    """What a classifier's graph declares: its one input and its ``(N, classes)`` output."""

    path: Path
    input_name: str
    input_shape: tuple[int | None, ...]  # None for symbolic dimensions
    output_name: str
    num_classes: int
    ends_in_softmax: bool  # outputs are probabilities, not logits

    @property
    def chw(self) -> tuple[int, int, int] | None:
        shape = self.input_shape[1:]
        return shape if len(shape) == 3 and None not in shape else None  # type: ignore[return-value]


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def inspect_onnx(path: str | Path) -> OnnxModelInfo:
    """Check that ``path`` is a single-input classifier with an ``(N, classes)`` output."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", setting="model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError or a protobuf error
        raise ModelError(f"{path} is not an ONNX model ({type(exc).__name__})") from exc
    if not model.graph.node:
        raise ModelError(f"{path} is not an ONNX model (no graph nodes)")
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelError(f"{path}: expected one image input and one output, found "
                        f"{len(inputs)} inputs and {len(model.graph.output)} outputs")
    output = model.graph.output[0]
    out_dims = _dims(output)
    if out_dims is not None and (len(out_dims) != 2 or out_dims[1] is None):
        raise ModelError(f"{path}: output {output.name!r} has shape {list(out_dims)}, expected (N, classes)")
    in_dims = _dims(inputs[0]) or ()
    producer = next((n for n in model.graph.node if output.name in n.output), None)
    return OnnxModelInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=in_dims,
        output_name=output.name,
        num_classes=out_dims[1] if out_dims else 0,
        ends_in_softmax=producer is not None and producer.op_type == "Softmax",
    )


def without_softmax(path: str | Path, out_path: str | Path) -> Path:
    """The same classifier with its final Softmax removed, so that it outputs logits.

    Confidence, NLL and temperature scaling all need logits; a graph that ends in Softmax has them
    as the Softmax's input (keeping the output's name).
    """
    model = onnx.load(str(path))
    output = model.graph.output[0]
    softmax = next(n for n in model.graph.node if output.name in n.output and n.op_type == "Softmax")
    logits = softmax.input[0]
    model.graph.node.remove(softmax)
    for node in model.graph.node:
        node.output[:] = [output.name if name == logits else name for name in node.output]
        node.input[:] = [output.name if name == logits else name for name in node.input]
    onnx.save(model, str(out_path))
    return Path(out_path)


@dataclass(frozen=True)
class PreprocessOverrides:
    """Preprocessing given for a user's model; ``None`` keeps the default."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pixel_max: float | None = None
    resize: int | None = None  # short side before the centre crop (0: resize straight to the input size)


def onnx_preprocess(info: OnnxModelInfo, dataset_kind: str, image_files: bool,
                    given: PreprocessOverrides = PreprocessOverrides()) -> PreprocessCfg:
    """A user's model's preprocessing: the graph's input size, and the normalisation ``given``,
    else the usual one of the data (the digits model's for digits, ImageNet's for image files,
    none for arrays)."""
    chw = info.chw
    if dataset_kind == "digits":
        base = DIGITS_PREPROCESS
    elif image_files:
        base = IMAGENET_PREPROCESS
    else:
        base = PreprocessCfg(input_size=chw or (3, 0, 0), mean=(0.0,), std=(1.0,))
    size = chw or base.input_size
    resize = given.resize if given.resize is not None else (base.resize if size == base.input_size else None)
    return PreprocessCfg(size, given.mean or base.mean, given.std or base.std, given.pixel_max or base.pixel_max,
                         resize or None, base.interpolation)
