"""Aggregate result records into a leaderboard: per-task mean and std over seeds, suite averages, PPT, cost."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vpeft.metrics import ppt

RESULT = "result.json"
MANIFEST = "bench.json"


def collect_records(out_dir: str | Path, keys: set[str] | None = None,
                    ignored: dict[str, int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Finished final-protocol records under ``out_dir/runs`` (tune runs and failures excluded).

    With ``keys``, only the runs with those run keys (one sweep's). ``ignored`` (when given) counts
    what was left out and why: ``other_spec``, ``unfinished``, ``unreadable``.
    """
    ignored = ignored if ignored is not None else {}
    records = []
    for path in sorted(Path(out_dir).glob(f"runs/*/*/*/{RESULT}")):
        if path.parent.name.startswith("."):
            continue  # a staging folder or one mid-swap
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or (
            not {"method", "task", "top1"} <= set(record) and record.get("status") == "ok"
        ):
            ignored["unreadable"] = ignored.get("unreadable", 0) + 1
            continue
        if record.get("status") != "ok":
            ignored["unfinished"] = ignored.get("unfinished", 0) + 1
        elif keys is not None and record.get("run_key") not in keys:
            ignored["other_spec"] = ignored.get("other_spec", 0) + 1
        else:
            records.append(record)
    return records


@dataclass
class MethodRow:
    method: str
    per_task: dict[str, tuple[float, float, int]]  # task -> (mean, std, seeds)
    mean_tasks: float | None
    group_mean: float | None
    group_means: dict[str, float]
    params: float  # trainable parameters without the head
    ppt: float | None
    train_seconds: float
    peak_memory_mb: float
    complete: bool


@dataclass
class Leaderboard:
    suite: str
    model: str
    mode: str
    tasks: list[str]
    groups: dict[str, list[str]]
    rows: list[MethodRow] = field(default_factory=list)

    @property
    def eval_split(self) -> str:
        return "val" if self.mode == "tune" else "test"


def build_leaderboard(records: list[dict[str, Any]], groups: dict[str, list[str]] | None = None,
                      suite: str = "", model: str = "") -> Leaderboard:  # fmt: skip
    """Averages: ``mean_tasks`` is the plain mean over tasks; ``group_mean`` the mean of the group means.

    A method's averages and PPT are given only when it has a result on every task. PPT uses the
    mean accuracy over tasks and the mean trainable parameters (without head) over runs.
    """
    if groups is None:
        groups = {}
        for r in records:
            groups.setdefault(r.get("group") or "all", [])
            if r["task"] not in groups[r.get("group") or "all"]:
                groups[r.get("group") or "all"].append(r["task"])
    tasks = [t for ts in groups.values() for t in ts]
    board = Leaderboard(suite, model or (records[0]["model"] if records else ""),
                        records[0]["mode"] if records else "final", tasks, groups)  # fmt: skip
    methods = list(dict.fromkeys(r["method"] for r in records))
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        per_task = {}
        for task in tasks:
            accs = [r["top1"] for r in mine if r["task"] == task]
            if accs:
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                per_task[task] = (statistics.fmean(accs), std, len(accs))
        complete = len(per_task) == len(tasks)
        params = statistics.fmean(r["trainable_params"] for r in mine)
        mean_tasks = group_mean = None
        group_means: dict[str, float] = {}
        if complete:
            mean_tasks = statistics.fmean(per_task[t][0] for t in tasks)
            group_means = {g: statistics.fmean(per_task[t][0] for t in ts) for g, ts in groups.items()}
            group_mean = statistics.fmean(group_means.values())
        board.rows.append(
            MethodRow(
                method=method,
                per_task=per_task,
                mean_tasks=mean_tasks,
                group_mean=group_mean,
                group_means=group_means,
                params=params,
                ppt=ppt(mean_tasks / 100.0, round(params)) if mean_tasks is not None else None,
                train_seconds=statistics.fmean(r["train_seconds"] for r in mine),
                peak_memory_mb=max(r.get("peak_memory_mb", 0.0) for r in mine),
                complete=complete,
            )
        )
    board.rows.sort(key=lambda r: (r.mean_tasks is None, -(r.mean_tasks or 0.0)))
    return board


def _cell(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def to_markdown(board: Leaderboard) -> str:
    n = len(board.tasks)
    header = ["method", *board.tasks, f"mean of {n} tasks", f"mean of {len(board.groups)} group means",
              "params (M)", "PPT", "train s/run", "peak MB"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in board.rows:
        cells = [r.method, *(_cell(r.per_task.get(t)) for t in board.tasks), _num(r.mean_tasks), _num(r.group_mean),
                 f"{r.params / 1e6:.3f}", _num(r.ppt), f"{r.train_seconds:.1f}", f"{r.peak_memory_mb:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    groups = "; ".join(f"{g}: {', '.join(ts)}" for g, ts in board.groups.items())
    notes = [
        "",
        f"Top-1 accuracy (%) on {board.eval_split}, final epoch (nothing selected on test); mean ± std over seeds "
        "when there are several.",
        f"Averages: 'mean of {n} tasks' is the plain mean (V-PETL Bench's convention); "
        f"'mean of {len(board.groups)} group means' averages per group first (most papers'). Groups: {groups}.",
        "params: trainable parameters without the classification head. PPT = acc * exp(-log10(params / 1e7 + 1)).",
        "peak MB: on CUDA the run's peak allocated memory; on CPU the process's peak RSS, which in a sweep of "
        "many runs in one process only grows (see benchmarks/step_time.py for per-method memory).",
    ]
    return "\n".join(lines + notes) + "\n"


def to_csv(board: Leaderboard) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["method"]
    for t in board.tasks:
        header += [f"{t}_mean", f"{t}_std", f"{t}_seeds"]
    header += ["mean_tasks", "group_mean", "params", "ppt", "train_seconds", "peak_memory_mb", "complete"]
    writer.writerow(header)
    for r in board.rows:
        row: list[Any] = [r.method]
        for t in board.tasks:
            stat = r.per_task.get(t)
            row += list(stat) if stat else ["", "", 0]
        row += [r.mean_tasks if r.mean_tasks is not None else "", r.group_mean if r.group_mean is not None else "",
                round(r.params), r.ppt if r.ppt is not None else "", r.train_seconds, r.peak_memory_mb, r.complete]  # fmt: skip
        writer.writerow(row)
    return buf.getvalue()


def published_vtab1k() -> list[dict[str, Any]]:
    """Published ViT-B/16 VTAB-1k numbers shipped with vpeft (source in the file's header)."""
    text = resources.files("vpeft.bench").joinpath("data", "published_vtab1k.csv").read_text()
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    return [
        {
            "method": r["method"],
            "mean19": float(r["mean19"]),
            "group": float(r["group"]),
            "params_m": float(r["params_m"]),
        }
        for r in csv.DictReader(rows)
    ]


def published_markdown(board: Leaderboard) -> str:
    ours = {r.method: r for r in board.rows}
    lines = [
        "## Published ViT-B/16 VTAB-1k results beside the measured ones",
        "",
        "Published: V-PETL Bench (arXiv 2402.02242 v5), which picks the best test epoch; measured: this sweep.",
        "",
        "| method | published mean-19 | measured mean-19 | published group mean | measured group mean | "
        "published params (M) | measured params (M) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in published_vtab1k():
        r = ours.get(p["method"])
        lines.append(
            f"| {p['method']} | {p['mean19']:.2f} | {_num(r.mean_tasks) if r else '-'} | {p['group']:.2f} | "
            f"{_num(r.group_mean) if r else '-'} | {p['params_m']:.2f} | {f'{r.params / 1e6:.2f}' if r else '-'} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, groups: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """Write leaderboard.md, leaderboard.csv and pareto.png (+ pareto.json) into ``out_dir``."""
    from vpeft.report.plot import plot_pareto

    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    except ValueError:
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    keys = {r["run_key"] for r in manifest["runs"]} if isinstance(manifest.get("runs"), list) else None
    ignored: dict[str, int] = {}
    records = collect_records(out, keys, ignored)
    if not records:
        raise FileNotFoundError(f"no finished runs under '{out}/runs'; run `vpeft bench --out {out}` first")
    suite = manifest.get("suite", "")
    if groups is None and suite:
        groups = _suite_groups(suite, records)
    board = build_leaderboard(records, groups, suite=suite, model=manifest.get("model", ""))
    title = f"# V-PEFT Bench: {suite or 'results'} suite, {board.model}, {board.mode} protocol\n\n"
    markdown = title + to_markdown(board)
    if ignored:
        why = {"other_spec": "runs of another spec (other options, recipe, seed or data than this sweep's)",
               "unfinished": "failed or unfinished runs", "unreadable": "unreadable result.json files"}  # fmt: skip
        markdown += "\nNot in this table: " + "; ".join(f"{n} {why[k]}" for k, n in sorted(ignored.items())) + ".\n"
    if suite == "vtab1k":
        markdown += "\n" + published_markdown(board)
    paths = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv", "plot": out / "pareto.png"}
    paths["markdown"].write_text(markdown)
    paths["csv"].write_text(to_csv(board))
    plot_pareto(board, paths["plot"])
    return paths


def _suite_groups(suite: str, records: list[dict[str, Any]]) -> dict[str, list[str]]:
    from vpeft.bench.suites import VTAB1K_GROUPS

    present = {r["task"] for r in records}
    if suite == "vtab1k":
        source = VTAB1K_GROUPS
    elif suite == "mini":
        from vpeft.assets.mini import suite_sheet

        source = {}
        for name, info in suite_sheet()["tasks"].items():
            source.setdefault(info["group"], []).append(name)
    else:
        source = {"fgvc": sorted(present)}
    groups = {g: [t for t in ts if t in present] for g, ts in source.items()}
    return {g: ts for g, ts in groups.items() if ts}
