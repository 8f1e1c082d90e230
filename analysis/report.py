"""``report.md`` and a self-contained ``report.html`` for one or several runs: the composition.

This module only orders the parts; each is made where its job is: rows and files in
:mod:`.rows`, tables in :mod:`.tables`, judging sentences in :mod:`.judgement`, figures in
:mod:`.report_figures`, the environment in :mod:`.environment`, HTML in :mod:`.markdown`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ptqcal.atomic import atomic_path
from ptqcal.evaluate.results import FLOAT_NAME

from .environment import environment
from .judgement import guard_note, guard_reading, sweep_reading
from .markdown import markdown_to_html, md
from .recommend import RECOMMENDATION_FILE, Recommendation, recommend, recommendation_json, recommendation_lines
from .report_figures import FIGURES, figure_sections, write_figures
from .run_analysis import TEMPERATURE_MIN_IMAGES, RunAnalysis, analyse_run
from .rows import layers_csv, metrics_csv, metrics_json
from .shift_tables import shift_section
from .tables import (attribution_table, comparison, confidence_table, deployment_table, guard_table, markdown_table,
                     markdown_tables, mixed_section, selective_table)
from .trust import GUARD_FILE, guard_json

__all__ = ["build_report", "markdown_table", "metrics_csv", "metrics_json", "report_markdown"]


def _trust_section(run: RunAnalysis) -> list[str]:
    """Selective prediction of every configuration; then each quantized one's float fallback guard."""
    parts = ["### When to trust the quantized model", *selective_table(run)]
    if run.quantized:
        parts += [*guard_table(run), guard_reading(run), guard_note(run)]
    return parts


def temperature_note(run: RunAnalysis) -> str:
    """What a run without a temperature leaves out, and why."""
    if run.temperature is not None:
        return ""
    return (f"No temperature scaling: {len(run.labels)} evaluation images are fewer than the "
            f"{TEMPERATURE_MIN_IMAGES} a cross-fitted temperature needs (each half fits one), so the tables have no "
            "\"ECE after T\" column and Figure 5 leaves this model out.")


def _figure_gaps(runs: Sequence[RunAnalysis]) -> dict[str, str]:
    """Why each figure a report may leave out would be left out of these runs (whole or in part)."""
    quantized = [r for r in runs if r.quantized]
    none = "no run has a configuration besides the float model"
    cool = [md(r.name) for r in quantized if r.temperature is None]
    untimed = [md(r.name) for r in quantized
               if not any(d.throughput is not None for n, d in r.record.deployment.items() if n != FLOAT_NAME)]
    gaps = {key: none for key in ("fig2_swaps", "fig3_transitions", "fig4_margin")} if not quantized else {}
    if cool or not quantized:
        gaps["fig5_temperature"] = (f"{', '.join(cool)}: fewer than {TEMPERATURE_MIN_IMAGES} evaluation images, so no "
                                    "temperature" if cool else none)
    if untimed or not quantized:
        gaps["fig6_deployment"] = f"{', '.join(untimed)}: not timed" if untimed else none
    if not any(r.record.attribution and r.record.attribution.effects for r in runs):
        gaps["fig7_layers"] = "it needs a layer attribution (each weight layer quantized alone)"
    if not any(r.record.mixed for r in quantized):
        gaps["fig8_pareto"] = "it needs a mixed-precision target (on confident swaps or on the weights' size)"
    gaps.update(_shift_gaps(runs))
    if not any(r.guards for r in runs):
        gaps["fig10_guard"] = "no run has a float fallback guard (each section says why)"
    else:
        gaps["fig10_guard"] = "no guarded configuration swapped a prediction"
    return gaps


def _shift_gaps(runs: Sequence[RunAnalysis]) -> dict[str, str]:
    """Why Figures 11 and 12 would be left out, or left without some run."""
    plain = [md(r.name) for r in runs if not r.shift]
    if len(plain) == len(runs):
        return dict.fromkeys(("fig11_shift", "fig12_shift_confidence"), "no run was evaluated on corrupted images")
    gaps = {"fig11_shift": f"{', '.join(plain)}: not evaluated on corrupted images"} if plain else {}
    if not any(cell.quantized for r in runs for cell in r.shift):
        gaps["fig12_shift_confidence"] = "no quantized configuration was evaluated on corrupted images"
    elif plain:
        gaps["fig12_shift_confidence"] = gaps["fig11_shift"]
    return gaps


def left_out_figures(runs: Sequence[RunAnalysis], figures: dict[str, str]) -> str:
    """One paragraph naming each figure left out of the report, or left without some run, and why."""
    said = []
    for key, why in _figure_gaps(runs).items():
        number = FIGURES[key][0].split(" — ")[0]
        if key not in figures and not (key == "fig7_layers" and any(r.record.attribution for r in runs)):
            said.append(f"{number}: {why}")
        elif key in figures and key in ("fig5_temperature", "fig6_deployment", "fig11_shift",
                                        "fig12_shift_confidence") and ":" in why:
            said.append(f"{number} leaves out {why}")
    return "**Figures left out**: " + "; ".join(said) + "." if said else ""


def _run_section(run: RunAnalysis, recommendation: Recommendation | None = None) -> list[str]:
    """A model's section: what to ship first, then the run's settings, tables, notes and trust."""
    info = run.record.summary
    lines = [f"## {md(run.name)}", *(recommendation_lines(recommendation) if recommendation else []),
             "\n".join(f"- **{md(k)}**: {md(v)}" for k, v in info.items())]
    if run.halves is not None:
        lines.append(f"- **temperature**: {run.halves[0]:.3f} and {run.halves[1]:.3f}, each fitted on the float "
                     "model's logits of one seeded half of the evaluation images and applied to the other half "
                     "(never fitted on the images it is judged on)")
    lines += [temperature_note(run),
              "Errors, ECE and confidences in %, NLL in nats. Brackets: bootstrap 95% interval over evaluation "
              "images; ± : std over calibration repeats.",
              *markdown_tables(run), sweep_reading(run), confidence_table(run), *deployment_table(run),
              *attribution_table(run), *mixed_section(run)]
    if run.notes:
        lines.append("\n".join(f"- {md(note)}" for note in run.notes))
    # the trust section weighs the swaps above against the latencies; under shift comes last, as
    # it revisits every part (swaps, calibration, the guard) on corrupted images
    return lines + _trust_section(run) + shift_section(run)


def report_markdown(runs: Sequence[RunAnalysis], figures: dict[str, str],
                    recommendations: Sequence[Recommendation] | None = None) -> str:
    """The whole report as Markdown, with ``figures`` (name -> PNG file name) embedded by name and
    each run's recommendation (:func:`~.recommend.recommend`, computed when not given) at the top
    of its section."""
    title = " vs ".join(md(r.name) for r in runs)
    recommendations = list(recommendations) if recommendations is not None else [recommend(r) for r in runs]
    parts = [f"# ptqcal report: {title}", *comparison(runs)]
    for run, recommendation in zip(runs, recommendations):
        parts += _run_section(run, recommendation)
    parts += [*figure_sections(runs, figures), left_out_figures(runs, figures)]
    parts += ["## Environment", "\n".join(f"- **{k}**: {md(v)}" for k, v in environment().items())]
    return "\n\n".join(p for p in parts if p) + "\n"


def build_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Analyse saved runs and write metrics, figures (PNG + SVG), report.md, report.html,
    ``recommendation.json`` (its format: :mod:`.recommend`) and, when a run has float fallback
    guards, ``guard.json`` (its format: :mod:`.trust`).

    Needs only the run folders' ``logits.npz`` and ``run.json``: no model is run, and neither
    onnxruntime nor torch is imported.
    """
    out = Path(out)
    runs = [analyse_run(folder) for folder in run_dirs]  # a wrong folder fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(runs, out)
    recommendations = [recommend(run) for run in runs]
    for name, text in (("metrics.csv", metrics_csv(runs)), ("metrics.json", metrics_json(runs)),
                       ("layers.csv", layers_csv(runs)), (GUARD_FILE, guard_json(runs)),
                       (RECOMMENDATION_FILE, recommendation_json(recommendations))):
        if text is None:
            continue
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    markdown = report_markdown(runs, figures, recommendations)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(markdown_to_html(markdown, {file: (out / file).read_bytes() for file in figures.values()}))
    return out / "report.md"
