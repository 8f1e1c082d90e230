"""The paper's figures, tables and report from saved runs (numpy and matplotlib; no onnxruntime
or torch).

``run_analysis`` evaluates a saved run; ``rows`` turns it into rows, CSV and JSON; ``tables`` into
Markdown tables; ``judgement`` writes the sentences that judge its numbers; ``trust`` counts each
float fallback guard and writes ``guard.json``; ``figures`` (1-5), ``deploy_figures`` (6-8) and
``trust_figures`` (9-10) plot, ``report_figures`` decides which figures a report has;
``environment`` says where it was written; ``markdown`` escapes text and renders HTML; ``report``
composes them into ``report.md`` and ``report.html``.
"""

from .figures import (MarginCurves, SwapPanel, TemperatureEffect, TransitionTable, plot_margin, plot_reliability,
                      plot_swap_panels, plot_temperature, plot_transitions, save_figure)
from .report import build_report, report_markdown
from .rows import metrics_csv, metrics_json
from .run_analysis import RunAnalysis, analyse_record, analyse_run
from .tables import markdown_table
from .trust import guard_json
from .trust_figures import GuardCurves, RiskCoverageCurves, plot_guard_curves, plot_risk_coverage

__all__ = ["GuardCurves", "MarginCurves", "RiskCoverageCurves", "RunAnalysis", "SwapPanel", "TemperatureEffect",
           "TransitionTable", "analyse_record", "analyse_run", "build_report", "guard_json", "markdown_table",
           "metrics_csv", "metrics_json", "plot_guard_curves", "plot_margin", "plot_reliability", "plot_risk_coverage",
           "plot_swap_panels", "plot_temperature", "plot_transitions", "report_markdown", "save_figure"]
