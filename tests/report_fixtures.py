"""Fake bench folders for the report tests: result records and log.jsonl files, no training."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TASKS = {"natural": ["cifar", "dtd"], "specialized": ["eurosat"], "structured": ["clevr_count", "dsprites_loc"]}
#: method -> (trainable params without head, accuracy offset)
METHODS = {
    "linear": (0, -8.0), "bitfit": (102_000, -3.0), "ln_tune": (38_000, -3.5), "partial_k": (7_100_000, -6.0),
    "lora": (294_000, 1.5), "ssf": (207_000, 1.0), "fact_tt": (68_000, 1.2), "adapter": (160_000, 0.4),
    "adaptformer": (160_000, 0.6), "vpt_shallow": (77_000, -4.0), "vpt_deep": (557_000, -1.0),
    "prefix": (590_000, -2.5), "lst": (2_380_000, -0.5), "full": (85_800_000, -5.0),
}  # fmt: skip


def record(method: str, task: str, seed: int, top1: float, params: int, **extra: Any) -> dict[str, Any]:
    """A finished final-protocol result.json as `vpeft bench` writes it (the fields the report reads)."""
    return {"status": "ok", "method": method, "task": task, "seed": seed, "top1": top1, "trainable_params": params,
            "mode": "final", "model": "vit_base_patch16_224", "train_seconds": 10.0 + seed, "epochs": 3,
            "selection": "final_epoch", "eval_split": "test", "peak_memory_mb": 1000.0 + seed,
            "memory_kind": "cpu_process_max_rss", "run_key": f"k{abs(hash((method, task, seed))) % 10**8:08d}",
            "identity": {"method": method, "options": {"rank": 8}, "task": task, "train": {"lr": 1e-3, "seed": seed}},
            **extra}  # fmt: skip


def log_lines(epochs: int, seed: int, final_acc: float) -> list[dict[str, Any]]:
    """log.jsonl entries: one per epoch, loss falling and accuracy rising."""
    rng = random.Random(seed)
    return [{"epoch": e, "lr": 1e-3 * (1 - e / (epochs + 1)), "train_loss": 2.0 / e + rng.random() * 0.05,
             "train_acc": final_acc / 100 * e / epochs, "images_per_s": 200.0, "seconds": 1.5, "val_acc": None}
            for e in range(1, epochs + 1)]  # fmt: skip


def make_bench(out: Path, methods: dict[str, tuple[int, float]] | None = None, seeds: tuple[int, ...] = (0, 1),
               suite: str = "", epochs: int = 3, **extra: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Write runs/<method>/<task>/seed<k>-<key>/{result.json,log.jsonl} (and bench.json with ``suite``)."""
    records = []
    for m_i, (method, (params, offset)) in enumerate((methods or METHODS).items()):
        for g_i, tasks in enumerate(TASKS.values()):
            for t_i, task in enumerate(tasks):
                for seed in seeds:
                    # the 1/10ths make float sums like 46.400000000000006 appear in an unrounded mean
                    top1 = 60.0 + offset + 5 * g_i - 2 * t_i + 0.7 * seed + 0.1 * ((m_i + t_i) % 3)
                    r = record(method, task, seed, top1, params, epochs=epochs, **extra)
                    folder = out / "runs" / method / task / f"seed{seed}-{r['run_key']}"
                    folder.mkdir(parents=True)
                    (folder / "result.json").write_text(json.dumps(r))
                    (folder / "log.jsonl").write_text(
                        "".join(json.dumps(line) + "\n" for line in log_lines(epochs, seed, top1))
                    )
                    records.append(r)
    if suite:
        (out / "bench.json").write_text(json.dumps({"suite": suite, "model": "vit_base_patch16_224", "mode": "final",
            "runs": [{"run_key": r["run_key"], "method": r["method"], "task": r["task"], "seed": r["seed"]}
                     for r in records]}))  # fmt: skip
    return records
