"""The leaderboard's data types, shared by the tables, the HTML page, the plots and the dense tables.

:mod:`vpeft.report.leaderboard` builds a :class:`Leaderboard` from records; the other modules of the
room render one. Nothing here imports them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import vpeft.methods  # noqa: F401  (registers every method, for their families)
from vpeft.methods.base import registered_methods


def method_families() -> dict[str, str]:
    """Method name -> family (``partial/reparameterization``, ``addition/adapter``, ...) of the registry."""
    return {m.name: m.family for m in registered_methods()}


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
