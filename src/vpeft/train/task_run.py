"""One run of a task type other than classification (segmentation, detection), through the TaskType interface.

The same protocol, folders, identity, locking and resume as a classification run (:mod:`vpeft.train.run`):
``tune`` trains on train and scores val, ``final`` trains on train + val and scores test (read once, after
training). The recipe is the run's :class:`TrainConfig` (AdamW, no decay on biases, norms and prompts;
linear warm-up), with the task options' schedule (poly by default) and warm-up steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

import vpeft
from vpeft.errors import ConfigError
from vpeft.tasks.base import TaskOptions, TaskType, backbone_of, get_task_type, head_state, save_task_model
from vpeft.train.memory import KIND as MEMORY_ESTIMATE_KIND
from vpeft.train.memory import SavedTensorBytes, step_memory_mb
from vpeft.train.trainer import (
    CHECKPOINT,
    NAN_CHECK_EVERY,
    EpochStats,
    ShardedShuffle,
    TrainConfig,
    TrainingDivergedError,
    checkpoint_state,
    distributed_from_env,
    optimizer_step,
    read_checkpoint,
    resolve_device,
    restore_checkpoint,
    set_train_mode,
    write_checkpoint,
)


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig, options: TaskOptions) -> float:
    """Linear warm-up from warmup_lr to lr, then poly (``(1 - t) ** power``) or cosine down to min_lr."""
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if getattr(options, "schedule", "poly") == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress) ** getattr(options, "poly_power", 1.0)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as for classification: no decay on 1-D tensors (biases, norms, scales) nor prompts."""
    decay, no_decay = [], []
    for name, p in trainable(model).items():
        (no_decay if p.ndim <= 1 or "prompt" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TaskTrainer:
    """Trains a task model's trainable parameters (method, pyramid, head); checkpoints each epoch."""

    def __init__(self, task_type: TaskType, model: nn.Module, cfg: TrainConfig, options: TaskOptions,
                 out_dir: Path | None = None, progress: bool = True,
                 on_epoch: Callable[[EpochStats], None] | None = None):  # fmt: skip
        if distributed_from_env().world > 1:
            raise ConfigError(f"{task_type.name} runs train in one process; run them without torchrun")
        self.task_type, self.cfg, self.options, self.out_dir = task_type, cfg, options, out_dir
        self.progress, self.on_epoch = progress, on_epoch
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.params = trainable(self.model)
        if not self.params:
            raise ConfigError("the task model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.amp_dtype = None
        if self.device.type == "cuda" and cfg.amp != "off":
            bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported())
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
        self.history: list[EpochStats] = []
        self.memory_estimate_mb: float | None = None
        self.train_seconds = 0.0
        self.images_seen = 0

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loader(self, dataset: Dataset, shuffle: bool, epoch: int = 0) -> DataLoader:
        sampler = ShardedShuffle(len(dataset), self.cfg.seed, epoch, shuffle=shuffle)
        workers = self.cfg.num_workers
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=self.task_type.collate, pin_memory=self.device.type == "cuda")  # fmt: skip

    # ------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, epoch: int) -> None:
        if self.out_dir is None:
            return
        state = checkpoint_state(self, epoch)
        state["head"] = head_state(self.model)  # norm statistics of the head and pyramid too
        write_checkpoint(self.out_dir, state)

    def _load_checkpoint(self) -> int:
        state = read_checkpoint(self.out_dir, self.params)
        self.model.load_state_dict(state["head"], strict=False)
        return restore_checkpoint(self, state)

    def remove_checkpoint(self) -> None:
        if self.out_dir is not None and (self.out_dir / CHECKPOINT).exists():
            (self.out_dir / CHECKPOINT).unlink()

    # ------------------------------------------------------------ loops

    def fit(self, train_set: Dataset, val_set: Dataset | None = None, resume: bool = False,
            evaluate: Callable[[Dataset], dict[str, float]] | None = None) -> list[EpochStats]:  # fmt: skip
        cfg = self.cfg
        start = self._load_checkpoint() if resume else 0
        if not resume and self.out_dir is not None and (self.out_dir / "log.jsonl").exists():
            (self.out_dir / "log.jsonl").unlink()
        steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        warmup = self.options.warmup_iters if getattr(self.options, "warmup_iters", -1) >= 0 else None
        warmup = min(total, warmup if warmup is not None else cfg.warmup_epochs * steps_per_epoch)
        self.last_metrics: dict[str, float] | None = None
        for epoch in range(start, cfg.epochs):
            stats = self._train_epoch(train_set, epoch, steps_per_epoch, total, warmup)
            last = epoch == cfg.epochs - 1
            if (
                val_set is not None
                and evaluate is not None
                and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0))
            ):
                self.last_metrics = evaluate(val_set)
                stats.val_acc = self.last_metrics[self.task_type.primary_metric] / 100.0
            self.history.append(stats)
            self._save_checkpoint(epoch)  # before the callbacks: an interrupted run resumes after this epoch
            self._log(stats)
        return self.history

    def _train_epoch(self, dataset: Dataset, epoch: int, steps_per_epoch: int, total: int, warmup: int) -> EpochStats:
        set_train_mode(self.model)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        window = torch.zeros((), dtype=torch.float32, device=self.device)
        seen, lr, started = 0, self.cfg.lr, time.perf_counter()
        loader = self.loader(dataset, shuffle=True, epoch=epoch)
        bar = loader
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total, warmup, self.cfg, self.options)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.task_type.batch_to(batch, self.device)
            n = self.task_type.batch_size(batch)
            measure = self.memory_estimate_mb is None and not self.cfg.compile  # hooks would break a compiled graph
            saved = SavedTensorBytes() if measure else contextlib.nullcontext()
            with self._autocast(), saved:
                loss = self.task_type.loss(self.forward_model, batch)
            if isinstance(saved, SavedTensorBytes):
                self.memory_estimate_mb = step_memory_mb(self.model, saved.total)
            detached = loss.detach()
            window += detached
            if step == 0 or (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == steps_per_epoch:
                if not bool(torch.isfinite(window)):
                    raise TrainingDivergedError(
                        f"the loss became {window.item()} at epoch {epoch + 1}, step {i + 1}; lower the learning "
                        "rate or set clip_grad"
                    )
                window.zero_()
            optimizer_step(loss, self.optimizer, self.scaler, self.params, self.cfg.clip_grad)
            loss_sum += detached.double() * n
            seen += n
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.images_seen += seen
        return EpochStats(epoch + 1, lr, loss_sum.item() / max(1, seen), float("nan"), seen / max(seconds, 1e-9),
                          seconds)  # fmt: skip

    def _log(self, stats: EpochStats) -> None:
        line = f"epoch {stats.epoch}/{self.cfg.epochs} | loss {stats.train_loss:.4f}"
        if stats.val_acc is not None:
            line += f" | val {self.task_type.primary_metric} {100 * stats.val_acc:.2f}"
        line += f" | {stats.images_per_s:.0f} img/s | lr {stats.lr:.3g} | {stats.seconds:.1f}s"
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({k: v for k, v in asdict(stats).items() if k != "train_acc"}) + "\n")
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(line)
        if self.on_epoch is not None:
            self.on_epoch(stats)

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, **kwargs: Any) -> dict[str, float]:
        self.model.eval()
        batches = (self.task_type.batch_to(b, self.device) for b in self.loader(dataset, shuffle=False))
        with self._autocast():
            return self.task_type.evaluate(self.model, batches, **kwargs)

    def peak_memory_mb(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_process_max_rss"


# ---------------------------------------------------------------- the run


def build_task_model(spec: Any, task_type: TaskType, num_classes: int, options: TaskOptions) -> nn.Module:
    """Backbone without classifier (seeded), the method applied, the task's head on top."""
    from vpeft.train.run import build_backbone

    impl = vpeft.get_method(spec.method)
    if impl.stage is not None or impl.standalone_stage(vpeft.make_config(spec.method, **spec.options)) is not None:
        raise ConfigError(
            f"method '{spec.method}' chooses what to train from classification data (a data stage); "
            f"it does not run on {task_type.name} tasks yet"
        )
    backbone = build_backbone(spec, 0)
    vpeft.apply(backbone, spec.method, **spec.options)
    return task_type.build(backbone, num_classes, options)


def train_task(spec: Any, task: Any, model: nn.Module, identity: dict[str, Any], key: str, out: Path, work: Path,
               *, resume: bool, progress: bool,
               on_epoch: Callable[[EpochStats], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train, score, save adapter + head, write the record (the task-type counterpart of classification's)."""
    from vpeft.train.folders import RESULT, commit_staged
    from vpeft.train.run import _record_base, write_json_atomic

    task_type = get_task_type(spec.task_type)
    options = task_type.options(spec.task_options)
    train_split, eval_split = ("train", "val") if spec.mode == "tune" else ("trainval", "test")
    train_set = task_type.dataset(task, train_split, model, options, train=True)
    eval_set = task_type.dataset(task, eval_split, model, options, train=False)
    started = time.time()
    trainer = TaskTrainer(task_type, model, spec.train, options, work, progress=progress, on_epoch=on_epoch)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    backbone = backbone_of(model)[1]
    base = {**_record_base(spec, task, backbone), "run_key": key, "identity": identity}
    num_classes = spec.num_classes or task.num_classes
    method_params = vpeft.count_trainable(backbone, include_head=False)
    with_head = sum(p.numel() for p in trainable(model).values())
    base.update({
        "task_type": task_type.name, "task_options": options.to_dict(), "primary_metric": task_type.primary_metric,
        "num_classes": num_classes, "trainable_params": method_params, "trainable_params_with_head": with_head,
        "head_params": with_head - method_params, "total_params": sum(p.numel() for p in model.parameters()),
    })  # fmt: skip
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    mode = task_type.inference_mode(task, options) if hasattr(task_type, "inference_mode") else None
    kwargs = {"mode": mode} if mode is not None else {}
    try:
        history = trainer.fit(train_set, eval_set if spec.mode == "tune" else None, resume=resume,
                              evaluate=lambda d: trainer.evaluate(d, **kwargs))  # fmt: skip
    except TrainingDivergedError as exc:
        write_json_atomic(work / RESULT, {**base, "status": "failed", "error": str(exc)})
        raise
    metrics = (
        trainer.last_metrics if spec.mode == "tune" and trainer.last_metrics else trainer.evaluate(eval_set, **kwargs)
    )
    memory, memory_kind = trainer.peak_memory_mb()
    record = {
        **base,
        "status": "ok",
        "eval_split": eval_split,
        "selection": "final_epoch",
        "selected_epoch": history[-1].epoch,
        "metrics": metrics,
        "metric_names": [m for m in task_type.metric_names if m in metrics],
        **metrics,
        "score": metrics[task_type.primary_metric],
        "inference": mode,
        "train_seconds": trainer.train_seconds,
        "wall_seconds": time.time() - started,
        "images_per_s": trainer.images_seen / max(trainer.train_seconds, 1e-9),
        "peak_memory_mb": memory,
        "memory_kind": memory_kind,
        "memory_estimate_mb": trainer.memory_estimate_mb,
        "memory_estimate_kind": MEMORY_ESTIMATE_KIND,
        "final_train_loss": history[-1].train_loss,
        "device": str(trainer.device),
        "world_size": 1,
    }
    save_task_model(model, work, task_type.name, num_classes, options)
    trainer.remove_checkpoint()
    if work != out:
        commit_staged(work, out)
    write_json_atomic(out / RESULT, record)
    return record
