"""The Pareto plot: mean accuracy against trainable parameters (log axis), one colour per method family.

The front is drawn as a line, seeds give error bars, and labels are placed so that they do not overlap
each other or the points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpeft.files import atomic_write, write_text_atomic

if TYPE_CHECKING:
    from vpeft.report.board import Leaderboard

#: where a method with no trainable parameters besides the head (linear probe) is drawn on the log axis
ZERO_PARAMS_AT = 1e2

#: one colour per method family of ``vpeft.list_methods()`` (colour-blind-safe Okabe-Ito + greys)
FAMILY_COLORS: dict[str, str] = {
    "baseline": "#555555",
    "partial/specification": "#0072B2",
    "partial/reparameterization": "#D55E00",
    "addition/adapter": "#009E73",
    "addition/prompt": "#CC79A7",
    "addition/prefix": "#E69F00",
    "addition/side": "#56B4E9",
    "unified": "#8C564B",
}
#: colours for families not in FAMILY_COLORS (a newly registered family), then for unknown methods
EXTRA_COLORS = ("#F0E442", "#17BECF", "#BCBD22", "#7F3C8D", "#000000")
MARKERS = "osD^vP*Xh<>p8d"


def family_colors(families: list[str]) -> dict[str, str]:
    """A colour for each family in ``families``, in the registry's family order (the known ones keep theirs)."""
    known = list(FAMILY_COLORS)
    ordered = sorted(dict.fromkeys(families), key=lambda f: known.index(f) if f in known else len(known))
    spare = list(EXTRA_COLORS)
    colours = {}
    for f in ordered:
        if f in FAMILY_COLORS:
            colours[f] = FAMILY_COLORS[f]
        else:  # stable: the n-th unknown family gets the n-th spare colour, then a grey ramp
            colours[f] = spare.pop(0) if spare else "#" + f"{(0x30 + 0x18 * len(colours)) % 0xC0:02x}" * 3
    return colours


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


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Overlap area of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _distance(box: tuple[float, float, float, float], point: tuple[float, float]) -> float:
    """Distance from ``point`` to the nearest point of ``box``."""
    dx = max(box[0] - point[0], 0.0, point[0] - box[2])
    dy = max(box[1] - point[1], 0.0, point[1] - box[3])
    return (dx * dx + dy * dy) ** 0.5


def _place_labels(ax: Any, renderer: Any, items: list[tuple[str, float, float, float | None]],
                  colour: dict[str, str], marker_px: float) -> list[dict[str, Any]]:  # fmt: skip
    """Annotate each (name, x, y, yerr) at the nearest offset whose text box hits no other label, no point
    (other points with a margin, so that a label sits closest to its own), no error bar and stays inside
    the axes; a label pushed away from its point gets a leader line. Returns each label's box (pixels)."""
    to_px = ax.transData.transform
    r = marker_px / 2 + 1
    margin = 5.0
    points = {name: tuple(to_px((x, y))) for name, x, y, _ in items}
    bars = []
    for _name, x, y, err in items:
        if err:
            (bx, lo), (_, hi) = to_px((x, y - err)), to_px((x, y + err))
            bars.append((bx - 4, min(lo, hi) - 1, bx + 4, max(lo, hi) + 1))
    frame = ax.get_window_extent(renderer)
    frame_box = (frame.x0, frame.y0, frame.x1, frame.y1)
    placed: list[tuple[float, float, float, float]] = []
    result = []
    ring = ((6, 3), (6, -11), (-6, 3), (-6, -11), (0, 8), (0, -17), (9, -4), (-9, -4))
    offsets = [(dx * k, dy * k) for k in (1, 1.6, 2.4, 3.4, 4.6, 6) for dx, dy in ring]
    for name, x, y, _ in sorted(items, key=lambda t: (t[1], -t[2])):
        own = points[name]
        others = [(px - r - margin, py - r - margin, px + r + margin, py + r + margin)
                  for n, (px, py) in points.items() if n != name]  # fmt: skip
        own_box = (own[0] - r, own[1] - r, own[0] + r, own[1] + r)
        best = None
        for dx, dy in offsets:
            ann = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                              ha="left" if dx > 0 else "right" if dx < 0 else "center", va="bottom",
                              color="#222222", zorder=5)  # fmt: skip
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = (
                box[0] >= frame_box[0] and box[2] <= frame_box[2] and box[1] >= frame_box[1] and box[3] <= frame_box[3]
            )
            cost = (sum(_overlap(box, o) for o in placed) * 10 + sum(_overlap(box, o) for o in others)
                    + _overlap(box, own_box) * 10 + sum(_overlap(box, o) for o in bars) + (0.0 if inside else 1e6))  # fmt: skip
            mine = _distance(box, own)
            cost += sum(50.0 for n, pt in points.items() if n != name and _distance(box, pt) < mine)  # ambiguous
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box, (dx, dy))
            else:
                ann.remove()
            if cost == 0.0:
                break
        assert best is not None
        cost, ann, box, (dx, dy) = best
        if abs(dx) > 10 or abs(dy) > 18:  # pushed away from its point: a leader line says whose label it is
            ann.remove()
            ann = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                              ha="left" if dx > 0 else "right" if dx < 0 else "center", va="bottom",
                              color="#222222", zorder=5,
                              arrowprops={"arrowstyle": "-", "color": colour[name], "lw": 0.6, "shrinkA": 1,
                                          "shrinkB": marker_px / 2})  # fmt: skip
        placed.append(box)
        result.append({"method": name, "box_px": [round(v, 1) for v in box], "cost": round(cost, 1)})
    return result


def plot_pareto(board: Leaderboard, path: str | Path) -> dict[str, Any]:
    """Write the plot to ``path`` (PNG) and its data to ``path`` with suffix .json; return that data.

    The data: ``points`` (method, family, params, accuracy, yerr, colour, marker), ``front`` (methods),
    ``front_line`` ([x, y] vertices of the drawn front), ``family_colors`` and ``labels`` (each label's
    box in pixels and its placement cost: overlap with labels, points and error bars, 0 when free).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in board.rows if r.mean_tasks is not None]
    points = [(r.method, r.params, float(r.mean_tasks)) for r in rows]  # type: ignore[arg-type]
    front = pareto_front(points)
    families = list(dict.fromkeys(r.family or "unknown" for r in rows))
    colours = family_colors(families)
    colour = {r.method: colours[r.family or "unknown"] for r in rows}
    seen: dict[str, int] = {}
    marker = {}
    for r in rows:  # a marker per method within its family
        k = seen.get(r.family, 0)
        marker[r.method], seen[r.family] = MARKERS[k % len(MARKERS)], k + 1

    fig, ax = plt.subplots(figsize=(9.0, 5.5), dpi=120)
    size = 60
    for r in rows:
        x = max(r.params, ZERO_PARAMS_AT)
        if r.mean_tasks_std is not None:
            ax.errorbar([x], [r.mean_tasks], yerr=[r.mean_tasks_std], fmt="none", ecolor=colour[r.method],
                        elinewidth=1, capsize=3, zorder=2)  # fmt: skip
        ax.scatter([x], [r.mean_tasks], marker=marker[r.method], s=size, zorder=3, color=colour[r.method],
                   edgecolors="black" if r.method in front else "white", linewidths=0.8)  # fmt: skip
    front_line = sorted((max(p, ZERO_PARAMS_AT), a) for n, p, a in points if n in front)
    if front_line:
        ax.plot([p for p, _ in front_line], [a for _, a in front_line], color="#222222", linewidth=1.4,
                zorder=2.5, solid_capstyle="round")  # fmt: skip
    ax.set_xscale("log")
    xs = [max(p, ZERO_PARAMS_AT) for _, p, _ in points] or [ZERO_PARAMS_AT]
    ys = [a for _, _, a in points] or [0.0]
    ax.set_xlim(min(xs) / 3, max(xs) * 6)  # room for labels on both sides
    span = max(max(ys) - min(ys), 1.0)
    ax.set_ylim(min(ys) - 0.15 * span, max(ys) + 0.15 * span)
    ax.set_xlabel(f"trainable parameters without head (log; 0 drawn at {ZERO_PARAMS_AT:g})")
    ax.set_ylabel(f"mean top-1 over {len(board.tasks)} tasks (%)")
    ax.set_title(f"V-PEFT Bench: {board.suite or 'results'} suite, {board.model}", fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f, markersize=7) for f, c in colours.items()]
    handles.append(Line2D([], [], color="#222222", linewidth=1.4, label="Pareto front"))
    if any(r.mean_tasks_std is not None for r in rows):
        handles.append(
            Line2D([], [], color="#777777", marker="|", linestyle="", markersize=10, label="± std over seeds")
        )
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="family",
              title_fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.canvas.draw()
    labels = _place_labels(ax, fig.canvas.get_renderer(),
                           [(r.method, max(r.params, ZERO_PARAMS_AT), float(r.mean_tasks), r.mean_tasks_std)  # type: ignore[arg-type]
                            for r in rows],
                           colour, marker_px=(size**0.5) * fig.dpi / 72)  # fmt: skip
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    data = {
        "points": [
            {
                "method": r.method,
                "family": r.family,
                "params": r.params,
                "accuracy": r.mean_tasks,
                "yerr": r.mean_tasks_std,
                "seeds": r.seeds,
                "colour": colour[r.method],
                "marker": marker[r.method],
            }
            for r in rows
        ],
        "front": front,
        "front_line": [[p, a] for p, a in front_line],
        "family_colors": colours,
        "labels": labels,
    }
    write_text_atomic(path.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    return data
