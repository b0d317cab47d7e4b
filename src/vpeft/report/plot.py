"""The Pareto plot: mean accuracy against trainable parameters (log axis), the front drawn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vpeft.report.leaderboard import Leaderboard

#: where a method with no trainable parameters besides the head (linear probe) is drawn on the log axis
ZERO_PARAMS_AT = 1e2


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Methods not dominated by another with no more parameters and no lower accuracy (one strictly better).

    ``points``: (method, params, accuracy).
    """
    front = []
    for name, params, acc in points:
        dominated = any(
            (p <= params and a >= acc) and (p < params or a > acc) for other, p, a in points if other != name
        )
        if not dominated:
            front.append(name)
    return front


def plot_pareto(board: Leaderboard, path: str | Path) -> dict:
    """Write the plot to ``path`` (PNG) and its points to ``path`` with suffix .json; return those points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r.method, r.params, r.mean_tasks) for r in board.rows if r.mean_tasks is not None]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    markers = "osD^vP*Xh<>p8d"
    for i, (name, params, acc) in enumerate(points):
        x = max(params, ZERO_PARAMS_AT)
        ax.scatter([x], [acc], marker=markers[i % len(markers)], s=60, zorder=3,
                   edgecolors="black" if name in front else "none", label=name)  # fmt: skip
        ax.annotate(name, (x, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front_pts = sorted((max(p, ZERO_PARAMS_AT), a) for n, p, a in points if n in front)
    if front_pts:
        ax.step([p for p, _ in front_pts], [a for _, a in front_pts], where="post", color="gray", linestyle="--",
                linewidth=1, zorder=2, label="Pareto front")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"trainable parameters without head (log; 0 drawn at {ZERO_PARAMS_AT:g})")
    ax.set_ylabel(f"mean top-1 over {len(board.tasks)} tasks (%)")
    ax.set_title(f"V-PEFT Bench: {board.suite or 'results'} suite, {board.model}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    data = {"points": [{"method": n, "params": p, "accuracy": a} for n, p, a in points], "front": front}
    path.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    return data
