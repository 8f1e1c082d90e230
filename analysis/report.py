"""``report.md`` and a self-contained ``report.html`` for one or several runs: the composition.

This module only orders the parts; each is made where its job is: rows and files in
:mod:`.rows`, tables in :mod:`.tables`, judging sentences in :mod:`.judgement`, figures in
:mod:`.report_figures`, the environment in :mod:`.environment`, HTML in :mod:`.markdown`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ptqcal.atomic import atomic_path

from .environment import environment
from .judgement import guard_note, guard_reading, sweep_reading
from .markdown import markdown_to_html, md
from .report_figures import FIGURES, figure_reading, write_figures
from .run_analysis import RunAnalysis, analyse_run
from .rows import layers_csv, metrics_csv, metrics_json
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


def _run_section(run: RunAnalysis) -> list[str]:
    info = run.record.summary
    lines = [f"## {md(run.name)}", "\n".join(f"- **{md(k)}**: {md(v)}" for k, v in info.items())]
    if run.halves is not None:
        lines.append(f"- **temperature**: {run.halves[0]:.3f} and {run.halves[1]:.3f}, each fitted on the float "
                     "model's logits of one seeded half of the evaluation images and applied to the other half "
                     "(never fitted on the images it is judged on)")
    lines += ["Errors, ECE and confidences in %, NLL in nats. Brackets: bootstrap 95% interval over evaluation "
              "images; ± : std over calibration repeats.",
              *markdown_tables(run), sweep_reading(run), confidence_table(run), *deployment_table(run),
              *attribution_table(run), *mixed_section(run)]
    if run.notes:
        lines.append("\n".join(f"- {md(note)}" for note in run.notes))
    return lines + _trust_section(run)  # last: it weighs the swaps above against the latencies


def report_markdown(runs: Sequence[RunAnalysis], figures: dict[str, str]) -> str:
    """The whole report as Markdown, with ``figures`` (name -> PNG file name) embedded by name."""
    title = " vs ".join(md(r.name) for r in runs)
    parts = [f"# ptqcal report: {title}", *comparison(runs)]
    for run in runs:
        parts += _run_section(run)
    for key, file in figures.items():
        heading = FIGURES[key][0]
        parts += [f"## {heading}", figure_reading(key, runs), f"![{heading}]({file})"]
    parts += ["## Environment", "\n".join(f"- **{k}**: {md(v)}" for k, v in environment().items())]
    return "\n\n".join(p for p in parts if p) + "\n"


def build_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Analyse saved runs and write metrics, figures (PNG + SVG), report.md, report.html and, when a
    run has float fallback guards, ``guard.json`` (its format: :mod:`.trust`).

    Needs only the run folders' ``logits.npz`` and ``run.json``: no model is run, and neither
    onnxruntime nor torch is imported.
    """
    out = Path(out)
    runs = [analyse_run(folder) for folder in run_dirs]  # a wrong folder fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(runs, out)
    for name, text in (("metrics.csv", metrics_csv(runs)), ("metrics.json", metrics_json(runs)),
                       ("layers.csv", layers_csv(runs)), (GUARD_FILE, guard_json(runs))):
        if text is None:
            continue
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    markdown = report_markdown(runs, figures)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(markdown_to_html(markdown, {file: (out / file).read_bytes() for file in figures.values()}))
    return out / "report.md"
