"""Leaderboards (Markdown, CSV) and the Pareto plot from a folder of result records."""

from vpeft.report.leaderboard import Leaderboard, MethodRow, build_leaderboard, collect_records, write_report
from vpeft.report.plot import pareto_front, plot_pareto

__all__ = [
    "Leaderboard",
    "MethodRow",
    "build_leaderboard",
    "collect_records",
    "pareto_front",
    "plot_pareto",
    "write_report",
]
