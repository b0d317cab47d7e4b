"""Reports from a folder of result records: leaderboards (Markdown, CSV, HTML), the Pareto plot,
per-task training curves, and the side-by-side comparison of two runs."""

from vpeft.report.compare import Comparison, compare_runs, format_comparison, load_run, plot_comparison
from vpeft.report.curves import plot_task_curves, read_log
from vpeft.report.html import render_html, write_html
from vpeft.report.leaderboard import (
    Leaderboard,
    MethodRow,
    MissingDependencyError,
    build_leaderboard,
    collect_records,
    collect_runs,
    write_report,
)
from vpeft.report.plot import family_colors, pareto_front, plot_pareto

__all__ = [
    "Comparison",
    "Leaderboard",
    "MethodRow",
    "MissingDependencyError",
    "build_leaderboard",
    "collect_records",
    "collect_runs",
    "compare_runs",
    "family_colors",
    "format_comparison",
    "load_run",
    "pareto_front",
    "plot_comparison",
    "plot_pareto",
    "plot_task_curves",
    "read_log",
    "render_html",
    "write_html",
    "write_report",
]
