"""A multi-task run: one backbone, one adapter per task, trained jointly on mixed batches -> one record per task.

How a multi-task run is recorded (so the leaderboard and the record/identity design hold):

- its identity is the list of its tasks' single-run identities (:func:`vpeft.train.identity.run_identity`:
  backbone, weights, method with every option, recipe, data fingerprint, mode, seed), plus the sampling
  rule; its key, ``multitask.run_key``, is shared by the records of all its tasks;
- each task gets its own run folder, ``runs/<method>+multitask/<task>/seed<seed>-<key>/``, with the task's
  adapter (``save_adapter`` of that task's model: for MTLoRA the shared update and its own), the model card,
  the task's own run spec (``config.yaml``), the whole multi-task spec (``multitask.yaml``) and a
  ``result.json`` shaped like a single run's, whose ``run_key`` hashes the shared identity and the task,
  and whose ``multitask`` field names the run, its tasks and the whole model's trainable parameters;
- ``multitask.json`` in the output folder lists the per-task keys of the latest multi-task run of each
  (method, task set, seed), so ``vpeft report`` of a bench folder takes them in beside the sweep's
  single-task runs and shows delta-m (an earlier run of another spec is left out, as a sweep's are).

Training: the one :class:`vpeft.train.trainer.Trainer` over a :class:`MixedBatches` source: every step
draws ``batch_size // tasks`` samples of each task (a seeded order per task and epoch; a task with fewer
samples starts over with a new order), concatenates them into one mixed batch and minimises
:func:`vpeft.multi.multitask_loss` (the sum of the tasks' mean losses) with the recipe (AdamW, no decay on
biases, norms and prompts, warm-up + cosine, the divergence check, AMP and DDP as for any run); an epoch is
the longest task's pass. Then each task is scored on its evaluation split (final epoch; never test for
any choice).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset

from vpeft.api import get_state, make_config
from vpeft.backbones.create import create_backbone
from vpeft.card import write_model_card
from vpeft.config import coerce_fields, option
from vpeft.errors import ConfigError
from vpeft.files import write_json_atomic
from vpeft.methods.base import get_method
from vpeft.metrics import ppt
from vpeft.multi.model import MultiAdapterModel, check_shareable
from vpeft.multi.train import multitask_loss
from vpeft.tasks import DEFAULT_TASK_TYPE, TaskType, get_task_type
from vpeft.train.identity import run_identity, run_key
from vpeft.train.memory import KIND as MEMORY_ESTIMATE_KIND
from vpeft.train.run import (
    RECORD_VERSION,
    RunSpec,
    check_task_splits,
    record_base,
    run_datasets,
    run_splits,
    seed_everything,
)
from vpeft.train.trainer import BatchSource, TrainConfig, Trainer

#: how mixed batches are drawn (part of the identity: another rule is another run)
SAMPLING = "equal_per_task_seeded"
MULTITASK_MANIFEST = "multitask.json"
MODES = ("tune", "final")


@dataclass
class MultiTaskSpec:
    """Everything that defines one multi-task run (the single-run fields, with a list of datasets)."""

    model: str = option("vpeft/vit-mini", "timm model name, or an embedded vpeft/... backbone")
    data: list[str] = option([], "dataset specs, one per task (repeat --data): vtab1k:, fgvc:, folder:, mini:")
    model_args: dict[str, Any] = option({}, "keyword arguments for timm.create_model")
    method: str = option("lora", "registered PEFT method: one adapter per task (mtlora: shared + per-task update)")
    options: dict[str, Any] = option({}, "the method's options (the same for every task)")
    mode: str = option("final", "protocol: tune trains on train, scores val; final trains on train+val, scores test",
                       choices=MODES)  # fmt: skip
    preset: str | None = option(None, "transform preset (default: fgvc for fgvc data, else vtab)",
                                choices=("vtab", "fgvc"))  # fmt: skip
    pretrained: bool = option(True, "start from pretrained weights (hub, file or embedded)")
    pretrained_file: str | None = option(None, "local weights: .safetensors, .pth, or Google .npz")
    skip_bad_images: bool = option(False, "skip images that are missing or cannot be decoded, and count them")
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        coerce_fields(self, "train-multi")
        if len(self.data) < 2:
            raise ConfigError(f"a multi-task run needs two or more tasks (repeat --data), got {len(self.data)}")
        if len(set(self.data)) != len(self.data):
            raise ConfigError(f"a task is given twice in --data {self.data}; give each task once")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")

    def task_spec(self, data: str):
        """The single-run spec of one task: what a single-task baseline of this task would be."""
        return RunSpec(model=self.model, data=data, model_args=self.model_args, method=self.method,
                       options=self.options, mode=self.mode, preset=self.preset, pretrained=self.pretrained,
                       pretrained_file=self.pretrained_file, skip_bad_images=self.skip_bad_images,
                       train=self.train)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _adapter_name(task: str) -> str:
    return task.replace(".", "_") or "task"


def check_method(method: str, options: dict[str, Any]) -> None:
    impl = get_method(method)
    make_config(method, **options)
    check_shareable(method)
    if impl.stage is not None or not impl.single_run:
        raise ConfigError(
            f"method '{method}' reads data before training or needs several runs; train-multi supports "
            "methods that train in one run from their options (lora, mtlora, adapter, ...)"
        )


def run_multitask(spec: MultiTaskSpec, out_dir: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train ``spec`` and write one run folder and record per task under ``out_dir``; returns the records.

    A run whose every task folder already holds a finished record of the same key is not trained again."""
    check_method(spec.method, spec.options)
    out = Path(out_dir)
    tasks = [get_task_type(DEFAULT_TASK_TYPE).load_task(d) for d in spec.data]
    names = [_adapter_name(t.name) for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"two --data tasks have the same name ({[t.name for t in tasks]}); rename one folder")
    for task in tasks:
        check_task_splits(task, spec.mode)
    identity = {
        "record_version": RECORD_VERSION,
        "multitask": True,
        "sampling": SAMPLING,
        "tasks": [run_identity(spec.task_spec(d), t, RECORD_VERSION) for d, t in zip(spec.data, tasks, strict=True)],
    }
    key = run_key(identity)
    seed = spec.train.seed
    folders = {n: out / "runs" / f"{spec.method}+multitask" / t.name / f"seed{seed}-{key}" for n, t in zip(names, tasks, strict=True)}  # fmt: skip
    task_keys = {n: run_key({**identity, "record_task": t.name}) for n, t in zip(names, tasks, strict=True)}
    done = [_read(folders[n] / "result.json") for n in names]
    if all(r is not None and r.get("status") == "ok" and r.get("run_key") == task_keys[n] for r, n in zip(done, names, strict=True)):  # fmt: skip
        return [{**r, "reused": True} for r in done]  # type: ignore[dict-item]
    records = _train(spec, tasks, names, identity, key, task_keys, folders, progress=progress)
    _add_to_manifest(out, key, spec, [r["task"] for r in records], list(task_keys.values()))
    return records


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class MixedBatches(BatchSource):
    """Mixed batches of several tasks: every step draws ``batch_size // tasks`` samples of each task, from a
    seeded order per (task, epoch); a task with fewer samples starts over with a new order. An epoch is the
    longest task's pass. Under torchrun each rank takes its stride of every task's share."""

    def __init__(self, sets: list[Dataset], names: list[str]):
        self.sets, self.names = sets, names

    def per_task(self, batch_size: int) -> int:
        return max(1, batch_size // len(self.sets))

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(math.ceil(len(s) / self.per_task(batch_size)) for s in self.sets)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, rank: int, world: int) -> tuple[Iterable, int]:
        per_task, steps = self.per_task(batch_size), self.steps_per_epoch(batch_size)
        return self._batches(epoch, per_task, steps, seed, rank, world), steps

    def _stream(self, task: int, epoch: int, per_task: int, seed: int) -> Iterator[list[int]]:
        size, cycle = len(self.sets[task]), 0
        while True:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + task * 7_919 + cycle * 104_729)
            order = torch.randperm(size, generator=g).tolist()
            for start in range(0, size, per_task):
                yield order[start : start + per_task]
            cycle += 1

    def _batches(self, epoch: int, per_task: int, steps: int, seed: int, rank: int, world: int) -> Iterator[Any]:
        streams = [self._stream(t, epoch, per_task, seed) for t in range(len(self.sets))]
        for _ in range(steps):
            xs, ys, routing = [], [], []
            for dataset, name, stream in zip(self.sets, self.names, streams, strict=True):
                items = [dataset[i] for i in next(stream)[rank::world]]
                if not items:
                    continue
                xs.append(torch.stack([torch.as_tensor(x) for x, _ in items]))
                ys.append(torch.as_tensor([int(y) for _, y in items]))
                routing += [name] * len(items)
            yield torch.cat(xs), torch.cat(ys), routing


class MixedTasks(TaskType):
    """Joint training of several classification tasks on one :class:`MultiAdapterModel` (not registered: a
    multi-task run composes it): a batch is (inputs, labels, task name per sample), the loss
    :func:`vpeft.multi.multitask_loss` with the recipe's label smoothing."""

    name = "multitask"
    primary_metric = "top1"
    metric_names = ("top1",)

    def batch_size(self, batch: Any) -> int:
        return len(batch[2])

    def training_step(self, model: nn.Module, batch: Any, label_smoothing: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        x, y, routing = batch
        loss_fn = functools.partial(F.cross_entropy, label_smoothing=label_smoothing)
        return multitask_loss(model, x, y, routing, loss_fn=loss_fn)[0], None


def _train(spec, tasks, names, identity, key, task_keys, folders, *, progress: bool) -> list[dict[str, Any]]:
    cfg = spec.train
    seed_everything(cfg.seed)
    backbone = create_backbone(spec.model, tasks[0].num_classes, pretrained=spec.pretrained,
                               pretrained_file=spec.pretrained_file, drop_path_rate=cfg.drop_path,
                               **spec.model_args)  # fmt: skip
    mm = MultiAdapterModel(backbone)
    for name, task in zip(names, tasks, strict=True):
        mm.add_adapter(name, spec.method, num_classes=task.num_classes, **spec.options)
    classification = get_task_type(DEFAULT_TASK_TYPE)
    sets = [run_datasets(spec.task_spec(d), classification, classification.options(), t, mm.backbone)
            for d, t in zip(spec.data, tasks, strict=True)]  # fmt: skip
    started = time.perf_counter()
    trainer = Trainer(mm, cfg, progress=progress, task_type=MixedTasks())
    history = trainer.fit(MixedBatches([train for train, _ in sets], names))
    mm.eval()
    total_params = sum(p.numel() for k, p in mm.trainable_parameters().items() if not _is_head(mm, k))
    records = []
    for name, task, (_, eval_set), data in zip(names, tasks, sets, spec.data, strict=True):
        model = mm.get_adapter(name)
        task_spec = spec.task_spec(data)
        scorer = Trainer(model, TrainConfig(epochs=1, warmup_epochs=0, batch_size=cfg.batch_size,
                                            device=cfg.device), progress=False)  # fmt: skip
        metrics = scorer.evaluate(eval_set)
        base = record_base(task_spec, task, model, classification, classification.options())
        memory, memory_kind = trainer.peak_memory_mb()
        record = {
            **base,
            "status": "ok",
            "run_key": task_keys[name],
            "identity": identity,
            "multitask": {
                "run_key": key,
                "tasks": [t.name for t in tasks],
                "sampling": SAMPLING,
                "trainable_params_total": total_params,
            },
            "eval_split": run_splits(spec.mode)[1],
            "selection": "final_epoch",
            "selected_epoch": history[-1].epoch,
            "metrics": metrics,
            "metric_names": list(metrics),
            **metrics,
            "score": metrics["top1"],
            "ppt": ppt(metrics["top1"] / 100.0, base["trainable_params"]),
            "train_seconds": trainer.train_seconds,
            "compile_seconds": trainer.compile_seconds,
            "wall_seconds": time.perf_counter() - started,
            "images_per_s": trainer.images_seen / max(trainer.train_seconds, 1e-9),
            "peak_memory_mb": memory,
            "memory_kind": memory_kind,
            "memory_estimate_mb": trainer.memory_estimate_mb,
            "memory_estimate_kind": MEMORY_ESTIMATE_KIND,
            "final_train_loss": history[-1].train_loss,  # the joint loss (sum of the tasks' mean losses)
            "device": str(trainer.device),
            "world_size": trainer.dist.world,
        }
        folder = folders[name]
        if trainer.dist.is_main:
            mm.save_adapter(name, folder)
            # the task's own run spec (what `vpeft eval` reads: its data and mode), and the whole multi-task spec
            (folder / "config.yaml").write_text(yaml.safe_dump(task_spec.to_dict(), sort_keys=False))
            (folder / "multitask.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
            write_model_card(folder, record, tag=classification.hub_tag)
            write_json_atomic(folder / "result.json", record)  # last: the record marks the task finished
        records.append(record)
    return records


def _is_head(mm: MultiAdapterModel, key: str) -> bool:
    adapter, _, pname = key.partition(".")
    if adapter == "shared":
        return False
    return get_state(mm.get_adapter(adapter)).anatomy.is_head_param(pname)


def _add_to_manifest(out: Path, key: str, spec: MultiTaskSpec, tasks: list[str], keys: list[str]) -> None:
    path = out / MULTITASK_MANIFEST
    manifest = _read(path) or {}
    # the latest run of a method on a task set and seed is the one the report shows (as a sweep's manifest
    # names its runs): an earlier one with another recipe or options stays on disk, out of the table
    same = lambda r: (r.get("method"), r.get("tasks"), r.get("seed")) == (spec.method, tasks, spec.train.seed)  # noqa: E731
    runs = [r for r in manifest.get("runs", []) if isinstance(r, dict) and r.get("run_key") != key and not same(r)]
    runs.append({"run_key": key, "method": spec.method, "tasks": tasks, "task_run_keys": keys, "seed": spec.train.seed})
    write_json_atomic(path, {"runs": runs})


def multitask_keys(out_dir: str | Path) -> set[str]:
    """The per-task run keys of every multi-task run recorded in ``out_dir/multitask.json``."""
    manifest = _read(Path(out_dir) / MULTITASK_MANIFEST) or {}
    return {k for r in manifest.get("runs", []) if isinstance(r, dict) for k in r.get("task_run_keys", [])}
