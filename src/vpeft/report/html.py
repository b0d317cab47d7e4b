"""The HTML leaderboard: one self-contained page (no network) with a sortable, filterable table and an
interactive accuracy-vs-parameters Pareto plot (inline SVG drawn by vanilla JavaScript).

The script and style ship in ``vpeft/report/static/`` and are inlined into the page. Opening the page
with the fragment ``#selftest`` makes it click through its own controls and write what it saw into
``<pre id="selftest-result">`` as JSON (the browser test reads it with ``chromium --dump-dom``).
"""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from vpeft.files import write_text_atomic
from vpeft.report.board import Leaderboard, MethodRow, method_families, published_vtab1k
from vpeft.report.plot import ZERO_PARAMS_AT, family_colors

#: the protocol of the published VTAB-1k numbers, shown beside them
PUBLISHED_PROTOCOL = "V-PETL Bench (arXiv 2402.02242 v5): best test epoch, ViT-B/16 IN-21k"


def _num(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _cell(value: float | None, text: str | None = None, fmt: str = ".2f") -> list[Any]:
    """[sort value, shown text] of a table cell; a missing value sorts last and shows '-'."""
    v = _num(value)
    return [v, text if text is not None else ("-" if v is None else format(v, fmt))]


def _acc(mean: float | None, std: float | None, seeds: int) -> list[Any]:
    if mean is None:
        return _cell(None)
    shown = f"{mean:.2f}" if std is None or seeds < 2 else f"{mean:.2f} ± {std:.2f}"
    return [mean, shown]


def page_data(board: Leaderboard, ignored: dict[str, int] | None = None) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data: columns, rows (cells as [sort value, text]), points."""
    n, g = len(board.tasks), len(board.groups)
    vtab = board.suite == "vtab1k"
    published = {p["method"]: p for p in published_vtab1k()} if vtab else {}
    estimate = board.estimate_label
    columns: list[dict[str, Any]] = [
        {"key": "method", "label": "method", "type": "text"},
        {"key": "family", "label": "family", "type": "text"},
    ]
    for group, tasks in board.groups.items():
        columns += [{"key": f"task:{t}", "label": t, "type": "num", "group": group, "title": f"{t} ({group})"}
                    for t in tasks]  # fmt: skip
    columns += [
        {"key": "mean_tasks", "label": f"mean of {n} tasks", "type": "num",
         "title": "plain mean over the tasks (V-PETL Bench's convention)"},
        {"key": "group_mean", "label": f"mean of {g} group means", "type": "num",
         "title": "mean of the per-group means (most papers')"},
        *({"key": f"group:{gr}", "label": f"{gr} mean", "type": "num"} for gr in board.groups),
        {"key": "params_m", "label": "params (M)", "type": "num", "title": "trainable parameters without the head"},
        {"key": "ppt", "label": "PPT", "type": "num", "title": "acc * exp(-log10(params / 1e7 + 1))"},
        {"key": "train_s", "label": "train s/run", "type": "num"},
        {"key": "peak_mb", "label": board.memory_label, "type": "num",
         "title": "on CUDA the run's peak allocated memory; on CPU the process's peak RSS (grows over a sweep)"},
    ]  # fmt: skip
    if estimate:
        columns.append({"key": "est_mb", "label": estimate, "type": "num", "title": board.estimate_note})
    if board.has_delta_m:
        columns.append({"key": "delta_m", "label": "Δm (%)", "type": "num", "title": board.delta_m_note})
    if vtab:
        columns += [
            {"key": "pub_mean19", "label": "published mean-19", "type": "num", "title": PUBLISHED_PROTOCOL},
            {"key": "pub_group", "label": "published group mean", "type": "num", "title": PUBLISHED_PROTOCOL},
            {"key": "pub_params", "label": "published params (M)", "type": "num", "title": PUBLISHED_PROTOCOL},
        ]
    columns.append({"key": "protocol", "label": "protocol", "type": "text"})
    chosen = "final epoch" if board.selection == "final_epoch" else board.selection.replace("_", " ")

    def row(r: MethodRow) -> dict[str, Any]:
        cells: dict[str, list[Any]] = {"method": [r.method, r.method], "family": [r.family, r.family or "-"]}
        for t in board.tasks:
            mean, std, seeds = r.per_task.get(t) or (None, None, 0)
            cells[f"task:{t}"] = _acc(mean, std, seeds)
        cells["mean_tasks"] = _acc(r.mean_tasks, r.mean_tasks_std, 2)
        cells["group_mean"] = _acc(r.group_mean, r.group_mean_std, 2)
        for gr in board.groups:
            cells[f"group:{gr}"] = _cell(r.group_means.get(gr))
        cells["params_m"] = _cell(r.params / 1e6, fmt=".3f")
        cells["ppt"] = _cell(r.ppt)
        cells["train_s"] = _cell(r.train_seconds, fmt=".1f")
        cells["peak_mb"] = _cell(r.peak_memory_mb, fmt=".0f")
        if estimate:
            cells["est_mb"] = _cell(r.memory_estimate_mb, fmt=".0f")
        if board.has_delta_m:
            cells["delta_m"] = _cell(r.delta_m, fmt="+.2f")
        p = published.get(r.method)
        if vtab:
            cells["pub_mean19"] = _cell(p["mean19"] if p else None)
            cells["pub_group"] = _cell(p["group"] if p else None)
            cells["pub_params"] = _cell(p["params_m"] if p else None)
        seeds = f"{r.seeds} seed{'s' if r.seeds != 1 else ''}"
        label = f"{board.mode}, {board.eval_split}, {chosen}, {seeds}" + ("" if r.complete else ", incomplete")
        if p:
            label += "; published: best test epoch"
        cells["protocol"] = [label, label]
        return {"method": r.method, "family": r.family, "complete": r.complete, "cells": cells}

    families = method_families()
    pub_points = [
        {"method": p["method"], "family": families.get(p["method"], "other"), "params": p["params_m"] * 1e6,
         "mean_tasks": p["mean19"], "group_mean": p["group"]}
        for p in published.values()
    ]  # fmt: skip
    colours = family_colors(list(dict.fromkeys([*(r.family or "unknown" for r in board.rows),
                                                *(p["family"] for p in pub_points)])))  # fmt: skip
    points = [
        {"method": r.method, "family": r.family or "unknown", "params": r.params, "mean_tasks": r.mean_tasks,
         "mean_tasks_std": r.mean_tasks_std, "group_mean": r.group_mean, "group_mean_std": r.group_mean_std,
         "ppt": r.ppt, "seeds": r.seeds}
        for r in board.rows if r.mean_tasks is not None
    ]  # fmt: skip
    why = {"other_spec": "runs of another spec", "unfinished": "failed or unfinished runs",
           "unreadable": "unreadable result.json files"}  # fmt: skip
    groups = "; ".join(f"{gr}: {', '.join(ts)}" for gr, ts in board.groups.items())
    notes = [
        board.protocol + ". Mean ± std over seeds where there are two or more.",
        f"Averages: 'mean of {n} tasks' is the plain mean (V-PETL Bench's convention); 'mean of {g} group "
        f"means' averages per group first (most papers'). Groups: {groups}.",
        "params: trainable parameters without the classification head. PPT = acc * exp(-log10(params / 1e7 + 1)).",
        f"{board.memory_label}: on CUDA the run's peak allocated memory; on CPU the process's peak RSS, which "
        "grows over a sweep of many runs in one process and says little about the method.",
    ]
    if estimate:
        notes.append(f"{estimate}: {board.estimate_note}; unlike the process's RSS, it differs between methods.")
    if board.has_delta_m:
        notes.append(board.delta_m_note)
    if vtab:
        notes.append(f"Published columns: {PUBLISHED_PROTOCOL}; measured columns never select on test.")
    if ignored:
        notes.append(
            "Not in this table: " + "; ".join(f"{c} {why.get(k, k)}" for k, c in sorted(ignored.items())) + "."
        )
    return {
        "title": f"V-PEFT Bench: {board.suite or 'results'} suite, {board.model}",
        "suite": board.suite,
        "model": board.model,
        "protocol": board.protocol,
        "tasks": board.tasks,
        "groups": board.groups,
        "columns": columns,
        "rows": [row(r) for r in board.rows],
        "points": points,
        "published_points": pub_points,
        "family_colors": colours,
        "zero_params_at": ZERO_PARAMS_AT,
        "y_metrics": {"mean_tasks": f"mean top-1 over {n} tasks (%)", "group_mean": f"mean of {g} group means (%)"},
        "notes": notes,
    }


def _static(name: str) -> str:
    return resources.files("vpeft.report").joinpath("static", name).read_text(encoding="utf-8")


def render_html(board: Leaderboard, ignored: dict[str, int] | None = None) -> str:
    """The page as one string: data, script and style inlined; nothing is fetched over the network."""
    data = page_data(board, ignored)
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    title = html.escape(data["title"])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data["notes"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<style>
{_static("leaderboard.css")}
</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class="protocol">{html.escape(data["protocol"])}</p>
</header>
<section id="controls" aria-label="filters">
<label>filter <input id="filter" type="search" placeholder="method or family" autocomplete="off"></label>
<span id="family-filters" aria-label="families"></span>
<label><input id="complete-only" type="checkbox"> complete only</label>
<label>plot y <select id="y-metric"></select></label>
<label id="published-toggle" hidden><input id="show-published" type="checkbox" checked> published points</label>
<span id="count" aria-live="polite"></span>
</section>
<main>
<section id="plot-section" aria-label="Pareto plot">
<div id="plot"></div>
<div id="tooltip" role="tooltip" hidden></div>
</section>
<section id="table-section" aria-label="leaderboard">
<table id="leaderboard"><thead></thead><tbody></tbody></table>
</section>
<ul class="notes">{notes}</ul>
</main>
<pre id="selftest-result" hidden></pre>
<script type="application/json" id="leaderboard-data">{payload}</script>
<script>
{_static("leaderboard.js")}
</script>
</body>
</html>
"""


def write_html(board: Leaderboard, path: str | Path, ignored: dict[str, int] | None = None) -> Path:
    """Write the self-contained HTML leaderboard to ``path`` and return it."""
    path = Path(path)
    write_text_atomic(path, render_html(board, ignored))
    return path
