"""Per-run training curves from each run folder's ``log.jsonl`` (one JSON object per epoch)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vpeft.files import atomic_write

#: the keys of one epoch's line of log.jsonl
LOG_KEYS = ("epoch", "lr", "train_loss", "train_acc", "images_per_s", "seconds", "val_acc")


def read_log(folder: str | Path) -> list[dict[str, Any]]:
    """The epochs of ``folder/log.jsonl`` in order; unreadable lines are skipped, a missing file gives []."""
    path = Path(folder) / "log.jsonl"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    epochs = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("epoch"), int):
            epochs.append(entry)
    by_epoch = {e["epoch"]: e for e in epochs}  # a resumed run may log an epoch twice: the last one counts
    return [by_epoch[k] for k in sorted(by_epoch)]


def _pct(value: Any) -> float | None:
    return 100.0 * float(value) if isinstance(value, (int, float)) else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def plot_task_curves(runs: list[tuple[Path, dict[str, Any]]], out_dir: str | Path,
                     tasks: list[str] | None = None) -> dict[str, Path]:  # fmt: skip
    """One PNG per task in ``out_dir``: train loss, and train / val accuracy (%), against epoch, a line per run.

    ``runs``: (run folder, record) pairs, as :func:`vpeft.report.leaderboard.collect_runs` gives. A
    method keeps one colour on every task; its seeds share it. Returns task -> PNG path (tasks whose
    runs have no log are left out).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for _, r in runs))
    cmap = plt.get_cmap("tab20")
    colour = {m: cmap(i % 20) for i, m in enumerate(methods)}
    order = tasks or list(dict.fromkeys(r["task"] for _, r in runs))
    written: dict[str, Path] = {}
    for task in order:
        mine = [(folder, r, read_log(folder)) for folder, r in runs if r["task"] == task]
        mine = [(f, r, log) for f, r, log in mine if log]
        if not mine:
            continue
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
        labelled: set[str] = set()
        for _, record, log in sorted(mine, key=lambda t: (methods.index(t[1]["method"]), t[1].get("seed", 0))):
            method = record["method"]
            label = method if method not in labelled else None
            labelled.add(method)
            epochs = [e["epoch"] for e in log]
            style = {"color": colour[method], "marker": "o", "markersize": 3, "linewidth": 1.2, "alpha": 0.9}
            ax_loss.plot(epochs, [e.get("train_loss") for e in log], label=label, **style)
            ax_acc.plot(epochs, [_pct(e.get("train_acc")) for e in log], label=label, **style)
            val = [_pct(e.get("val_acc")) for e in log]
            if any(v is not None for v in val):
                ax_acc.plot(epochs, val, linestyle="--", **{**style, "marker": "s"})
        ax_loss.set_title(f"{task}: train loss")
        ax_acc.set_title(f"{task}: accuracy (%) — solid train, dashed val")
        for ax in (ax_loss, ax_acc):
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_acc.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        path = out / f"{_safe(task)}.png"
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        plt.close(fig)
        written[task] = path
    return written
