"""Model cards: a README.md beside each trained adapter, in the Hugging Face Hub's format.

YAML front matter (library, base model, tags, metrics) that the Hub and :func:`read_model_card`
parse, then a short human-readable summary: method, backbone identity, task, protocol, accuracy and
trainable parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vpeft.files import write_text_atomic

CARD = "README.md"


def model_card(record: dict[str, Any], tag: str = "image-classification") -> str:
    """The card's text for a finished run's record; ``tag``: the Hub's pipeline tag of its task type."""
    split = record.get("eval_split", "test")
    metric = record.get("primary_metric", "top1")
    score = record.get(metric, record.get("score", float("nan")))
    shown = f"{score:.2f}%" if metric == "top1" else f"{score:.2f}"
    meta = {
        "library_name": "vpeft",
        "base_model": record.get("model"),
        "tags": ["vpeft", "peft", tag, str(record.get("method"))],
        "vpeft": {
            "method": record.get("method"),
            "options": record.get("options", {}),
            "architecture": record.get("architecture"),
            "weights_digest": (record.get("weights") or {}).get("digest"),
            "task": record.get("task"),
            "num_classes": record.get("num_classes"),
            "protocol": {
                "mode": record.get("mode"),
                "eval_split": split,
                "selection": record.get("selection"),
                "seed": record.get("seed"),
                "epochs": record.get("epochs"),
            },
            metric: score,
            "trainable_params": record.get("trainable_params"),
            "run_key": record.get("run_key"),
        },
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {record.get('method')} adapter for `{record.get('model')}` on {record.get('task')}",
        "",
        f"Trained with [vpeft](https://pypi.org/project/vpeft/) ({record.get('mode')} protocol: "
        f"{'train -> val' if record.get('mode') == 'tune' else 'train+val -> test'}, final epoch, seed "
        f"{record.get('seed')}).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| {'top-1' if metric == 'top1' else metric} on {split} | {shown} |",
        f"| trainable parameters (without head) | {record.get('trainable_params', 0):,} |",
        f"| backbone architecture | {record.get('architecture')} |",
        "",
        "Load it onto the same backbone:",
        "",
        "```python",
        "import timm, vpeft",
        f"model = timm.create_model({record.get('model')!r}, num_classes={record.get('num_classes')})",
        "vpeft.load_adapter(model, '<this folder>')",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, record: dict[str, Any], tag: str = "image-classification") -> Path:
    path = Path(folder) / CARD
    write_text_atomic(path, model_card(record, tag))
    return path


def read_model_card(path: str | Path) -> dict[str, Any]:
    """The card's front matter as a dict (a folder or the README.md itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD
    text = path.read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no YAML front matter")
    front, _, _ = text[4:].partition("\n---\n")
    data = yaml.safe_load(front)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the front matter is not a mapping")
    return data
