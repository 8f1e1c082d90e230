"""The paper's figures, tables and report from saved runs (numpy and matplotlib; no onnxruntime
or torch)."""

from .figures import (MarginCurves, SwapPanel, TemperatureEffect, TransitionTable, plot_margin, plot_reliability,
                      plot_swap_panels, plot_temperature, plot_transitions, save_figure)
from .report import build_report, markdown_table, metrics_csv, metrics_json, report_markdown
from .results import RunAnalysis, analyse_record, analyse_run

__all__ = ["MarginCurves", "RunAnalysis", "SwapPanel", "TemperatureEffect", "TransitionTable", "analyse_record",
           "analyse_run", "build_report", "markdown_table", "metrics_csv", "metrics_json", "plot_margin",
           "plot_reliability", "plot_swap_panels", "plot_temperature", "plot_transitions", "report_markdown",
           "save_figure"]
