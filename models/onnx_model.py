"""What a user's ``.onnx`` classifier takes and returns, read from the graph (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from .preprocess import LAYOUTS, METADATA_KEY, PRESETS, PreprocessCfg, preset
from .weights import ModelError

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.DOUBLE: "float64"}
INPUT_TYPES = {**FLOAT_TYPES, onnx.TensorProto.UINT8: "uint8"}  # uint8: raw pixels, normalised in the graph
IMAGE_CHANNELS = (1, 3)


@dataclass(frozen=True)
class OnnxModelInfo:
    """What a classifier's graph declares: its one input and its ``(N, classes)`` output."""

    path: Path
    input_name: str
    input_shape: tuple[int | None, ...]  # None for symbolic dimensions
    input_type: str  # numpy name of the input's element type (float32, float16, float64, uint8)
    output_name: str
    num_classes: int
    ends_in_softmax: bool  # outputs are probabilities, not logits
    preprocess_metadata: str | None = None  # what ptqcal stored at export (METADATA_KEY), if anything
    external_data: tuple[Path, ...] = ()  # files beside the model that hold its weights

    @property
    def layout(self) -> str | None:
        """``NCHW`` or ``NHWC`` as the input's shape shows it (the channels are the dimension that
        is 1 or 3 while the other candidate is not); ``None`` when the shape cannot tell."""
        if len(self.input_shape) != 4:
            return None
        first, last = (d in IMAGE_CHANNELS for d in (self.input_shape[1], self.input_shape[3]))
        return None if first == last else "NCHW" if first else "NHWC"


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
    for value, role, types in ((inputs[0], "input", INPUT_TYPES), (output, "output", FLOAT_TYPES)):
        elem = value.type.tensor_type.elem_type
        if elem not in types:
            kind = onnx.TensorProto.DataType.Name(elem) if elem else "untyped"
            raise ModelError(f"{path}: its {role} {value.name!r} holds {kind} values; ptqcal needs a float or "
                             f"uint8 image input and float logits")
    external = _check_external_data(model, path)
    in_dims = _dims(inputs[0]) or ()
    producer = next((n for n in model.graph.node if output.name in n.output), None)
    return OnnxModelInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=in_dims,
        input_type=INPUT_TYPES[inputs[0].type.tensor_type.elem_type],
        output_name=output.name,
        num_classes=out_dims[1] if out_dims else 0,
        ends_in_softmax=producer is not None and producer.op_type == "Softmax",
        preprocess_metadata=next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None),
        external_data=external,
    )


def _input_chw(info: OnnxModelInfo, size: tuple[int, ...] | None,
               layout: str | None = None) -> tuple[tuple[int, int, int], str]:
    """(C, H, W) and the layout from the graph; height and width from ``size`` where the graph
    leaves them open, the layout from ``layout`` where its shape cannot tell."""
    if len(info.input_shape) != 4:
        raise ModelError(f"{info.path.name}: expected an image input of rank 4 (N, C, H, W or N, H, W, C), got shape "
                         f"{list(info.input_shape)}", setting="model")
    layout = layout or info.layout
    if layout is None and info.input_shape[1] in IMAGE_CHANNELS:  # both ends could be the channels
        raise ModelError(f"{info.path.name}: its input shape {list(info.input_shape)} does not tell where the "
                         f"channels are; give the layout ({' or '.join(LAYOUTS)})", setting="layout")
    if layout is None:
        raise ModelError(f"{info.path.name}: its input shape {list(info.input_shape)} has no dimension of 1 or 3 "
                         "channels first or last; ptqcal feeds RGB (3) or grayscale (1) images", setting="model")
    if layout == "NCHW":
        channels, height, width = info.input_shape[1:]
    else:
        height, width, channels = info.input_shape[1:]
    if channels not in IMAGE_CHANNELS:
        raise ModelError(f"{info.path.name}: in {layout} its input shape {list(info.input_shape)} has "
                         f"{'an open number of' if channels is None else channels} channels; ptqcal feeds RGB (3) "
                         "or grayscale (1) images", setting="layout")
    if size is not None:
        given = (size[0], size[-1])
        if None not in (height, width) and (height, width) != given:
            raise ModelError(f"{info.path.name} takes {height}x{width} images, not {given[0]}x{given[1]}",
                             setting="input_size")
        height, width = given
    if height is None or width is None:
        raise ModelError(f"{info.path.name} leaves its input's height and width open (shape "
                         f"{list(info.input_shape)}): give the size its images should have", setting="input_size")
    return (channels, height, width), layout


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
    layout: str | None = None  # NCHW or NHWC, for a graph whose input shape does not tell


def onnx_preprocess(info: OnnxModelInfo, given: PreprocessOverrides = PreprocessOverrides(),
                    preset_name: str | None = None) -> PreprocessCfg:
    """A user's model's preprocessing, never guessed: from a named preset, else the preprocessing
    ptqcal stored in the model's metadata when it exported it, else a mean and std given; the
    values ``given`` override. A ``uint8`` input normalises inside its graph: it needs only how
    images are resized (a preset, the metadata or ``resize``). Raises :class:`ModelError` when
    nothing says."""
    chw, layout = _input_chw(info, given.input_size, given.layout)
    pixels = info.input_type == "uint8"
    if pixels:
        _check_no_normalisation(info, given)
    if preset_name is not None:
        base = preset(preset_name, chw)
    elif info.preprocess_metadata is not None:
        base = PreprocessCfg.from_metadata(info.preprocess_metadata, chw)
    elif pixels and given.resize is not None:
        base = PreprocessCfg(chw, (0.0,), (1.0,), pixel_max=1.0)
    elif not pixels and given.mean is not None and given.std is not None:
        base = PreprocessCfg(chw, given.mean, given.std)
    elif pixels:
        raise ModelError(f"{info.path.name} takes uint8 pixels and normalises them inside its graph; how should "
                         f"images be resized to {chw[1]}x{chw[2]}? name a preset ({', '.join(PRESETS)}) or give the "
                         "short side before the centre crop (0: resize straight)", setting="resize")
    else:
        raise ModelError(f"the preprocessing of {info.path.name} is not known (its metadata carries none): "
                         f"name a preset ({', '.join(PRESETS)}) or give the mean and std it was trained with",
                         setting="preprocess")
    chosen = replace(base, mean=base.mean if given.mean is None else given.mean,
                     std=base.std if given.std is None else given.std,
                     pixel_max=base.pixel_max if given.pixel_max is None else given.pixel_max,
                     resize=base.resize if given.resize is None else (given.resize or None),
                     layout=layout, dtype=info.input_type)
    return chosen.check()


def _check_no_normalisation(info: OnnxModelInfo, given: PreprocessOverrides) -> None:
    """Normalisation constants for a model that normalises inside its graph would be ignored:
    refused rather than dropped silently."""
    for name in ("mean", "std", "pixel_max"):
        if getattr(given, name) is not None:
            raise ModelError(f"{info.path.name} takes uint8 pixels and normalises them inside its graph: a "
                             f"{name.replace('_', ' ')} does not apply to it", setting=name)
