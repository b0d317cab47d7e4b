"""Leaderboard of the runs of every task type but classification (segmentation, detection, any type registered
later): one table per task, grouped by task type, with the task type's metrics (mean and std over seeds; the
columns come from the task type registry's ``metric_names``) and trainable parameters, head parameters, peak
memory and time.

Published V-PETL Bench numbers are shown beside ours only where the setting matches: the ``ade20k``
suite (UperNet on Swin-L, 160k iterations; the published runs come from Mona's mmseg fork).
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from vpeft.errors import ConfigError
from vpeft.files import write_text_atomic
from vpeft.report.board import MEMORY_KINDS, method_families
from vpeft.tasks import TaskType, get_task_type

#: V-PETL Bench README, ADE20K mIoU (UperNet, Swin-L, 160k iterations); vpeft method names
PUBLISHED_ADE20K = {"full": 52.10, "linear": 46.84, "bitfit": 48.37, "ln_tune": 47.98, "partial_k": 47.44,
                    "adapter": 50.78, "lora": 50.34, "adaptformer": 50.83, "lorand": 50.76, "e3va": 49.64,
                    "mona": 51.36}  # fmt: skip


def registered_task_type(name: str) -> TaskType | None:
    """The task type registry's entry for a record's ``task_type``, or None for a type not registered here."""
    try:
        return get_task_type(name)
    except ConfigError:
        return None


def _metrics(records: list[dict[str, Any]]) -> list[str]:
    """The metric columns: each task type's ``metric_names`` that the records hold, in the registry's order,
    then any other metric the records name (result.json stores its keys sorted)."""
    present = {name for r in records for name in r.get("metrics", {})}
    names: list[str] = []
    for type_name in dict.fromkeys(str(r.get("task_type", "")) for r in records):
        task_type = registered_task_type(type_name)
        names += [n for n in (task_type.metric_names if task_type else ()) if n in present]
    for r in records:
        names += [*r.get("metric_names", []), *r.get("metrics", {})]
    return list(dict.fromkeys(names))


def _primary(records: list[dict[str, Any]]) -> str:
    """The metric a task's rows rank by: the records' ``primary_metric``, else their task type's."""
    if records and records[0].get("primary_metric"):
        return str(records[0]["primary_metric"])
    task_type = registered_task_type(str(records[0].get("task_type", ""))) if records else None
    return task_type.primary_metric if task_type else ""


def _stat(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def dense_tables(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Task -> rows (one per method, best primary metric first); the tasks of one task type together."""
    families = method_families()
    tables: dict[str, list[dict[str, Any]]] = {}
    by_type = {
        t: [r for r in records if r.get("task_type", "") == t]
        for t in dict.fromkeys(r.get("task_type", "") for r in records)
    }
    for task in dict.fromkeys(r["task"] for mine in by_type.values() for r in mine):
        mine = [r for r in records if r["task"] == task]
        primary = _primary(mine)
        rows = []
        for method in dict.fromkeys(r["method"] for r in mine):
            runs = [r for r in mine if r["method"] == method]
            row: dict[str, Any] = {"method": method, "family": families.get(method, ""), "seeds": len(runs),
                                   "task_type": runs[0].get("task_type", ""), "primary_metric": primary}  # fmt: skip
            for name in _metrics(runs):
                row[name] = _stat([float(r["metrics"][name]) for r in runs if name in r.get("metrics", {})])
            row["params"] = statistics.fmean(r["trainable_params"] for r in runs)
            row["head_params"] = statistics.fmean(r.get("head_params", 0) for r in runs)
            row["peak_memory_mb"] = max(r.get("peak_memory_mb", 0.0) for r in runs)
            row["memory_kind"] = "; ".join(sorted({str(r["memory_kind"]) for r in runs if r.get("memory_kind")}))
            estimates = [r["memory_estimate_mb"] for r in runs if isinstance(r.get("memory_estimate_mb"), (int, float))]
            row["memory_estimate_mb"] = max(estimates) if estimates else None
            row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
            row["images_per_s"] = statistics.fmean(r.get("images_per_s", 0.0) for r in runs)
            rows.append(row)
        rows.sort(key=lambda row: -(row.get(primary) or (float("-inf"), None))[0])
        tables[task] = rows
    return tables


def _cell(stat: tuple[float, float | None] | None) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def dense_markdown(records: list[dict[str, Any]], suite: str = "", model: str = "") -> str:
    tables = dense_tables(records)
    kinds = {r.get("memory_kind", "") for r in records}
    memory = "; ".join(MEMORY_KINDS.get(k, k) for k in sorted(kinds) if k) or "peak memory"
    mode = records[0].get("mode", "final")
    split = records[0].get("eval_split", "test")
    out = [f"# V-PEFT Bench (dense): {suite or 'results'} suite, {model or records[0].get('model', '')}, "
           f"{mode} protocol\n"]  # fmt: skip
    out.append(f"Scores on {split} at the final epoch (nothing selected on test); trainable parameters exclude the "
               f"dense head (head = UPerNet head + ViT pyramid, trained in every row). Peak MB: {memory}; step MB "
               "(est.): parameters + autograd-saved tensors + grads + AdamW state of one training step.\n")  # fmt: skip
    for task, rows in tables.items():
        metrics = _metrics([r for r in records if r["task"] == task])
        task_type = rows[0]["task_type"] if rows else ""
        header = ["method", *metrics, "trainable (M)", "head (M)", "peak MB", "step MB (est.)", "train s", "img/s",
                  "seeds"]  # fmt: skip
        published = suite == "ade20k" and task == "ade20k"
        if published:
            header.insert(1 + len(metrics), "V-PETL mIoU (Swin-L, published)")
        out.append(f"\n## {task} ({task_type})\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            cells = [row["method"], *(_cell(row.get(m)) for m in metrics)]
            if published:
                value = PUBLISHED_ADE20K.get(row["method"])
                cells.append(f"{value:.2f}" if value is not None else "-")
            estimate = row["memory_estimate_mb"]
            cells += [f"{row['params'] / 1e6:.3f}", f"{row['head_params'] / 1e6:.3f}", f"{row['peak_memory_mb']:.0f}",
                      "-" if estimate is None else f"{estimate:.0f}", f"{row['train_seconds']:.1f}",
                      f"{row['images_per_s']:.0f}", str(row["seeds"])]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def dense_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    metrics = _metrics(records)
    writer.writerow(["task", "task_type", "method", *(f"{m}_{s}" for m in metrics for s in ("mean", "std")),
                     "params", "head_params", "peak_memory_mb", "memory_kind", "train_seconds", "images_per_s",
                     "seeds", "family"])  # fmt: skip
    for task, rows in dense_tables(records).items():
        for row in rows:
            values = []
            for m in metrics:
                mean, std = row.get(m) or (None, None)
                values += [None if mean is None else round(mean, 2), None if std is None else round(std, 2)]
            writer.writerow([task, row["task_type"], row["method"], *values, round(row["params"]),
                             round(row["head_params"]), round(row["peak_memory_mb"], 1), row["memory_kind"],
                             round(row["train_seconds"], 1), round(row["images_per_s"], 1), row["seeds"],
                             row["family"]])  # fmt: skip
    return buf.getvalue()


def write_dense_report(out: Path, records: list[dict[str, Any]], suite: str, model: str, stem: str) -> dict[str, Path]:
    paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv"}
    write_text_atomic(paths["markdown"], dense_markdown(records, suite, model))
    write_text_atomic(paths["csv"], dense_csv(records))
    return paths
