"""What a user's ``.onnx`` classifier takes and returns, read from the graph (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from .preprocess import METADATA_KEY, PRESETS, PreprocessCfg, preset
from .weights import ModelError

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class OnnxModelInfo:
    """What a classifier's graph declares: its one input and its ``(N, classes)`` output."""

    path: Path
    input_name: str
    input_shape: tuple[int | None, ...]  # None for symbolic dimensions
    output_name: str
    num_classes: int
    ends_in_softmax: bool  # outputs are probabilities, not logits
    preprocess_metadata: str | None = None  # what ptqcal stored at export (METADATA_KEY), if anything
    external_data: tuple[Path, ...] = ()  # files beside the model that hold its weights

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
    for value, role in ((inputs[0], "input"), (output, "output")):
        elem = value.type.tensor_type.elem_type
        if elem not in FLOAT_TYPES:
            kind = onnx.TensorProto.DataType.Name(elem) if elem else "untyped"
            raise ModelError(f"{path}: its {role} {value.name!r} holds {kind} values; ptqcal needs a float image "
                             f"input and float logits")
    external = _check_external_data(model, path)
    in_dims = _dims(inputs[0]) or ()
    producer = next((n for n in model.graph.node if output.name in n.output), None)
    return OnnxModelInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=in_dims,
        output_name=output.name,
        num_classes=out_dims[1] if out_dims else 0,
        ends_in_softmax=producer is not None and producer.op_type == "Softmax",
        preprocess_metadata=next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None),
        external_data=external,
    )


def _input_chw(info: OnnxModelInfo, size: tuple[int, ...] | None) -> tuple[int, int, int]:
    """(C, H, W) from the graph; height and width from ``size`` where the graph leaves them open."""
    shape = info.input_shape[1:]
    if len(shape) != 3 or shape[0] is None:
        raise ModelError(f"{info.path.name}: expected an (N, C, H, W) image input with a fixed number of channels, "
                         f"got shape {list(info.input_shape)}", setting="model")
    channels, height, width = shape
    if size is not None:
        given = (size[0], size[-1])
        if None not in (height, width) and (height, width) != given:
            raise ModelError(f"{info.path.name} takes {height}x{width} images, not {given[0]}x{given[1]}",
                             setting="input_size")
        height, width = given
    if height is None or width is None:
        raise ModelError(f"{info.path.name} leaves its input's height and width open (shape "
                         f"{list(info.input_shape)}): give the size its images should have", setting="input_size")
    return channels, height, width


def _check_external_data(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    """The files holding the model's external weights; they must stay inside its folder (a model
    file never makes ptqcal read a file elsewhere)."""
    folder, files = path.parent.resolve(), []
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or not target.is_relative_to(folder):
            raise ModelError(f"{path}: tensor {init.name!r} points at {location!r}, outside the model's folder")
        if not target.is_file():
            raise ModelError(f"{path}: tensor {init.name!r} is stored in {location!r}, which is missing")
        files.append(target)
    return tuple(dict.fromkeys(files))


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
    """Preprocessing given for a user's model; ``None`` keeps what the preset or the model says."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pixel_max: float | None = None
    resize: int | None = None  # short side before the centre crop (0: resize straight to the input size)
    input_size: tuple[int, ...] | None = None  # (H,) or (H, W) for a graph that leaves them open


def onnx_preprocess(info: OnnxModelInfo, given: PreprocessOverrides = PreprocessOverrides(),
                    preset_name: str | None = None) -> PreprocessCfg:
    """A user's model's preprocessing, never guessed: from a named preset, else the preprocessing
    ptqcal stored in the model's metadata when it exported it, else a mean and std given; the
    values ``given`` override. Raises :class:`ModelError` when none of them says."""
    chw = _input_chw(info, given.input_size)
    if preset_name is not None:
        base = preset(preset_name, chw)
    elif info.preprocess_metadata is not None:
        base = PreprocessCfg.from_metadata(info.preprocess_metadata, chw)
    elif given.mean is not None and given.std is not None:
        base = PreprocessCfg(chw, given.mean, given.std)
    else:
        raise ModelError(f"the preprocessing of {info.path.name} is not known (its metadata carries none): "
                         f"name a preset ({', '.join(PRESETS)}) or give the mean and std it was trained with",
                         setting="preprocess")
    chosen = replace(base, mean=base.mean if given.mean is None else given.mean,
                     std=base.std if given.std is None else given.std,
                     pixel_max=base.pixel_max if given.pixel_max is None else given.pixel_max,
                     resize=base.resize if given.resize is None else (given.resize or None))
    return chosen.check()
