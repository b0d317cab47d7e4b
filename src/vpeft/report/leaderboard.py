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

from vpeft.errors import VPeftError
from vpeft.metrics import ppt

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


def method_families() -> dict[str, str]:
    """Method name -> family (``partial/reparameterization``, ``addition/adapter``, ...) of the registry."""
    import vpeft

    return {m["name"]: m["family"] for m in vpeft.list_methods()}


#: memory_kind of the records -> the memory column's label
MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA allocated",
    "cpu_process_max_rss": "CPU: process RSS",
}


def memory_label(kinds: set[str], prefix: str = "peak MB") -> str:
    """The memory column's header, naming what was measured, e.g. ``peak MB (CUDA allocated)``."""
    names = sorted(MEMORY_KINDS.get(k, k.replace("_", " ")) for k in kinds if k)
    if not names:
        return prefix
    return f"{prefix} ({names[0]})" if len(names) == 1 else f"{prefix} (mixed: {'; '.join(names)})"


@dataclass
class MethodRow:
    """One method's line of the leaderboard."""

    method: str
    per_task: dict[str, tuple[float, float | None, int]]  # task -> (mean, std or None with one seed, seeds)
    mean_tasks: float | None
    group_mean: float | None
    group_means: dict[str, float]
    params: float  # trainable parameters without the head
    ppt: float | None
    train_seconds: float
    peak_memory_mb: float
    complete: bool
    family: str = ""
    #: std over seeds of the per-seed mean over tasks (seeds with every task; None below 2 such seeds)
    mean_tasks_std: float | None = None
    group_mean_std: float | None = None
    seeds: int = 1  # most seeds of any task
    memory_kind: str = ""
    memory_estimate_mb: float | None = None  # a per-method estimate, where the records carry one
    memory_estimate_kind: str = ""
    #: a row of multi-task runs (``vpeft train-multi``: one adapter per task, trained jointly on one backbone)
    multitask: bool = False
    #: delta-m (%) of a multi-task row over the single-task row of ``delta_m_baseline`` on the same tasks
    delta_m: float | None = None
    delta_m_baseline: str = ""


#: what a multi-task row's name adds to its method's
MULTITASK_SUFFIX = " (multi-task)"


def row_name(record: dict[str, Any]) -> str:
    """The leaderboard row of a record: its method, or ``<method> (multi-task)`` for a multi-task run's task."""
    return record["method"] + (MULTITASK_SUFFIX if isinstance(record.get("multitask"), dict) else "")


@dataclass
class Leaderboard:
    suite: str
    model: str
    mode: str
    tasks: list[str]
    groups: dict[str, list[str]]
    rows: list[MethodRow] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)  # distinct epoch counts of the runs
    selection: str = "final_epoch"

    @property
    def eval_split(self) -> str:
        return "val" if self.mode == "tune" else "test"

    @property
    def memory_label(self) -> str:
        """Header of the measured-memory column, naming its kind (CUDA allocated, CPU process RSS)."""
        return memory_label({r.memory_kind for r in self.rows})

    @property
    def estimate_label(self) -> str | None:
        """Header of the estimated-memory column, or None when no record carries an estimate."""
        if not any(r.memory_estimate_mb is not None for r in self.rows):
            return None
        return "est. MB (per method)"

    @property
    def estimate_note(self) -> str:
        """What the estimate counts, from the records' ``memory_estimate_kind``."""
        kinds = sorted({r.memory_estimate_kind for r in self.rows if r.memory_estimate_mb is not None} - {""})
        return "; ".join(kinds) or "the records' per-method memory estimate"

    @property
    def has_delta_m(self) -> bool:
        return any(r.delta_m is not None for r in self.rows)

    @property
    def delta_m_note(self) -> str:
        baselines = sorted({r.delta_m_baseline for r in self.rows if r.delta_m is not None})
        return (
            "Δm (%): mean relative gain of a multi-task row's per-task top-1 over the single-task runs of "
            f"{', '.join(baselines)} on the same tasks, 100/T * sum_t (M_t - S_t) / S_t (Maninis et al. 2019; "
            "MTLoRA). Multi-task rows: one adapter per task trained jointly on one backbone (`vpeft train-multi`); "
            "their params are one task's model (for MTLoRA the shared update and the task's own)."
        )

    @property
    def protocol(self) -> str:
        """One line saying what the accuracies are: protocol, split, epoch selection, epochs, seeds."""
        trained = "train" if self.mode == "tune" else "train+val"
        chosen = "final epoch" if self.selection == "final_epoch" else self.selection.replace("_", " ")
        epochs = "/".join(str(e) for e in self.epochs) or "?"
        seeds = max((r.seeds for r in self.rows), default=1)
        return (f"{self.mode} protocol: trained on {trained}, top-1 on {self.eval_split} at the {chosen} "
                f"(nothing selected on test); {epochs} epoch(s); up to {seeds} seed(s)")  # fmt: skip


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
    from vpeft.multi.train import delta_m

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
        from vpeft.multi.run import multitask_keys

        keys |= multitask_keys(out)
    ignored: dict[str, int] = {}
    runs = collect_runs(out, keys, ignored)
    records = [record for _, record in runs]
    if not records:
        raise FileNotFoundError(f"no finished runs under '{out}/runs'; run `vpeft bench --out {out}` first")
    suite = manifest.get("suite", "")
    dense = [r for r in records if r.get("task_type", "classification") != "classification"]
    if dense:  # segmentation / detection: their own tables (no top-1, no Pareto plot of accuracy)
        from vpeft.report.dense import write_dense_report

        only_dense = len(dense) == len(records)
        dense_paths = write_dense_report(out, dense, suite, manifest.get("model", ""),
                                         "leaderboard" if only_dense else "leaderboard-dense")  # fmt: skip
        if only_dense:
            return dense_paths
        runs = [(p, r) for p, r in runs if r.get("task_type", "classification") == "classification"]
        records = [r for _, r in runs]
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
    paths["markdown"].write_text(markdown)
    paths["csv"].write_text(to_csv(board))
    if html:
        from vpeft.report.html import write_html

        paths["html"] = write_html(board, out / "leaderboard.html", ignored=ignored)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        written = ", ".join(str(p) for p in paths.values())
        raise MissingDependencyError(
            f"wrote {written}; the plots (pareto.png, curves/) need matplotlib: {REPORT_EXTRA_HINT}"
        ) from None
    from vpeft.report.plot import plot_pareto

    paths["plot"] = out / "pareto.png"
    plot_pareto(board, paths["plot"])
    if curves:
        from vpeft.report.curves import plot_task_curves

        paths["curves"] = out / "curves"
        plot_task_curves(runs, paths["curves"], tasks=board.tasks)
    return paths


def _suite_groups(suite: str, records: list[dict[str, Any]]) -> dict[str, list[str]]:
    from vpeft.bench.suites import VTAB1K_GROUPS

    present = {r["task"] for r in records}
    if suite == "vtab1k":
        source = VTAB1K_GROUPS
    elif suite == "mini":
        from vpeft.data.mini import suite_sheet

        source = {}
        for name, info in suite_sheet()["tasks"].items():
            source.setdefault(info["group"], []).append(name)
    else:
        source = {"fgvc": sorted(present)}
    groups = {g: [t for t in ts if t in present] for g, ts in source.items()}
    return {g: ts for g, ts in groups.items() if ts}
