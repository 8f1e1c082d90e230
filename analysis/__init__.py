"""The paper's figures, tables and report from saved runs (numpy and matplotlib; no onnxruntime
or torch).

``run_analysis`` evaluates a saved run; ``rows`` turns it into rows, CSV and JSON; ``tables`` into
Markdown tables; ``judgement`` writes the sentences that judge its numbers; ``recommend`` chooses
the configuration to ship and writes ``recommendation.json``; ``trust`` counts each float fallback
guard and writes ``guard.json``; ``under_shift`` evaluates every configuration under each corruption
and ``shift_tables`` writes its section; ``figures`` (1-5), ``deploy_figures`` (6-8), ``trust_figures``
(9-10) and ``shift_figures`` (11-12) plot, ``report_figures`` decides which figures a report has; ``environment`` says where it
was written; ``markdown`` escapes text and renders HTML; ``report`` composes them into
``report.md`` and ``report.html``.

The names below are imported on first use, so that importing one module of the stage (e.g. the
recommendation's defaults, which the run's settings name) does not import matplotlib.
"""

from importlib import import_module

_WHERE = {"MarginCurves": "figures", "SwapPanel": "figures", "TemperatureEffect": "figures",
          "TransitionTable": "figures", "plot_margin": "figures", "plot_reliability": "figures",
          "plot_swap_panels": "figures", "plot_temperature": "figures", "plot_transitions": "figures",
          "save_figure": "figures", "build_report": "report", "report_markdown": "report", "metrics_csv": "rows",
          "metrics_json": "rows", "RunAnalysis": "run_analysis", "analyse_record": "run_analysis",
          "analyse_run": "run_analysis", "markdown_table": "tables", "guard_json": "trust",
          "GuardCurves": "trust_figures", "RiskCoverageCurves": "trust_figures", "plot_guard_curves": "trust_figures",
          "plot_risk_coverage": "trust_figures", "Recommendation": "recommend", "ShiftCurves": "shift_figures",
          "ShiftConfidence": "shift_figures", "plot_shift": "shift_figures", "plot_shift_confidence": "shift_figures",
          "ShiftCell": "under_shift"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
