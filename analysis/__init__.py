"""The paper's figures and tables from computed results (no onnxruntime or torch needed)."""

from .figures import SwapPanel, plot_reliability, plot_swap_panels, reliability_from_logits, save_figure
from .report import markdown_table, metrics_csv, metrics_json, report_markdown

__all__ = ["SwapPanel", "markdown_table", "metrics_csv", "metrics_json", "plot_reliability",
           "plot_swap_panels", "reliability_from_logits", "report_markdown", "save_figure"]
