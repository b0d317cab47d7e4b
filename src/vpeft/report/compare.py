"""``vpeft compare RUN_A RUN_B``: two run folders' options, metrics and curves side by side."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpeft.files import atomic_write
from vpeft.report.curves import read_log

#: the metrics compared, in order: (record key, label, format)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("status", "status", "s"),
    ("top1", "top-1 (%)", ".2f"),
    ("eval_split", "evaluated on", "s"),
    ("trainable_params", "trainable params (no head)", ",d"),
    ("ppt", "PPT", ".4f"),
    ("final_train_loss", "final train loss", ".4f"),
    ("train_seconds", "train seconds", ".1f"),
    ("images_per_s", "images/s", ".1f"),
    ("peak_memory_mb", "peak MB", ".0f"),
    ("memory_kind", "memory kind", "s"),
    ("memory_estimate_mb", "est. MB", ".0f"),
    ("selected_epoch", "epoch evaluated", "d"),
)
#: stands for an option one run does not have (another method's option), as opposed to a None value
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
#: run facts that are not options but can explain a difference
ENVIRONMENT = ("device", "world_size", "feature_cache", "git_commit", "versions")


@dataclass
class Run:
    """One run folder as read for a comparison."""

    folder: Path
    record: dict[str, Any]  # result.json ({} while the run is unfinished)
    options: dict[str, Any]  # the run's spec, flattened to dotted keys
    environment: dict[str, Any]
    log: list[dict[str, Any]]  # log.jsonl, one entry per epoch

    @property
    def name(self) -> str:
        r = self.record or {}
        label = "/".join(str(r[k]) for k in ("method", "task") if r.get(k))
        return f"{label} seed{r['seed']}" if label and "seed" in r else label or self.folder.name


@dataclass
class Comparison:
    """What :func:`compare_runs` found: differing options, the options in common, metrics, curves."""

    a: Run
    b: Run
    differing: list[tuple[str, Any, Any]] = field(default_factory=list)  # (option, value in a, in b) or MISSING
    same: list[tuple[str, Any]] = field(default_factory=list)
    environment: list[tuple[str, Any, Any]] = field(default_factory=list)  # facts that differ
    metrics: list[tuple[str, Any, Any]] = field(default_factory=list)  # (label, a, b)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: value}


def load_run(folder: str | Path) -> Run:
    """Read a run folder (or its result.json): the record, its resolved options and its log."""
    path = Path(folder)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"no run folder '{path}'")
    record: dict[str, Any] = {}
    if (path / "result.json").is_file():
        try:
            loaded = json.loads((path / "result.json").read_text())
            record = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            record = {}
    spec: dict[str, Any] = {}
    if isinstance(record.get("identity"), dict):
        spec = record["identity"]  # every option, defaults resolved
    elif (path / "config.yaml").is_file():
        import yaml

        try:
            loaded = yaml.safe_load((path / "config.yaml").read_text())
            spec = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            spec = {}
    if not record and not spec:
        raise FileNotFoundError(f"'{path}' holds no result.json or config.yaml: not a vpeft run folder")
    environment = {k: record[k] for k in ENVIRONMENT if k in record}
    return Run(path, record, _flatten(spec), _flatten(environment), read_log(path))


def compare_runs(run_a: str | Path | Run, run_b: str | Path | Run) -> Comparison:
    """Compare two run folders: which options differ, the options in common, and the metrics side by side."""
    a = run_a if isinstance(run_a, Run) else load_run(run_a)
    b = run_b if isinstance(run_b, Run) else load_run(run_b)
    cmp = Comparison(a, b)
    for key in sorted(set(a.options) | set(b.options)):
        va, vb = a.options.get(key, MISSING), b.options.get(key, MISSING)
        if va is not MISSING and vb is not MISSING and va == vb:
            cmp.same.append((key, va))
        else:
            cmp.differing.append((key, va, vb))
    for key in sorted(set(a.environment) | set(b.environment)):
        va, vb = a.environment.get(key), b.environment.get(key)
        if va != vb:
            cmp.environment.append((key, va, vb))
    for key, label, _ in METRICS:
        if key in a.record or key in b.record:
            cmp.metrics.append((label, a.record.get(key), b.record.get(key)))
    return cmp


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if spec and spec != "s" and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return format(value, spec)
        except ValueError:
            return format(value, ".4g")
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _option(value: Any) -> str:
    return "(absent)" if value is MISSING else "None" if value is None else _fmt(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, columns padded to their widest cell; ``(none)`` for no rows."""
    if not rows:
        return ["(none)"]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def format_comparison(cmp: Comparison, all_options: bool = False) -> str:
    """The comparison as Markdown: differing options, metrics with the difference, per-epoch curves."""
    a, b = cmp.a, cmp.b
    lines = [f"A: {a.name}  ({a.folder})", f"B: {b.name}  ({b.folder})", ""]
    lines += [f"## Options that differ ({len(cmp.differing)} of {len(cmp.differing) + len(cmp.same)})", ""]
    lines += _table(["option", "A", "B"], [[k, _option(va), _option(vb)] for k, va, vb in cmp.differing])
    if all_options:
        lines += ["", "## Options in common", ""]
        lines += _table(["option", "value"], [[k, _option(v)] for k, v in cmp.same])
    if cmp.environment:
        lines += ["", "## Run environment that differs", ""]
        lines += _table(["fact", "A", "B"], [[k, _fmt(va), _fmt(vb)] for k, va, vb in cmp.environment])
    lines += ["", "## Metrics", ""]
    spec = {label: fmt for _, label, fmt in METRICS}
    rows = []
    for label, va, vb in cmp.metrics:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        delta = _fmt(vb - va, spec[label] if spec[label] != ",d" else "+,d") if numeric else ""
        if numeric and delta and not delta.startswith(("-", "+")):
            delta = "+" + delta
        rows.append([label, _fmt(va, spec[label]), _fmt(vb, spec[label]), delta])
    lines += _table(["metric", "A", "B", "B - A"], rows)
    lines += ["", "## Curves (per epoch)", ""]
    epochs = sorted({e["epoch"] for e in a.log} | {e["epoch"] for e in b.log})
    by_a, by_b = {e["epoch"]: e for e in a.log}, {e["epoch"]: e for e in b.log}

    def val(log: dict[int, dict[str, Any]], epoch: int, key: str, scale: float = 1.0, spec: str = ".4f") -> str:
        v = log.get(epoch, {}).get(key)
        return _fmt(v * scale, spec) if isinstance(v, (int, float)) else "-"

    rows = [
        [str(ep), val(by_a, ep, "train_loss"), val(by_b, ep, "train_loss"), val(by_a, ep, "train_acc", 100, ".2f"),
         val(by_b, ep, "train_acc", 100, ".2f"), val(by_a, ep, "val_acc", 100, ".2f"),
         val(by_b, ep, "val_acc", 100, ".2f"), val(by_a, ep, "lr", spec=".3g"), val(by_b, ep, "lr", spec=".3g")]
        for ep in epochs
    ]  # fmt: skip
    lines += _table(["epoch", "A loss", "B loss", "A train acc", "B train acc", "A val acc", "B val acc", "A lr",
                     "B lr"], rows)  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_comparison(cmp: Comparison, path: str | Path) -> Path:
    """Both runs' train loss and accuracy curves side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
    for run, tag, colour in ((cmp.a, "A", "#0072B2"), (cmp.b, "B", "#D55E00")):
        epochs = [e["epoch"] for e in run.log]
        label = f"{tag}: {run.name}"
        ax_loss.plot(epochs, [e.get("train_loss") for e in run.log], "o-", color=colour, label=label, markersize=3)
        ax_acc.plot(epochs, [100 * e["train_acc"] if isinstance(e.get("train_acc"), (int, float)) else None
                             for e in run.log], "o-", color=colour, label=f"{label} train", markersize=3)  # fmt: skip
        val = [100 * e["val_acc"] if isinstance(e.get("val_acc"), (int, float)) else None for e in run.log]
        if any(v is not None for v in val):
            ax_acc.plot(epochs, val, "s--", color=colour, label=f"{label} val", markersize=3)
    ax_loss.set_title("train loss")
    ax_acc.set_title("accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
