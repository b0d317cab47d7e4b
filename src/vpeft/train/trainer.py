"""The training loop of every task type: AdamW on trainable parameters, warm-up + schedule, AMP on CUDA.

One recipe for every method (V-PETL Bench's values as defaults). The trainer never sees test
data: the caller hands it a training set and, optionally, a validation set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vpeft.api import get_state
from vpeft.backbones.registry import describe
from vpeft.config import coerce_fields, option
from vpeft.errors import ConfigError, VPeftError
from vpeft.methods.base import StageData, set_stage_trainer
from vpeft.tasks import DEFAULT_TASK_TYPE, Schedule, TaskOptions, TaskType, get_task_type
from vpeft.train.batches import DeviceBatches
from vpeft.train.memory import SavedTensorBytes, step_memory_mb

CHECKPOINT = "checkpoint.pt"
#: steps between two checks that the loss is finite (each check is one host synchronisation)
NAN_CHECK_EVERY = 20


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
    amp: str = option(
        "auto", "mixed precision: auto (CUDA: bf16 if supported, else fp16; CPU: none), bf16 (CUDA or CPU), "
        "fp16 (CUDA), off",
        choices=("auto", "bf16", "fp16", "off"),
    )  # fmt: skip
    compile: bool = option(False, "torch.compile the model (CUDA)")
    num_workers: int = option(0, "data-loading worker processes")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    eval_every: int = option(0, "evaluate on the validation split every N epochs (0: only after the last)")

    def validate(self) -> None:
        """Refuse values that would crash later or train silently wrong; each message names the flag."""

        def bad(flag: str, rule: str, value: Any) -> ConfigError:
            return ConfigError(f"--{flag} (training option '{flag.replace('-', '_')}') {rule}, got {value!r}")

        if self.epochs < 1:
            raise bad("epochs", "must be >= 1", self.epochs)
        if self.batch_size < 1:
            raise bad("batch-size", "must be >= 1", self.batch_size)
        if not self.lr > 0:
            raise bad("lr", "must be > 0", self.lr)
        if self.weight_decay < 0:
            raise bad("wd", "must be >= 0", self.weight_decay)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"--warmup-epochs {self.warmup_epochs} exceeds --epochs {self.epochs} (the warm-up default is 10); "
                f"pass --warmup-epochs between 0 and {self.epochs}"
            )
        if not self.warmup_lr >= 0:
            raise bad("warmup-lr", "must be >= 0 (the rate the warm-up starts from)", self.warmup_lr)
        if not self.min_lr >= 0:
            raise bad("min-lr", "must be >= 0 (the rate the cosine schedule ends at)", self.min_lr)
        if not 0 <= self.label_smoothing < 1:
            raise bad("label-smoothing", "must be in [0, 1)", self.label_smoothing)
        if not 0 <= self.drop_path < 1:
            raise bad("drop-path", "must be in [0, 1) (a probability)", self.drop_path)
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise bad(
                "clip-grad", "must be > 0 (a gradient-norm limit; leave it unset for no clipping)", self.clip_grad
            )
        if not 0 <= self.seed < 2**32:
            raise bad("seed", "must be in [0, 2**32)", self.seed)
        if self.num_workers < 0:
            raise bad("num-workers", "must be >= 0 (0 loads data in the training process)", self.num_workers)
        if self.eval_every < 0:
            raise bad("eval-every", "must be >= 0 (0: evaluate only after the last epoch)", self.eval_every)
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise bad("amp", "must be auto, bf16, fp16 or off", self.amp)
        check_device(self.device)

    def __post_init__(self) -> None:
        coerce_fields(self, "train")
        self.validate()


def check_device(name: str) -> None:
    """Refuse a device name torch does not know, or CUDA on a machine without it, with the fix."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"--device '{name}' is not supported; use auto, cpu, cuda or cuda:N")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name (a vpeft model's method and head; a task model's head too)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D tensors (biases, norm and SSF scales/shifts) nor prompts."""
    decay, no_decay = [], []
    for name, p in trainable(model).items():
        (no_decay if p.ndim <= 1 or "prompt" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig, schedule: Schedule | None = None) -> float:
    """Linear warm-up from warmup_lr to lr over ``warmup`` steps, then ``schedule`` (cosine by default,
    or poly ``(1 - t) ** power``) down to min_lr."""
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule is not None and schedule.kind == "poly":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress) ** schedule.power
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (world 1 without one)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    return Distributed(
        int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    )


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun set up: nccl on CUDA, gloo on CPU."""
    dist = distributed_from_env()
    if dist.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed_from_env().local_rank)
        return torch.device("cpu")
    return torch.device(name)


class ShardedShuffle(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, strided over ranks: rank r takes positions r, r + world, ...

    With per-rank batches of B / world, the union of the ranks' i-th batches is exactly the i-th
    batch of B of a single process using the same permutation, so a torchrun run and a 1-process
    run with the same global batch and seed see the same batches.
    """

    def __init__(self, size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.size, self.seed, self.epoch, self.rank, self.world, self.shuffle = size, seed, epoch, rank, world, shuffle

    def _order_for_rank(self) -> list[int]:
        return self._order()[self.rank :: self.world]

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self):
        return iter(self._order()[self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


def set_train_mode(model: nn.Module) -> None:
    """train(), but frozen BatchNorms stay in eval mode so their running statistics do not drift."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _is_cnn(model: nn.Module) -> bool:
    state = get_state(model)
    try:
        return "conv" in (state.anatomy if state is not None else describe(model)).parts
    except VPeftError:  # an architecture the anatomy does not know (a task model): leave its memory format alone
        return False


def format_epoch(stats: EpochStats, epochs: int, metric: str = "top1") -> str:
    """One line per epoch: what a person watching a run wants to read."""
    line = f"epoch {stats.epoch}/{epochs} | loss {stats.train_loss:.4f}"
    if stats.train_acc is not None:
        line += f" | train acc {100 * stats.train_acc:.2f}%"
    if stats.val_acc is not None:
        line += (
            f" | val acc {100 * stats.val_acc:.2f}%"
            if metric == "top1"
            else f" | val {metric} {100 * stats.val_acc:.2f}"
        )
    return line + f" | {stats.images_per_s:.0f} img/s | lr {stats.lr:.3g} | {stats.seconds:.1f}s"


@dataclass
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    #: training accuracy (a fraction) where the task type counts correct predictions, else None
    train_acc: float | None
    images_per_s: float
    seconds: float
    #: the primary validation metric as a fraction (top-1, mIoU / 100, ...), when evaluated
    val_acc: float | None = None


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any,
                   params: dict[str, nn.Parameter], clip_grad: float | None) -> None:  # fmt: skip
    """One optimisation step: zero the gradients, backward (through the fp16 grad scaler when there is one),
    clip the trainable parameters' gradient norm if asked, step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(list(params.values()), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def checkpoint_state(trainer: Any, epoch: int) -> dict[str, Any]:
    """What resuming a trainer needs after ``epoch``: trainable tensors, optimizer, RNG, history, counters.

    The model's saved buffers come too: BatchNorm statistics of heads, pyramids and methods move in training."""
    return {
        "epoch": epoch,
        "trainable": {n: p.detach().cpu() for n, p in trainer.params.items()},
        "optimizer": trainer.optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if trainer.device.type == "cuda" else [],
        "history": [asdict(h) for h in trainer.history],
        "train_seconds": trainer.train_seconds,
        "images_seen": trainer.images_seen,
        "buffers": _persistent_buffers(trainer.model),
    }


def write_checkpoint(out_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``out_dir/checkpoint.pt`` atomically (a kill leaves the previous checkpoint whole)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / CHECKPOINT)


def read_checkpoint(out_dir: Path | None, params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """Load ``out_dir/checkpoint.pt`` with ``weights_only`` and check it holds exactly ``params``."""
    path = out_dir / CHECKPOINT if out_dir else None
    if path is None or not path.is_file():
        raise VPeftError(f"--resume: no {CHECKPOINT} in '{out_dir}'; run without --resume to start afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, or holds pickled objects that weights_only refuses
        raise VPeftError(
            f"{path} cannot be loaded safely ({type(exc).__name__}: {str(exc)[:200]}); it is damaged or not a "
            "vpeft checkpoint. Start afresh with --overwrite"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("trainable"), dict):
        raise VPeftError(f"{path} is not a vpeft checkpoint; start afresh with --overwrite")
    if set(state["trainable"]) != set(params):
        raise VPeftError(f"{path} was written for another method or model; use a fresh --out folder")
    return state


def restore_checkpoint(trainer: Any, state: dict[str, Any]) -> int:
    """Put a :func:`read_checkpoint` state back into ``trainer``; returns the epoch to continue from."""
    with torch.no_grad():
        for n, p in trainer.params.items():
            p.copy_(state["trainable"][n])
    trainer.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    trainer.history = [EpochStats(**h) for h in state["history"]]
    trainer.train_seconds, trainer.images_seen = state["train_seconds"], state["images_seen"]
    return int(state["epoch"]) + 1


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's saved buffers (BatchNorm statistics of heads, pyramids and methods), by state_dict name."""
    names = {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


class Trainer:
    """Trains the trainable parameters of a model for a task type; logs to JSONL (and TensorBoard when installed).

    The one training loop of vpeft: every task type (classification, segmentation, detection...) and
    multi-task training. The task type supplies the loss of a batch, the evaluation, the collate function
    and the schedule after warm-up; the trainer supplies AdamW, warm-up + schedule, AMP, DDP under torchrun,
    ``torch.compile``, device-held batches where the split allows, clipping, the divergence check,
    checkpoints and resume, the per-epoch line and memory figures.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        progress: bool = True,
        on_epoch: Callable[[EpochStats], None] | None = None,
        *,
        task_type: TaskType | None = None,
        options: TaskOptions | None = None,
        eval_kwargs: dict[str, Any] | None = None,
    ):
        """``progress``: a live bar per epoch and one kept line per epoch; ``on_epoch``: called with each epoch's
        stats; ``task_type`` (classification by default) with its ``options``; ``eval_kwargs`` for its evaluate."""
        self.cfg = cfg
        self.task_type = task_type or get_task_type(DEFAULT_TASK_TYPE)
        self.options = options if options is not None else self.task_type.options()
        self.schedule = self.task_type.lr_schedule(self.options)
        self.eval_kwargs = dict(eval_kwargs or {})
        self.on_epoch = on_epoch
        self.memory_estimate_mb: float | None = None
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if cfg.batch_size % self.dist.world:
            raise ConfigError(
                f"batch_size {cfg.batch_size} (the global batch) is not divisible by the {self.dist.world} processes"
            )
        self.model = model.to(self.device)
        self.channels_last = self.device.type == "cuda" and _is_cnn(model)  # faster convolutions on tensor cores
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.params = trainable(model)
        if not self.params:
            raise ConfigError("the model has no trainable parameters; apply a vpeft method first")
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.compile_seconds: float | None = None
        self._device_sets: dict[int, tuple[Dataset, DeviceBatches | None]] = {}
        self._loaders: dict[tuple[int, bool], tuple[Dataset, DataLoader]] = {}
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.train_forward: nn.Module | Callable[[Any], Any] = self.model
        if self.dist.world > 1:  # DDP buckets hold only parameters that require grad: the trainable ones
            self.train_forward = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task_type.find_unused_parameters,
            )
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if cfg.compile:
            self.train_forward = torch.compile(self.train_forward)
        self.history: list[EpochStats] = []
        self.last_metrics: dict[str, float] | None = None
        self.train_seconds = 0.0
        self.images_seen = 0
        self._tb = None

    def _amp_dtype(self) -> torch.dtype | None:
        """CUDA: bf16 where supported (auto), else fp16; CPU: bf16 when asked for (``amp: bf16``), else none."""
        if self.cfg.amp == "off":
            return None
        if self.device.type != "cuda":
            return torch.bfloat16 if self.cfg.amp == "bf16" and self.device.type == "cpu" else None
        if self.cfg.amp == "fp16" or (self.cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, dataset: Dataset, shuffle: bool, epoch: int = 0) -> DataLoader:
        """Training: this rank's share of a seeded shuffle, per-rank batch = global batch / world.
        Evaluation: every rank reads the whole split in order (the numbers are identical on every rank).

        One loader per split for the whole fit, its sampler moved to each epoch, so worker processes
        persist. On CUDA, a split that is streamed (augmented, or not held in memory) gets workers by
        default (``num_workers`` 0 means: half the CPU cores, at most 8) and pinned memory.
        """
        key = (id(dataset), shuffle)
        if key not in self._loaders:
            world, rank = (self.dist.world, self.dist.rank) if shuffle else (1, 0)
            workers = self.cfg.num_workers
            if workers == 0 and self.device.type == "cuda":
                workers = min(8, max(1, (os.cpu_count() or 2) // 2))
            sampler = ShardedShuffle(len(dataset), self.cfg.seed, epoch, rank, world, shuffle)
            loader = DataLoader(
                dataset,
                batch_size=self.cfg.batch_size // world,
                sampler=sampler,
                num_workers=workers,
                collate_fn=self.task_type.collate,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                drop_last=False,
            )
            self._loaders[key] = (dataset, loader)
        loader = self._loaders[key][1]
        loader.sampler.epoch = epoch
        return loader

    # ------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, epoch: int) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        write_checkpoint(self.out_dir, checkpoint_state(self, epoch))

    def _load_checkpoint(self) -> int:
        state = read_checkpoint(self.out_dir, self.params)
        buffers = state.get("buffers", state.get("head"))  # "head": the dense trainer's checkpoints
        if isinstance(buffers, dict):
            self.model.load_state_dict(buffers, strict=False)
        return restore_checkpoint(self, state)

    def remove_checkpoint(self) -> None:
        if self.out_dir is not None and (self.out_dir / CHECKPOINT).exists():
            (self.out_dir / CHECKPOINT).unlink()

    # ------------------------------------------------------------ logging

    def _log(self, stats: EpochStats) -> None:
        if self.out_dir is None or not self.dist.is_main:
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

    def steps_per_epoch(self, train_set: Any) -> int:
        """Optimisation steps in one epoch of ``train_set`` (a batch source says so itself)."""
        if isinstance(train_set, BatchSource):
            return train_set.steps_per_epoch(self.cfg.batch_size)
        return math.ceil(len(train_set) / self.cfg.batch_size)

    def fit(self, train_set: Dataset | BatchSource, val_set: Dataset | None = None,
            resume: bool = False) -> list[EpochStats]:  # fmt: skip
        """Train for ``cfg.epochs``; evaluate on ``val_set`` per ``eval_every`` and after the last epoch
        (its metrics in :attr:`last_metrics`). ``train_set`` is a dataset of the task type, or a
        :class:`BatchSource` that draws its own batches (multi-task mixed batches)."""
        cfg = self.cfg
        start = self._load_checkpoint() if resume else 0
        if not resume and self.dist.is_main and self.out_dir is not None and (self.out_dir / "log.jsonl").exists():
            (self.out_dir / "log.jsonl").unlink()
        steps_per_epoch = self.steps_per_epoch(train_set)
        total = cfg.epochs * steps_per_epoch
        warmup = self.schedule.warmup_steps
        warmup = min(total, warmup if warmup is not None else cfg.warmup_epochs * steps_per_epoch)
        for epoch in range(start, cfg.epochs):
            stats = self._train_epoch(train_set, epoch, steps_per_epoch, total, warmup)
            last = epoch == cfg.epochs - 1
            if val_set is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                self.last_metrics = self.evaluate(val_set)
                stats.val_acc = self.last_metrics[self.task_type.primary_metric] / 100.0
            self.history.append(stats)
            self._save_checkpoint(epoch)  # before the callbacks: an interrupted run resumes after this epoch
            self._log(stats)
            self._report_epoch(stats)
        return self.history

    def _batches(self, dataset: Any, shuffle: bool, epoch: int = 0) -> tuple[Iterable, int]:
        """This rank's batches of an epoch: drawn by a batch source itself, gathered on the device when the
        split is held in memory, else a DataLoader. Training: a seeded shuffle strided over ranks;
        evaluation: the whole split in order."""
        world, rank = (self.dist.world, self.dist.rank) if shuffle else (1, 0)
        if isinstance(dataset, BatchSource):
            return dataset.epoch_batches(epoch, self.cfg.batch_size, self.cfg.seed, rank, world)
        per_rank = self.cfg.batch_size // world
        if id(dataset) not in self._device_sets:  # the dataset is kept with it, so its id stays its own
            self._device_sets[id(dataset)] = (dataset, DeviceBatches.from_dataset(dataset, self.device))
        held = self._device_sets[id(dataset)][1]
        if held is None:
            loader = self._loader(dataset, shuffle, epoch)
            return loader, len(loader)
        order = torch.tensor(ShardedShuffle(len(dataset), self.cfg.seed, epoch, rank, world, shuffle)._order_for_rank())
        steps = math.ceil(order.numel() / per_rank)
        return held.batches(order, per_rank, pad=self.cfg.compile), steps

    def _train_epoch(self, dataset: Any, epoch: int, steps_per_epoch: int, total: int, warmup: int) -> EpochStats:
        """One epoch. Loss and correct counts stay on the device; finiteness is checked every
        ``NAN_CHECK_EVERY`` steps (one host sync) instead of every step."""
        set_train_mode(self.model)
        batches, n_steps = self._batches(dataset, shuffle=True, epoch=epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        counted = False  # whether the task type counts correct predictions
        window = torch.zeros((), dtype=torch.float32, device=self.device)  # loss sum since the last check
        seen, checked = 0, 0
        start = time.perf_counter()
        bar = self._bar(batches, f"epoch {epoch + 1}/{self.cfg.epochs}", total=n_steps)
        lr = self.cfg.lr
        task = self.task_type
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total, warmup, self.cfg, self.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = task.batch_to(batch, self.device, self.channels_last)
            valid = task.batch_size(batch)
            measure = self.memory_estimate_mb is None and not self.cfg.compile  # hooks would break the compiled graph
            saved = SavedTensorBytes() if measure else contextlib.nullcontext()
            first_compiled = self.cfg.compile and self.compile_seconds is None
            step_start = time.perf_counter()
            with self._autocast(), saved:
                loss, hits = task.training_step(self.train_forward, batch, self.cfg.label_smoothing)
            if isinstance(saved, SavedTensorBytes):
                self.memory_estimate_mb = step_memory_mb(self.model, saved.total)
            detached = loss.detach()
            window += detached
            if step == 0 or (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == n_steps:
                self._check_finite(window, epoch, checked, i, step)
                window.zero_()
                checked = i + 1
            optimizer_step(loss, self.optimizer, self.scaler, self.params, self.cfg.clip_grad)
            if first_compiled:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.compile_seconds = time.perf_counter() - step_start  # the first step compiles the graph
            loss_sum += detached.double() * valid
            if hits is not None:
                correct += hits
                counted = True
            seen += valid
            if hasattr(bar, "set_postfix") and checked == i + 1:  # the values are on the host at a check only
                elapsed = time.perf_counter() - start
                postfix = {"loss": f"{loss_sum.item() / seen:.3f}", "img_s": f"{seen / elapsed:.0f}"}
                if counted:
                    postfix["acc"] = f"{correct.item() / seen:.3f}"
                bar.set_postfix(**postfix)
        seconds = time.perf_counter() - start
        if self.cfg.compile and epoch == 0 and self.compile_seconds:
            seconds = max(seconds - self.compile_seconds, 1e-9)  # compile time is reported apart
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=self.device).double()])
        if self.dist.world > 1:  # epoch statistics over the global batch
            torch.distributed.all_reduce(totals)
        loss_total, correct_total, seen_total = totals.tolist()
        seen_total = int(seen_total)
        self.train_seconds += seconds
        self.images_seen += seen_total
        accuracy = correct_total / max(1, seen_total) if counted else None
        return EpochStats(epoch + 1, lr, loss_total / max(1, seen_total), accuracy, seen_total / seconds, seconds)

    def _check_finite(self, window: torch.Tensor, epoch: int, first: int, last: int, step: int) -> None:
        """One host sync: stop every rank together when a loss since the last check was not finite."""
        finite = torch.isfinite(window)
        if self.dist.world > 1:  # every rank stops together, none waits in an all-reduce
            flag = finite.float().reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag[0] > 0
        if bool(finite):
            return
        value = window.item()
        if step == 0:
            raise TrainingDivergedError(
                f"the loss was {value} at the very first step, before any update: the model's output is not "
                "finite at initialisation; check the method's options, the backbone weights and the input data"
            )
        where = f"step {last + 1}" if first == last else f"steps {first + 1}-{last + 1}"
        raise TrainingDivergedError(
            f"the loss became {value} at epoch {epoch + 1}, {where}; lower the learning rate or set clip_grad"
        )

    def _report_epoch(self, stats: EpochStats) -> None:
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(format_epoch(stats, self.cfg.epochs, self.task_type.primary_metric))
        if self.on_epoch is not None and self.dist.is_main:
            self.on_epoch(stats)

    def _bar(self, iterable, desc: str, total: int | None = None):
        if not self.progress or not self.dist.is_main:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, **kwargs: Any) -> dict[str, float]:
        """Every metric of the task type on a dataset (percentages; classification: ``top1``)."""
        self.model.eval()
        batches, n_steps = self._batches(dataset, shuffle=False)
        moved = (
            self.task_type.batch_to(b, self.device, self.channels_last) for b in self._bar(batches, "eval", n_steps)
        )
        with self._autocast():
            return self.task_type.evaluate(self.forward, moved, **{**self.eval_kwargs, **kwargs})

    def peak_memory_mb(self) -> tuple[float, str]:
        """Peak memory: CUDA's max allocated on GPU; the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_process_max_rss"


class BatchSource:
    """A training set that draws its own batches (multi-task mixed batches): the trainer asks it for an
    epoch's batches instead of sampling a dataset."""

    def steps_per_epoch(self, batch_size: int) -> int:
        raise NotImplementedError

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, rank: int, world: int) -> tuple[Iterable, int]:
        """(this rank's batches of ``epoch``, their count): the same for a seed and epoch on every call."""
        raise NotImplementedError


def fit_stage(model: nn.Module, data: StageData, epochs: int, lr: float) -> None:
    """Train ``model``'s trainable parameters on a stage's split (a method stage that trains, such as E2VPT's
    pruning): this trainer, classification loss, constant ``lr``, no warm-up, nothing written."""
    cfg = TrainConfig(epochs=epochs, batch_size=data.batch_size, lr=lr, weight_decay=0.0, warmup_epochs=0,
                      min_lr=lr, label_smoothing=0.0, drop_path=0.0, seed=data.seed,
                      device=str(data.device))  # fmt: skip
    Trainer(model, cfg, progress=False).fit(data.dataset)


set_stage_trainer(fit_stage)
