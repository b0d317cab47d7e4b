"""Aggregate result records into a leaderboard: per-task mean and std over seeds, suite averages, PPT, cost."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from vpeft.bench.suites import VTAB1K_GROUPS
from vpeft.data.mini import suite_sheet
from vpeft.errors import VPeftError
from vpeft.files import write_text_atomic
from vpeft.metrics import ppt
from vpeft.multi.run import multitask_keys
from vpeft.multi.train import delta_m
from vpeft.report.board import MEMORY_KINDS as MEMORY_KINDS  # re-exported: the old home of the shared types
from vpeft.report.board import MULTITASK_SUFFIX, Leaderboard, MethodRow, method_families, published_vtab1k, row_name
from vpeft.report.board import memory_label as memory_label
from vpeft.report.curves import plot_task_curves
from vpeft.report.dense import write_dense_report
from vpeft.report.html import write_html
from vpeft.report.plot import plot_pareto

RESULT = "result.json"
MANIFEST = "bench.json"


def collect_runs(out_dir: str | Path, keys: set[str] | None = None,
                 ignored: dict[str, int] | None = None) -> list[tuple[Path, dict[str, Any]]]:  # fmt: skip
    """``(run folder, record)`` of the finished final-protocol runs under ``out_dir/runs``.

    Tune runs and failures are excluded. With ``keys``, only the runs with those run keys (one
    sweep's). ``ignored`` (when given) counts what was left out and why: ``other_spec``,
    ``unfinished``, ``unreadable``.
    """
    ignored = ignored if ignored is not None else {}
    runs = []
    for path in sorted(Path(out_dir).glob(f"runs/*/*/*/{RESULT}")):
        if path.parent.name.startswith("."):
            continue  # a staging folder or one mid-swap
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or (
            not {"method", "task", record.get("primary_metric", "top1")} <= set(record) and record.get("status") == "ok"
        ):
            ignored["unreadable"] = ignored.get("unreadable", 0) + 1
            continue
        if record.get("status") != "ok":
            ignored["unfinished"] = ignored.get("unfinished", 0) + 1
        elif keys is not None and record.get("run_key") not in keys:
            ignored["other_spec"] = ignored.get("other_spec", 0) + 1
        else:
            runs.append((path.parent, record))
    return runs


def collect_records(out_dir: str | Path, keys: set[str] | None = None,
                    ignored: dict[str, int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Finished final-protocol records under ``out_dir/runs`` (see :func:`collect_runs`)."""
    return [record for _, record in collect_runs(out_dir, keys, ignored)]


def build_leaderboard(records: list[dict[str, Any]], groups: dict[str, list[str]] | None = None,
                      suite: str = "", model: str = "", delta_m_baseline: str | None = None) -> Leaderboard:  # fmt: skip
    """Averages: ``mean_tasks`` is the plain mean over tasks; ``group_mean`` the mean of the group means.

    A method's averages and PPT are given only when it has a result on every task. PPT uses the
    mean accuracy over tasks and the mean trainable parameters (without head) over runs.
    Multi-task runs' records (``multitask`` field) make their own row, ``<method> (multi-task)``, with
    delta-m over the single-task row of ``delta_m_baseline`` (default: the same method) when that row
    has every one of their tasks.
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
    families = method_families()
    board.epochs = sorted({int(r["epochs"]) for r in records if isinstance(r.get("epochs"), int)})
    board.selection = next((r["selection"] for r in records if r.get("selection")), "final_epoch")
    methods = list(dict.fromkeys(row_name(r) for r in records))
    for method in methods:
        mine = [r for r in records if row_name(r) == method]
        per_task: dict[str, tuple[float, float | None, int]] = {}
        for task in tasks:
            accs = [r["top1"] for r in mine if r["task"] == task]
            if accs:
                std = statistics.stdev(accs) if len(accs) > 1 else None
                per_task[task] = (statistics.fmean(accs), std, len(accs))
        complete = len(per_task) == len(tasks)
        params = statistics.fmean(r["trainable_params"] for r in mine)
        mean_tasks = group_mean = None
        group_means: dict[str, float] = {}
        if complete:
            mean_tasks = statistics.fmean(per_task[t][0] for t in tasks)
            group_means = {g: statistics.fmean(per_task[t][0] for t in ts) for g, ts in groups.items()}
            group_mean = statistics.fmean(group_means.values())
        mean_std, group_std = _seed_spread(mine, tasks, groups) if complete else (None, None)
        estimates = [r["memory_estimate_mb"] for r in mine if isinstance(r.get("memory_estimate_mb"), (int, float))]
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
                family=families.get(mine[0]["method"], ""),
                mean_tasks_std=mean_std,
                group_mean_std=group_std,
                seeds=max((n for _, _, n in per_task.values()), default=1),
                memory_kind="; ".join(sorted({str(r["memory_kind"]) for r in mine if r.get("memory_kind")})),
                memory_estimate_mb=max(estimates) if estimates else None,
                memory_estimate_kind=next(
                    (str(r["memory_estimate_kind"]) for r in mine if r.get("memory_estimate_kind")), ""
                ),
                multitask=method.endswith(MULTITASK_SUFFIX),
            )
        )
    _add_delta_m(board.rows, delta_m_baseline)
    board.rows.sort(key=lambda r: (r.mean_tasks is None, -(r.mean_tasks or 0.0)))
    return board


def _add_delta_m(rows: list[MethodRow], baseline: str | None) -> None:
    """delta-m of each multi-task row over its baseline's single-task row, where that row has all its tasks."""
    single = {r.method: r for r in rows if not r.multitask}
    for row in rows:
        if not row.multitask:
            continue
        name = baseline or row.method.removesuffix(MULTITASK_SUFFIX)
        base = single.get(name)
        if base is None or not row.per_task or not set(row.per_task) <= set(base.per_task):
            continue
        if any(base.per_task[t][0] == 0 for t in row.per_task):
            continue  # a relative gain over 0 % is undefined
        row.delta_m = delta_m(
            {t: v[0] for t, v in row.per_task.items()}, {t: base.per_task[t][0] for t in row.per_task}
        )
        row.delta_m_baseline = name


def _seed_spread(mine: list[dict[str, Any]], tasks: list[str],
                 groups: dict[str, list[str]]) -> tuple[float | None, float | None]:  # fmt: skip
    """Std over seeds of the mean over tasks and of the mean of group means (seeds that ran every task)."""
    by_seed: dict[Any, dict[str, list[float]]] = {}
    for r in mine:
        by_seed.setdefault(r.get("seed", 0), {}).setdefault(r["task"], []).append(r["top1"])
    means, group_means = [], []
    for accs in by_seed.values():
        if all(t in accs for t in tasks):
            task_mean = {t: statistics.fmean(accs[t]) for t in tasks}
            means.append(statistics.fmean(task_mean.values()))
            group_means.append(statistics.fmean(statistics.fmean(task_mean[t] for t in ts) for ts in groups.values()))
    if len(means) < 2:
        return None, None
    return statistics.stdev(means), statistics.stdev(group_means)


def _cell(stat: tuple[float, float | None, int] | None) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{mean:.2f}" if n < 2 or std is None else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def to_markdown(board: Leaderboard) -> str:
    n = len(board.tasks)
    estimate = board.estimate_label
    header = ["method", *board.tasks, f"mean of {n} tasks", f"mean of {len(board.groups)} group means",
              "params (M)", "PPT", "train s/run", board.memory_label]  # fmt: skip
    header += [estimate] if estimate else []
    header += ["Δm (%)"] if board.has_delta_m else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in board.rows:
        cells = [r.method, *(_cell(r.per_task.get(t)) for t in board.tasks), _num(r.mean_tasks), _num(r.group_mean),
                 f"{r.params / 1e6:.3f}", _num(r.ppt), f"{r.train_seconds:.1f}", f"{r.peak_memory_mb:.0f}"]  # fmt: skip
        cells += [_num(r.memory_estimate_mb, ".0f")] if estimate else []
        cells += [_num(r.delta_m, "+.2f")] if board.has_delta_m else []
        lines.append("| " + " | ".join(cells) + " |")
    groups = "; ".join(f"{g}: {', '.join(ts)}" for g, ts in board.groups.items())
    notes = [
        "",
        f"Top-1 accuracy (%) on {board.eval_split}, final epoch (nothing selected on test); mean ± std over seeds "
        "when there are two or more (a single seed shows no std).",
        f"Averages: 'mean of {n} tasks' is the plain mean (V-PETL Bench's convention); "
        f"'mean of {len(board.groups)} group means' averages per group first (most papers'). Groups: {groups}.",
        "params: trainable parameters without the classification head. PPT = acc * exp(-log10(params / 1e7 + 1)).",
        "peak MB: on CUDA the run's peak allocated memory; on CPU the process's peak RSS, which in a sweep of "
        "many runs in one process only grows and says little about the method (see benchmarks/step_time.py).",
    ]
    if estimate:
        notes.append(f"{estimate}: {board.estimate_note}; unlike the process's RSS, it differs between methods.")
    if board.has_delta_m:
        notes.append(board.delta_m_note)
    return "\n".join(lines + notes) + "\n"


def _round(value: float | None, digits: int) -> float | str:
    """``value`` rounded for the CSV; an empty cell for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(float(value), digits)


def to_csv(board: Leaderboard) -> str:
    """The leaderboard as CSV: accuracies to 2 decimals, std empty with one seed, PPT to 4, seconds to 1."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["method"]
    for t in board.tasks:
        header += [f"{t}_mean", f"{t}_std", f"{t}_seeds"]
    header += ["mean_tasks", "mean_tasks_std", "group_mean", "group_mean_std", *(f"group_{g}" for g in board.groups),
               "params", "ppt", "train_seconds", "peak_memory_mb", "memory_kind"]  # fmt: skip
    estimate = board.estimate_label is not None
    header += ["memory_estimate_mb", "memory_estimate_kind"] if estimate else []
    header += ["delta_m", "delta_m_baseline"] if board.has_delta_m else []
    header += ["family", "complete"]
    writer.writerow(header)
    for r in board.rows:
        row: list[Any] = [r.method]
        for t in board.tasks:
            mean, std, n = r.per_task.get(t) or (None, None, 0)
            row += [_round(mean, 2), _round(std if n > 1 else None, 2), n]
        row += [_round(r.mean_tasks, 2), _round(r.mean_tasks_std, 2), _round(r.group_mean, 2),
                _round(r.group_mean_std, 2), *(_round(r.group_means.get(g), 2) for g in board.groups),
                round(r.params), _round(r.ppt, 4), _round(r.train_seconds, 1), _round(r.peak_memory_mb, 1),
                r.memory_kind]  # fmt: skip
        row += [_round(r.memory_estimate_mb, 1), r.memory_estimate_kind] if estimate else []
        row += [_round(r.delta_m, 2), r.delta_m_baseline] if board.has_delta_m else []
        row += [r.family, r.complete]
        writer.writerow(row)
    return buf.getvalue()


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


#: the task type whose runs make the accuracy leaderboard (group means, PPT, Pareto plot); a record without a
#: ``task_type`` (written before task types existed) is one of its runs
CLASSIFICATION = "classification"


def runs_by_task_type(runs: list[tuple[Path, dict[str, Any]]]) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """The runs grouped by their record's ``task_type`` (classification when absent), in order of appearance."""
    grouped: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path, record in runs:
        grouped.setdefault(str(record.get("task_type") or CLASSIFICATION), []).append((path, record))
    return grouped


class MissingDependencyError(VPeftError, ImportError):
    """An optional dependency (matplotlib for the plots) is not installed."""


#: how to get the report's plotting dependency
REPORT_EXTRA_HINT = "pip install 'vpeft[report]' (or pip install matplotlib)"


def write_report(out_dir: str | Path, groups: dict[str, list[str]] | None = None, *, html: bool = False,
                 curves: bool = True, delta_m_baseline: str | None = None) -> dict[str, Path]:  # fmt: skip
    """Write leaderboard.md, leaderboard.csv, pareto.png (+ pareto.json) and curves/<task>.png into ``out_dir``.

    Multi-task runs written into the folder by ``vpeft train-multi`` (listed in ``multitask.json``) join the
    sweep's runs, in their own rows with delta-m (see :func:`build_leaderboard`).

    With ``html``, also leaderboard.html: one self-contained interactive page. The plots need
    matplotlib (the ``report`` extra); without it the tables (and the page) are written and
    :class:`MissingDependencyError` says how to install it.
    """
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    except ValueError:
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    keys = {r["run_key"] for r in manifest["runs"]} if isinstance(manifest.get("runs"), list) else None
    if keys is not None:
        keys |= multitask_keys(out)
    ignored: dict[str, int] = {}
    runs = collect_runs(out, keys, ignored)
    records = [record for _, record in runs]
    if not records:
        raise FileNotFoundError(f"no finished runs under '{out}/runs'; run `vpeft bench --out {out}` first")
    suite = manifest.get("suite", "")
    by_type = runs_by_task_type(runs)
    runs = by_type.pop(CLASSIFICATION, [])
    records = [r for _, r in runs]
    if by_type:  # every other task type: its own tables, its metrics as columns (no top-1, no Pareto plot)
        others = [r for typed in by_type.values() for _, r in typed]
        dense_paths = write_dense_report(out, others, suite, manifest.get("model", ""),
                                         "leaderboard" if not runs else "leaderboard-dense")  # fmt: skip
        if not runs:
            return dense_paths
    if groups is None and suite:
        groups = _suite_groups(suite, records)
    board = build_leaderboard(records, groups, suite=suite, model=manifest.get("model", ""),
                              delta_m_baseline=delta_m_baseline)  # fmt: skip
    title = f"# V-PEFT Bench: {suite or 'results'} suite, {board.model}, {board.mode} protocol\n\n"
    markdown = title + to_markdown(board)
    if ignored:
        why = {"other_spec": "runs of another spec (other options, recipe, seed or data than this sweep's)",
               "unfinished": "failed or unfinished runs", "unreadable": "unreadable result.json files"}  # fmt: skip
        markdown += "\nNot in this table: " + "; ".join(f"{n} {why[k]}" for k, n in sorted(ignored.items())) + ".\n"
    if suite == "vtab1k":
        markdown += "\n" + published_markdown(board)
    paths = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv"}
    write_text_atomic(paths["markdown"], markdown)
    write_text_atomic(paths["csv"], to_csv(board))
    if html:
        paths["html"] = write_html(board, out / "leaderboard.html", ignored=ignored)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        written = ", ".join(str(p) for p in paths.values())
        raise MissingDependencyError(
            f"wrote {written}; the plots (pareto.png, curves/) need matplotlib: {REPORT_EXTRA_HINT}"
        ) from None
    paths["plot"] = out / "pareto.png"
    plot_pareto(board, paths["plot"])
    if curves:
        paths["curves"] = out / "curves"
        plot_task_curves(runs, paths["curves"], tasks=board.tasks)
    return paths


def _suite_groups(suite: str, records: list[dict[str, Any]]) -> dict[str, list[str]]:
    present = {r["task"] for r in records}
    if suite == "vtab1k":
        source = VTAB1K_GROUPS
    elif suite == "mini":
        source = {}
        for name, info in suite_sheet()["tasks"].items():
            source.setdefault(info["group"], []).append(name)
    else:
        source = {"fgvc": sorted(present)}
    groups = {g: [t for t in ts if t in present] for g, ts in source.items()}
    return {g: ts for g, ts in groups.items() if ts}
