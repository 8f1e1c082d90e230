"""What the user brings beyond the sweep, checked before any work, and graphs made elsewhere as
configurations of the run: the user's own quantized files
(``--quantized``) and other toolchains' quantizations of the run's model on its calibration images
(``--also``). Each is checked against the float model before any work, evaluated on the same images
with every metric, and described from its graph (:mod:`ptqcal.quantize.census`).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path


from . import steps
from .cache import Cache, file_digest, make_key
from .config import RunConfig
from .errors import UserError
from .evaluate.metrics import quantization_change
from .evaluate.record import ConfigInfo, ConfigKind
from .sweep import Sweep, add_graph, log

AGREEMENT_WARNING = 0.5  # a graph agreeing with float's top-1 on fewer images is likely another network


def user_graph(cache: Cache, cfg: RunConfig, model: steps.PreparedModel, name: str, file: Path) -> tuple[Path, Path]:
    """(the user's graph as the run serves it, a copy for the run folder): checked against the float
    model (one line when it does not fit), external weights inlined, fed the float model's input
    and read as float32 logits (a graph of codes or float16 at either end gets a QuantizeLinear,
    DequantizeLinear or Cast there; a final Softmax is cut). Cached under the bytes of the file and
    of its external weights."""
    from .evaluate.compat import check_compatible, float_io_model
    from .models import check_onnx_file

    external = check_onnx_file(file, "quantized")
    fit = check_compatible(file, model.float_path, setting="quantized")
    digest = make_key(file_digest(file), [file_digest(f) for f in external])  # the weights beside it too

    def copy(tmp: Path) -> None:  # the file as it is, or one file with its external weights inlined
        import onnx

        shutil.copyfile(file, tmp) if not external else onnx.save(onnx.load(str(file)), str(tmp))

    def serve(tmp: Path) -> None:
        import onnx

        wrapped = float_io_model(fit)
        onnx.save(wrapped if wrapped is not None else onnx.load(str(file)), str(tmp))

    stored = cache.file("user-graph", digest, "onnx", copy)
    served = cache.file("served-graph", make_key(digest, str(fit.float_input), steps.versions(steps.KEYED)), "onnx",
                        serve)
    return served, stored


def check_extra_configs(cfg: RunConfig, model: steps.PreparedModel) -> None:
    """Every ``--quantized`` file fits the float model and every ``--also`` peer can run here: said
    in one line before any calibration or evaluation."""
    from .evaluate.compat import check_compatible
    from .models import check_onnx_file

    for name, source in cfg.extra_configs().items():
        if isinstance(source, Path):
            check_onnx_file(source, "quantized")
            check_compatible(source, model.float_path, setting="quantized")
        else:
            _peer(name)


def _peer(name: str):
    """The peer named ``name``, or one line saying why it cannot run here."""
    from .quantize.peers import PEERS

    peer = PEERS.get(name)
    if peer is None:
        raise UserError(f"--also {name}: not a peer toolchain (known: {', '.join(PEERS)})")
    reason = peer.unavailable()
    if reason:
        raise UserError(f"--also {name}: {reason}")
    return peer


def peer_graph(cache: Cache, cfg: RunConfig, model: steps.PreparedModel, prepared: Path, name: str,
               pixels, batch_size: int) -> Path:
    """Peer ``name``'s quantization (:data:`ptqcal.quantize.peers.PEERS`) of the prepared model, on
    the run's calibration images (``pixels``), cached under the images, the tool and its version."""
    from .quantize import PeerError
    from .quantize.calibrate import BatchDataReader
    from .quantize.peers import run_peer
    from .versions import package_version

    peer = _peer(name)
    tools = [package_version(module) for module in peer.modules]
    key = make_key(file_digest(prepared), pixels.key, asdict(model.preprocess), batch_size, name, tools,
                   steps.versions(steps.KEYED))

    def quantize(tmp: Path) -> None:
        reader = BatchDataReader(model.input_name, lambda: pixels.batches(batch_size, model.preprocess),
                                 -(-len(pixels) // batch_size))
        try:
            run_peer(name, prepared, reader, tmp)
        except PeerError as exc:
            raise UserError(f"--also {name}: {exc}") from None

    return cache.file("peer", key, "onnx", quantize)


def census_note(name: str, path: Path, where: str) -> str:
    """What the graph at ``path`` is, read from it, as one report note."""
    from .quantize.census import census_lines, graph_census

    return f"{name} ({where}): " + " ".join(census_lines(graph_census(path)))


def add_deployed(cfg: RunConfig, model: steps.PreparedModel, prepared: Path, images, batches: steps.Batches,
                 cache: Cache, sweep: Sweep) -> None:
    """Every ``--quantized`` file and ``--also`` peer as a configuration of ``sweep``, and what
    each is into its notes."""
    from .quantize.census import graph_census

    notes = sweep.notes
    for name, source in cfg.extra_configs().items():
        if isinstance(source, Path):
            served, copy = user_graph(cache, cfg, model, name, source)
            kind, where = ConfigKind.EXTERNAL, f"your graph {source.name}"
        else:
            served = copy = peer_graph(cache, cfg, model, prepared, name, images.calib, batches.calib)
            kind, where = ConfigKind.PEER, f"{name} on the run's {len(images.calib)} calibration images"
        census = graph_census(copy)
        add_graph(cfg, model, name, served, copy, images.eval, batches, cache, sweep,
                  ConfigInfo(name, kind), census.simulated_twin)
        notes.append(census_note(name, copy, where))
        if not census.simulated_twin:
            notes.append(f"{name}: no deployed-vs-simulated check (its graph is {census.format}, which has no "
                         "float twin between Q/DQ pairs to compare with).")
        if census.format == "dynamic":
            notes.append(f"{name} quantizes its activations per batch (dynamic quantization): its predictions depend "
                         f"on the batch they are run in ({batches.eval} images here).")
        # the share of top-1 predictions it keeps, counted where every swap is counted
        agreement = 1 - quantization_change(sweep.logits["float"], sweep.logits[name], images.eval.labels).swap_rate
        if agreement < AGREEMENT_WARNING:
            notes.append(f"Warning: {name} agrees with the float model's top-1 on only {agreement:.0%} of the "
                         "images: is it a quantization of the same network, fed the same preprocessing?")
            log(cfg, f"warning: {name} agrees with float on only {agreement:.0%} of the images")


def check_inputs(cfg: RunConfig, model: steps.PreparedModel, images: steps.Images) -> None:
    """What the user gave that cannot work is said now, before any work: images of another size than
    the model's, a graph that does not fit the float model, a peer that cannot run here."""
    for pixels in (images.eval, images.calib):
        steps.normalise(model.preprocess, pixels.head(1))
    if cfg.quantized or cfg.also:
        check_extra_configs(cfg, model)


def recorded_settings(cfg: RunConfig) -> dict:
    """The run's settings as recorded, with the digest of a user's model file: the file may change
    in place later, the record says which bytes were evaluated."""
    return {**cfg.to_dict(), **({"model_sha256": file_digest(cfg.model)} if cfg.is_onnx_file else {})}
