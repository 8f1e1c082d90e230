"""Tables and the Markdown report of one run."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ptqcal.evaluate import ConfigResult

COLUMNS = [
    ("config", "config", "{}"),
    ("top1_error", "top-1 err %", "{:.2f}"),
    ("top5_error", "top-5 err %", "{:.2f}"),
    ("nll", "NLL", "{:.4f}"),
    ("ece", "ECE %", "{:.2f}"),
    ("mean_confidence", "mean conf %", "{:.2f}"),
    ("swapped_pct", "% swapped", "{:.2f}"),
    ("delta_top1_error_pp", "Δ err (pp)", "{:+.2f}"),
    ("delta_error_per_swapped", "Δ err / % swapped", "{:.3f}"),
    ("mean_float_conf_swapped", "float conf of swapped %", "{:.1f}"),
]


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_rows(results: Sequence[ConfigResult]) -> list[dict[str, Any]]:
    return [{key: _clean(value) for key, value in result.row().items()} for result in results]


def metrics_csv(results: Sequence[ConfigResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    for row in metrics_rows(results):
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key, _, _ in COLUMNS})
    return buffer.getvalue()


def metrics_json(results: Sequence[ConfigResult], run_info: dict[str, Any]) -> str:
    return json.dumps({"run": run_info, "configs": metrics_rows(results)}, indent=2)


def markdown_table(results: Sequence[ConfigResult]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in metrics_rows(results):
        cells = ["–" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_reading(results: Sequence[ConfigResult], mild_ratio: float = 0.5) -> str:
    """One or two sentences on what the sweep shows, chosen from the numbers."""
    floats = [r for r in results if r.change is None]
    quantized = [r for r in results if r.change is not None and r.change.swapped.any()]
    if not floats or not quantized:
        return ""
    overall = floats[0].metrics["mean_confidence"]
    sentences = []
    mild = [r for r in quantized if r.change.ratio < mild_ratio]
    if mild:
        r = max(mild, key=lambda r: r.change.swapped_pct)
        c = r.change.summary()
        sentences.append(
            f"At {r.name}, {c['swapped_pct']:.2f}% of the predictions changed while the top-1 error moved by only "
            f"{c['delta_top1_error_pp']:+.2f} pp (ratio {r.change.ratio:.2f}): the swapped predictions had a mean "
            f"float confidence of {c['mean_float_conf_swapped']:.1f}%, against {overall:.1f}% over all predictions.")
    severe = max(quantized, key=lambda r: r.change.ratio)
    if severe.change.ratio >= mild_ratio and severe.change.swapped.sum() >= 10:
        c = severe.change.summary()
        sentences.append(
            f"At {severe.name} the ratio reaches {severe.change.ratio:.2f}: confident predictions start to flip "
            f"(mean float confidence of the swapped ones {c['mean_float_conf_swapped']:.1f}%).")
    return " ".join(sentences)


def report_markdown(results: Sequence[ConfigResult], run_info: dict[str, Any], figures: dict[str, str],
                    notes: Sequence[str] = ()) -> str:
    info = "\n".join(f"- **{key}**: {value}" for key, value in run_info.items())
    reading = sweep_reading(results)
    parts = [
        f"# ptqcal report: {run_info.get('model', '')}",
        "## Run", info,
        "## Metrics",
        "Errors and ECE in %, NLL in nats. Swaps and Δ error are against the float model on the same images.",
        markdown_table(results),
        reading,
        "## Figure 1 — float model calibration",
        "Bars: accuracy per confidence bin; hatched: the gap up to the bin's mean confidence (overconfidence). "
        "Below: how many predictions fall in each bin.",
        f"![Figure 1]({figures['reliability']})",
        "## Figure 2 — what quantization changed",
        "Top: % of predictions swapped and the change in top-1 error per precision. Middle: their ratio. "
        "Bottom: the float model's confidence in the predictions that quantization swapped.",
        f"![Figure 2]({figures['swaps']})",
    ]
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    return "\n\n".join(part for part in parts if part) + "\n"
