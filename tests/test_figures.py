"""The report's figures: names drawn as they are, degenerate runs drawn or replaced by a sentence,
labels that do not run into each other, every configuration in Figure 6, and the figures in the
order of their numbers. Runs are made here (no model is run)."""

import re

import matplotlib.text
import numpy as np
import pytest

from ptqcal.analysis import analyse_record
from ptqcal.analysis.deploy_figures import DeploymentPoints, ParetoPoints, plot_deployment, plot_pareto
from ptqcal.analysis.figures import MarginCurves, plot_margin
from ptqcal.analysis.report_figures import FIGURES, figure_sections, write_figures
from ptqcal.evaluate.attribution import Attribution, LayerEffect
from ptqcal.evaluate.deploy import Deployment
from ptqcal.evaluate.record import ConfigInfo, ConfigKind, RunRecord

MATH = ("a$b$c", "$\\alpha$", "$\\undefined{$")  # names matplotlib would parse as mathtext (the last fails)


def _record(model="digits", n=600, classes=10, seed=0, quantized=None, identical=False, **extra) -> RunRecord:
    """A run with a float model and ``quantized`` (name -> (kind, logit noise)), every one sized
    and timed."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 4 * np.eye(classes)[labels] * rng.uniform(0, 1.5, (n, 1))
    if identical:  # n copies of one image
        labels, logits = np.full(n, labels[0]), np.repeat(logits[:1], n, axis=0)
    quantized = quantized if quantized is not None else {"a8w8": ("uniform", 0.05), "a8w4": ("uniform", 0.8)}
    arrays = {"float": logits.astype(np.float32)}
    descriptors = {"float": ConfigInfo("float", ConfigKind.FLOAT)}
    for name, (kind, noise) in quantized.items():
        arrays[name] = (logits + rng.normal(0, noise, (1 if identical else n, classes))).astype(np.float32)
        bits = (8, 8) if kind == "uniform" else (None, None)
        descriptors[name] = ConfigInfo(name, ConfigKind(kind), *bits)
    deployment = {name: Deployment(1000 + i, 800 - 100 * i, 1, 32, 1.0, 1.2, 5000.0 + 1000 * i)
                  for i, name in enumerate(arrays)}
    return RunRecord(model, labels, arrays, labels[:200], logits[:200].astype(np.float32),
                     descriptors=descriptors, deployment=deployment, **extra)


def _texts(fig) -> list[str]:
    fig.draw_without_rendering()
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def test_names_that_look_like_mathtext_are_drawn_as_they_are(tmp_path):
    effects = [LayerEffect(layer, bits, 0.1, 0.05 * i, 0.01, 30.0 - bits)
               for i, layer in enumerate(MATH) for bits in (8, 4)]
    record = _record(model=MATH[0], quantized={MATH[1]: ("uniform", 0.8), MATH[0]: ("peer", 0.3)},
                     attribution=Attribution(effects, 600, 300))
    written = write_figures([analyse_record(record)], tmp_path)
    assert "fig7_layers" in written and "fig6_deployment" in written
    for key in written:
        svg = (tmp_path / f"{key}.svg").read_text()
        assert MATH[0] in svg, key  # the model's name, in every figure's title
    for key in ("fig2_swaps", "fig6_deployment", "fig7_layers"):
        assert MATH[1] in (tmp_path / f"{key}.svg").read_text(), key


def test_identical_images_give_one_margin_bin_and_every_figure(tmp_path):
    record = _record(n=1000, identical=True, quantized={"a8w8": ("uniform", 0.0), "a8w4": ("uniform", 3.0)})
    run = analyse_record(record)
    curves = MarginCurves.from_run(run)
    assert [len(c) for c in curves.centers] == [len(p) for p in curves.probability] == [1, 1]
    assert "one bin" in " ".join(_texts(plot_margin([curves])))
    assert "fig4_margin" in write_figures([run], tmp_path)


def _attributed(confident_swapped: float) -> RunRecord:
    effects = [LayerEffect(layer, bits, 0.01, confident_swapped, 0.0, 40.0)
               for layer in ("conv1", "fc") for bits in (8, 4)]
    return _record(attribution=Attribution(effects, 300, 120))


def test_layer_map_without_confident_flips_is_a_sentence(tmp_path):
    run = analyse_record(_attributed(0.0))
    written = write_figures([run], tmp_path)
    assert "fig7_layers" not in written and not (tmp_path / "fig7_layers.png").exists()
    sections = figure_sections([run], written)
    heading = f"## {FIGURES['fig7_layers'][0]}"
    sentence = sections[sections.index(heading) + 1]
    assert "no weight layer quantized alone swapped" in sentence and "120" in sentence
    assert not any("fig7_layers.png" in part for part in sections)
    (tmp_path / "flips").mkdir()
    assert "fig7_layers" in write_figures([analyse_record(_attributed(0.25))], tmp_path / "flips")


def test_points_on_one_spot_keep_a_label_each_and_are_set_apart():
    names = ["float", "a8w8", "a8w7", "a8w6", "mixed"]
    points = ParetoPoints("m", names, [4000, 1000, 1000, 1000, 1100], [0.0, 0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.001, 0.001, 0.001, 0.001], "mixed")
    fig = plot_pareto([points])
    texts = _texts(fig)
    assert not [t for t in texts if " = " in t or sum(name in t for name in names) > 1]
    for name in names:
        assert name in texts
    axis = fig.axes[1]
    spots = [tuple(np.round(c.get_offset_transform().transform(c.get_offsets())[0], 1)) for c in axis.collections]
    assert len(set(spots)) == len(names)  # no marker on top of another


def test_what_to_ship_has_every_configuration_with_its_kind():
    record = _record(quantized={"a8w8": ("uniform", 0.05), "mine": ("external", 0.2), "ort-qdq": ("peer", 0.3)})
    points = DeploymentPoints.from_run(analyse_record(record), 0.9)
    assert points.configs == ["float", "a8w8", "mine", "ort-qdq"]
    assert points.kinds == ["float", "uniform", "external", "peer"]
    assert np.isfinite(points.confident_swapped).all()
    texts = _texts(plot_deployment([points]))
    assert {"float", "a8w8", "mine (yours)", "ort-qdq (peer)"} <= set(texts)
    assert any("confident" in t for t in texts)


def test_count_labels_of_figure_1_do_not_overlap(tmp_path):
    run = analyse_record(_record(n=6000, seed=3))
    from ptqcal.analysis.report_figures import _reliability

    fig = _reliability([run])
    fig.draw_without_rendering()
    renderer = fig._get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) > 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_temperature_follows_figure_1s_precision(tmp_path):
    record = _record(quantized={"a8w8": ("uniform", 0.3), "a8w2": ("uniform", 0.0)})
    record.logits["a8w2"] = np.roll(record.logits["float"], 1, axis=1)  # collapsed: every prediction moves
    from ptqcal.analysis.report_figures import _temperature

    texts = _texts(_temperature([analyse_record(record)]))
    assert any("a8w8 swapped" in t for t in texts) and not any("a8w2 swapped" in t for t in texts)


def test_figures_are_written_and_placed_in_the_order_of_their_numbers(tmp_path):
    run = analyse_record(_attributed(0.25))
    written = write_figures([run], tmp_path)
    numbers = [int(re.match(r"fig(\d+)_", key).group(1)) for key in written]
    assert numbers == sorted(numbers) and 5 in numbers and 6 in numbers and 7 in numbers
    headings = [p for p in figure_sections([run], written) if p.startswith("## Figure")]
    assert [int(re.search(r"Figure (\d+)", h).group(1)) for h in headings] == numbers


@pytest.mark.parametrize("name", MATH)
def test_plain_escapes_every_dollar(name):
    from ptqcal.analysis.figures import plain

    assert plain(name).count("$") == plain(name).count("\\$") == name.count("$")
