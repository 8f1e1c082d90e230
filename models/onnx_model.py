"""What a user's ``.onnx`` classifier takes and returns, read from the graph (no torch)."""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import onnx

from .preprocess import LAYOUTS, METADATA_KEY, PRESETS, PreprocessCfg, preset
from .weights import ModelError

# float64 graphs are refused: ONNX Runtime has no float64 kernels for most ops (Conv) and quantizes float32
FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
INPUT_TYPES = {**FLOAT_TYPES, onnx.TensorProto.UINT8: "uint8"}  # uint8: raw pixels, normalised in the graph
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training")
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


def check_onnx_file(path: str | Path, setting: str | None = None) -> tuple[Path, ...]:
    """Any ONNX graph a user brings (a quantized one too: integer inputs and outputs are the caller's
    to read): a readable model whose IR version, opsets and operators the installed onnx and ONNX
    Runtime know, whose external weights stay in its folder; returns the files holding them."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", setting=setting)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError or a protobuf error
        raise ModelError(f"{path} is not an ONNX model ({type(exc).__name__})", setting=setting) from exc
    if not model.graph.node:
        raise ModelError(f"{path} is not an ONNX model (no graph nodes)", setting=setting)
    _check_versions_and_ops(model, path)
    return _check_external_data(model, path)


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
    _check_versions_and_ops(model, path)  # before ONNX Runtime sees it: it would print its own log first
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelError(f"{path}: expected one image input and one output, found "
                        f"{len(inputs)} inputs and {len(model.graph.output)} outputs")
    output = model.graph.output[0]
    for value, role, types in ((inputs[0], "input", INPUT_TYPES), (output, "output", FLOAT_TYPES)):
        elem = value.type.tensor_type.elem_type
        if elem == onnx.TensorProto.DOUBLE:
            raise ModelError(f"{path}: its {role} {value.name!r} holds float64 values; ONNX Runtime runs and "
                             "quantizes float32 (or float16) classifiers: convert the model to float32")
        if elem not in types:
            kind = onnx.TensorProto.DataType.Name(elem) if elem else "untyped"
            raise ModelError(f"{path}: its {role} {value.name!r} holds {kind} values; ptqcal needs a float or "
                             f"uint8 image input and float logits")
    num_classes = _output_classes(model, output, path)
    external = _check_external_data(model, path)
    in_dims = _dims(inputs[0]) or ()
    producer = next((n for n in model.graph.node if output.name in n.output), None)
    return OnnxModelInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=in_dims,
        input_type=INPUT_TYPES[inputs[0].type.tensor_type.elem_type],
        output_name=output.name,
        num_classes=num_classes,
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


def _output_classes(model: onnx.ModelProto, output: onnx.ValueInfoProto, path: Path) -> int:
    """The class count of an ``(N, classes)`` output, as declared or, where the graph does not say,
    as ONNX's shape inference finds it; never guessed."""
    out_dims = _dims(output)
    if out_dims is None or (len(out_dims) == 2 and out_dims[1] is None):
        out_dims = _inferred_dims(model, output.name) or out_dims
    if out_dims is None:
        raise ModelError(f"{path}: its output {output.name!r} declares no shape, so the model's output class count "
                         "is unknown (and ONNX's shape inference cannot tell it): declare the output as "
                         "(N, classes)")
    if len(out_dims) != 2 or out_dims[1] is None:
        raise ModelError(f"{path}: output {output.name!r} has shape {list(out_dims)}, expected (N, classes)"
                         + (": the model's output class count is unknown" if len(out_dims) == 2 else ""))
    if out_dims[1] < 1:
        raise ModelError(f"{path}: output {output.name!r} has shape {list(out_dims)}: no classes")
    return out_dims[1]


def _inferred_dims(model: onnx.ModelProto, name: str) -> tuple[int | None, ...] | None:
    """The shape ONNX's shape inference gives graph output ``name``, when the graph does not say it."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a help here, never a requirement
        return None
    found = [v for v in (*inferred.graph.output, *inferred.graph.value_info) if v.name == name]
    dims = [d for d in (_dims(v) for v in found) if d is not None]
    return next((d for d in dims if None not in d), dims[0] if dims else None)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If, Loop, Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _graphs(sub)


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor the model stores: initializers (sparse too) and node attributes (a Constant's
    value), in the main graph, every subgraph and every function."""
    bodies = [*_graphs(model.graph), *model.functions]
    for body in bodies:
        for init in getattr(body, "initializer", ()):
            yield init.name, init
        for sparse in getattr(body, "sparse_initializer", ()):
            yield sparse.values.name, sparse.values
            yield sparse.indices.name, sparse.indices
        for node in body.node:
            for attribute in node.attribute:
                tensors = ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
                for sparse in ([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []) + \
                        list(attribute.sparse_tensors):
                    tensors += [sparse.values, sparse.indices]
                for tensor in tensors:
                    yield tensor.name or f"{node.op_type} {node.name!r}".strip(), tensor


def _check_external_data(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    """The files holding the model's external weights; they must stay inside its folder (a model
    file never makes ptqcal read a file elsewhere), be regular files reached without a symbolic link
    (ONNX refuses to follow one) and hold the bytes the model says."""
    folder, files = path.parent.resolve(), []
    for name, tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or "\x00" in location or not target.is_relative_to(folder):
            raise ModelError(f"{path}: tensor {name!r} points at {location!r}, outside the model's folder")
        step = folder
        for part in Path(location).parts:
            step = step / part
            try:
                mode = os.lstat(step).st_mode
            except OSError:
                raise ModelError(f"{path}: tensor {name!r} is stored in {location!r}, which is missing") from None
            if stat.S_ISLNK(mode):
                raise ModelError(f"{path}: tensor {name!r} is stored in {location!r}, reached through a symbolic "
                                 "link, which ONNX refuses to follow: put the file itself beside the model")
        if not stat.S_ISREG(os.stat(target).st_mode):
            raise ModelError(f"{path}: tensor {name!r} is stored in {location!r}, which is not a regular file")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise ModelError(f"{path}: tensor {name!r} has an unreadable offset or length") from None
        if offset < 0 or length < 0 or offset + length > target.stat().st_size:
            raise ModelError(f"{path}: tensor {name!r} lies beyond the end of {location!r}")
        files.append(target)
    return tuple(dict.fromkeys(files))


@functools.lru_cache(maxsize=1)
def _known_ops() -> tuple[frozenset[tuple[str, str]], dict[str, int]]:
    """The (domain, op) pairs ONNX Runtime (or, without it, ONNX) knows, and the newest opset of each
    standard domain the installed onnx defines."""
    newest = {"": onnx.defs.onnx_opset_version()}
    ops = set()
    for schema in onnx.defs.get_all_schemas_with_history():
        ops.add((schema.domain, schema.name))
        if schema.domain:
            newest[schema.domain] = max(newest.get(schema.domain, 0), schema.since_version)
    try:
        from onnxruntime.capi import _pybind_state

        ops |= {(schema.domain, schema.name) for schema in _pybind_state.get_all_operator_schema()}
    except Exception:  # noqa: BLE001 - an ORT without its schema list: the ONNX operators only
        pass
    return frozenset(ops), newest


def _check_versions_and_ops(model: onnx.ModelProto, path: Path) -> None:
    """The IR version, the opsets and every operator (subgraphs included) must be ones the installed
    onnx and ONNX Runtime know: a custom op's library, a newer format or an unreleased opset is said
    in one line here, before ONNX Runtime prints its own log."""
    if model.ir_version < 3:  # ONNX 1.0's; ONNX Runtime reads nothing older
        raise ModelError(f"{path}: it declares IR version {model.ir_version}, which no ONNX release writes (3 or "
                         "newer); it is damaged, or not an ONNX model")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"{path}: its IR version {model.ir_version} is newer than the installed onnx reads "
                         f"(up to {onnx.IR_VERSION}): update onnx and onnxruntime, or export it for an older one")
    ops, newest = _known_ops()
    imported = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        imported[domain] = opset.version
        if domain in newest and opset.version > newest[domain]:
            raise ModelError(f"{path}: it uses opset {opset.version} of {domain or 'ai.onnx'}, newer than the "
                             f"installed onnx and ONNX Runtime support (up to {newest[domain]}): export it for opset "
                             f"{newest[domain]} or lower")
    functions = {(f.domain, f.name) for f in model.functions}
    for graph in _graphs(model.graph):
        for node in graph.node:
            domain = "" if node.domain == "ai.onnx" else node.domain
            if (domain, node.op_type) in functions:
                continue
            who = f"node {node.name!r}" if node.name else "a node"
            what = f"{path}: {who} uses operator {node.op_type!r}" + (f" of domain {domain!r}" if domain else "")
            if domain not in imported:
                raise ModelError(f"{what}, a domain the model does not import")
            if (domain, node.op_type) not in ops:
                raise ModelError(f"{what}, which ONNX Runtime does not know (a custom operator needs its own "
                                 "library, which ptqcal does not load)")
            if domain in STANDARD_DOMAINS and not onnx.defs.has(node.op_type, imported[domain], domain):
                raise ModelError(f"{what}, which opset {imported[domain]} of {domain or 'ai.onnx'} does not have")


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
