"""The training loop: AdamW on trainable parameters, warm-up + cosine, label smoothing, AMP on CUDA.

One recipe for every method (V-PETL Bench's values as defaults). The trainer never sees test
data: the caller hands it a training set and, optionally, a validation set.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vpeft.api import trainable_parameters
from vpeft.config import option
from vpeft.errors import ConfigError, VPeftError
from vpeft.metrics import top1_correct

CHECKPOINT = "checkpoint.pt"


class TrainingDivergedError(VPeftError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """The training recipe. Defaults: V-PETL Bench's VTAB-1k configs."""

    epochs: int = option(100, "training epochs")
    batch_size: int = option(64, "global batch size (64 for VTAB-1k, 128 for FGVC in V-PETL Bench)")
    lr: float = option(1e-3, "peak learning rate after warm-up")
    weight_decay: float = option(1e-4, "AdamW weight decay (not applied to biases, norms, prompts, SSF scales)")
    warmup_epochs: int = option(10, "linear warm-up epochs")
    warmup_lr: float = option(1e-6, "learning rate at the start of warm-up")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine schedule")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss (0.1 VTAB, 0 FGVC)")
    drop_path: float = option(0.1, "stochastic depth rate of the backbone")
    clip_grad: float | None = option(None, "clip the gradient norm to this value (None: no clipping)")
    seed: int = option(0, "seed of initialisation, data order, dropout")
    amp: str = option("auto", "mixed precision on CUDA: auto (bf16 if supported, else fp16), bf16, fp16, off")
    compile: bool = option(False, "torch.compile the model (CUDA)")
    num_workers: int = option(0, "data-loading worker processes")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    eval_every: int = option(0, "evaluate on the validation split every N epochs (0: only after the last)")

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"amp must be auto, bf16, fp16 or off, got '{self.amp}'")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")

    def __post_init__(self) -> None:
        self.validate()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D tensors (biases, norm and SSF scales/shifts) nor prompts."""
    decay, no_decay = [], []
    for name, p in trainable_parameters(model).items():
        (no_decay if p.ndim <= 1 or "prompt" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up from warmup_lr to lr over ``warmup`` steps, then cosine down to min_lr."""
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_train_mode(model: nn.Module) -> None:
    """train(), but frozen BatchNorms stay in eval mode so their running statistics do not drift."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


@dataclass
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    images_per_s: float
    seconds: float
    val_acc: float | None = None


class Trainer:
    """Trains the trainable parameters of a vpeft model; logs to JSONL (and TensorBoard when installed)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.params = trainable_parameters(model)
        if not self.params:
            raise ConfigError("the model has no trainable parameters; apply a vpeft method first")
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.history: list[EpochStats] = []
        self.train_seconds = 0.0
        self.images_seen = 0
        self._tb = None

    def _amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.cfg.amp == "off":
            return None
        if self.cfg.amp == "fp16" or (self.cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, dataset: Dataset, shuffle: bool, epoch: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            drop_last=False,
        )

    # ------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, epoch: int) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": epoch,
            "trainable": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": [asdict(h) for h in self.history],
            "train_seconds": self.train_seconds,
            "images_seen": self.images_seen,
        }
        tmp = self.out_dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out_dir / CHECKPOINT)

    def _load_checkpoint(self) -> int:
        path = self.out_dir / CHECKPOINT if self.out_dir else None
        if path is None or not path.is_file():
            raise VPeftError(f"--resume: no {CHECKPOINT} in '{self.out_dir}'; run without --resume to start afresh")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if set(state["trainable"]) != set(self.params):
            raise VPeftError(f"{path} was written for another method or model; use a fresh --out folder")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = [EpochStats(**h) for h in state["history"]]
        self.train_seconds, self.images_seen = state["train_seconds"], state["images_seen"]
        return int(state["epoch"]) + 1

    def remove_checkpoint(self) -> None:
        if self.out_dir is not None and (self.out_dir / CHECKPOINT).exists():
            (self.out_dir / CHECKPOINT).unlink()

    # ------------------------------------------------------------ logging

    def _log(self, stats: EpochStats) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(asdict(stats)) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                self._tb = False
        if self._tb:
            for key in ("lr", "train_loss", "train_acc", "val_acc", "images_per_s"):
                value = getattr(stats, key)
                if value is not None:
                    self._tb.add_scalar(key, value, stats.epoch)

    # ------------------------------------------------------------ loops

    def fit(self, train_set: Dataset, val_set: Dataset | None = None, resume: bool = False) -> list[EpochStats]:
        """Train for ``cfg.epochs``; evaluate on ``val_set`` per ``eval_every`` and after the last epoch."""
        cfg = self.cfg
        start = self._load_checkpoint() if resume else 0
        if not resume and self.out_dir is not None and (self.out_dir / "log.jsonl").exists():
            (self.out_dir / "log.jsonl").unlink()
        steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
        total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
        for epoch in range(start, cfg.epochs):
            stats = self._train_epoch(train_set, epoch, steps_per_epoch, total, warmup)
            last = epoch == cfg.epochs - 1
            if val_set is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                stats.val_acc = self.evaluate(val_set)
            self.history.append(stats)
            self._log(stats)
            self._save_checkpoint(epoch)
        return self.history

    def _train_epoch(self, dataset: Dataset, epoch: int, steps_per_epoch: int, total: int, warmup: int) -> EpochStats:
        set_train_mode(self.model)
        loader = self._loader(dataset, shuffle=True, epoch=epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        bar = self._bar(loader, f"epoch {epoch + 1}/{self.cfg.epochs}")
        lr = self.cfg.lr
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total, warmup, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.forward(x)
                loss = self.criterion(logits.float(), y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDivergedError(
                    f"the loss became {loss_value} at epoch {epoch + 1}, step {i + 1}; lower the learning rate "
                    f"(now {lr:.3g}) or set clip_grad"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            n = y.shape[0]
            loss_sum += loss_value * n
            correct += top1_correct(logits.detach(), y)
            seen += n
            elapsed = time.perf_counter() - start
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{seen / elapsed:.0f}"
                )
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.images_seen += seen
        return EpochStats(epoch + 1, lr, loss_sum / max(1, seen), correct / max(1, seen), seen / seconds, seconds)

    def _bar(self, iterable, desc: str):
        if not self.progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> float:
        """Top-1 accuracy (a fraction) on a dataset."""
        self.model.eval()
        correct, seen = 0, 0
        for x, y in self._bar(self._loader(dataset, shuffle=False), "eval"):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.forward(x)
            correct += top1_correct(logits, y)
            seen += y.shape[0]
        return correct / max(1, seen)

    def peak_memory_mb(self) -> tuple[float, str]:
        """Peak memory: CUDA's max allocated on GPU; the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_process_max_rss"
