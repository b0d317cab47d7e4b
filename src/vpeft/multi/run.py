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

Training: every step draws ``batch_size // tasks`` samples of each task (tasks with fewer batches start
over), concatenates them into one mixed batch and minimises :func:`vpeft.multi.multitask_loss` (the sum
of the tasks' mean losses) with AdamW and the recipe's warm-up + cosine schedule; an epoch is the
longest task's pass. Then each task is scored on its evaluation split (final epoch; never test for
any choice).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

import vpeft
from vpeft.backbones.create import create_backbone
from vpeft.config import coerce_fields, option
from vpeft.errors import ConfigError
from vpeft.metrics import ppt
from vpeft.multi.model import NOT_SHAREABLE, MultiAdapterModel
from vpeft.multi.train import multitask_loss
from vpeft.train.trainer import TrainConfig

#: how mixed batches are drawn (part of the identity: another rule is another run)
SAMPLING = "equal_per_task"
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
        from vpeft.train.run import RunSpec

        return RunSpec(model=self.model, data=data, model_args=self.model_args, method=self.method,
                       options=self.options, mode=self.mode, preset=self.preset, pretrained=self.pretrained,
                       pretrained_file=self.pretrained_file, skip_bad_images=self.skip_bad_images,
                       train=self.train)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _adapter_name(task: str) -> str:
    return task.replace(".", "_") or "task"


def check_method(method: str, options: dict[str, Any]) -> None:
    impl = vpeft.get_method(method)
    vpeft.make_config(method, **options)
    if method in NOT_SHAREABLE:
        raise ConfigError(f"method '{method}' cannot share a backbone: {NOT_SHAREABLE[method]}")
    if impl.stage is not None or not impl.single_run:
        raise ConfigError(
            f"method '{method}' reads data before training or needs several runs; train-multi supports "
            "methods that train in one run from their options (lora, mtlora, adapter, ...)"
        )


def run_multitask(spec: MultiTaskSpec, out_dir: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train ``spec`` and write one run folder and record per task under ``out_dir``; returns the records.

    A run whose every task folder already holds a finished record of the same key is not trained again."""
    from vpeft.data import load_task
    from vpeft.train.identity import run_identity, run_key
    from vpeft.train.run import RECORD_VERSION, check_task_splits

    check_method(spec.method, spec.options)
    out = Path(out_dir)
    tasks = [load_task(d) for d in spec.data]
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


def _train(spec, tasks, names, identity, key, task_keys, folders, *, progress: bool) -> list[dict[str, Any]]:
    from vpeft.card import write_model_card
    from vpeft.train.run import _datasets, _record_options, git_commit, seed_everything, write_json_atomic
    from vpeft.train.trainer import Trainer, lr_at, resolve_device

    cfg = spec.train
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    backbone = create_backbone(spec.model, tasks[0].num_classes, pretrained=spec.pretrained,
                               pretrained_file=spec.pretrained_file, drop_path_rate=cfg.drop_path,
                               **spec.model_args)  # fmt: skip
    mm = MultiAdapterModel(backbone)
    for name, task in zip(names, tasks, strict=True):
        mm.add_adapter(name, spec.method, num_classes=task.num_classes, **spec.options)
    mm.to(device)
    sets = [_datasets(spec.task_spec(d), t, mm.backbone) for d, t in zip(spec.data, tasks, strict=True)]
    per_task = max(1, cfg.batch_size // len(tasks))
    generator = torch.Generator().manual_seed(cfg.seed)
    loaders = [torch.utils.data.DataLoader(train, batch_size=per_task, shuffle=True, generator=generator,
                                           num_workers=cfg.num_workers) for train, _ in sets]  # fmt: skip
    steps = max(len(loader) for loader in loaders)
    total, warmup = steps * cfg.epochs, steps * cfg.warmup_epochs
    params = mm.trainable_parameters()
    decay = [p for p in params.values() if p.ndim > 1]
    no_decay = [p for p in params.values() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)  # fmt: skip
    loss_fn = functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
    started, images = time.perf_counter(), 0
    last_losses: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        mm.train()
        iters = [iter(loader) for loader in loaders]
        sums = {n: torch.zeros((), device=device) for n in names}
        for step in range(steps):
            xs, ys, routing = [], [], []
            for t, name in enumerate(names):
                try:
                    x, y = next(iters[t])
                except StopIteration:  # a shorter task starts over
                    iters[t] = iter(loaders[t])
                    x, y = next(iters[t])
                xs.append(x)
                ys.append(torch.as_tensor(y))
                routing += [name] * len(x)
            x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + step, total, warmup, cfg)
            loss, losses = multitask_loss(mm, x, y, routing, loss_fn=loss_fn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip_grad)
            optimizer.step()
            images += len(routing)
            for name, value in losses.items():
                sums[name] += value.detach()
        last_losses = {n: float(s) / steps for n, s in sums.items()}
        if not all(math.isfinite(v) for v in last_losses.values()):
            raise ConfigError(f"the multi-task run diverged in epoch {epoch + 1} (losses {last_losses}); lower --lr")
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{n} loss {v:.4f}" for n, v in last_losses.items()))
    train_seconds = time.perf_counter() - started
    mm.eval()
    total_params = sum(p.numel() for k, p in params.items() if not _is_head(mm, k))
    records = []
    eval_split = "val" if spec.mode == "tune" else "test"
    for name, task, (_, eval_set), data in zip(names, tasks, sets, spec.data, strict=True):
        model = mm.get_adapter(name)
        scorer = Trainer(model, TrainConfig(epochs=1, warmup_epochs=0, batch_size=cfg.batch_size,
                                            device=cfg.device), progress=False)  # fmt: skip
        accuracy = scorer.evaluate(eval_set)
        state = vpeft.get_state(model)
        trainable = vpeft.count_trainable(model, include_head=False)
        record = {
            "record_version": identity["record_version"],
            "status": "ok",
            "method": spec.method,
            "options": _record_options(state.config.to_dict()),
            "model": spec.model,
            "architecture": state.identity["architecture"],
            "weights": {"pretrained": spec.pretrained, "digest": state.identity["weights"]},
            "task": task.name,
            "data": data,
            "num_classes": task.num_classes,
            "seed": cfg.seed,
            "mode": spec.mode,
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "wd": cfg.weight_decay,
            "train": dataclasses.asdict(cfg),
            "train_size": len(task.split("train" if spec.mode == "tune" else "trainval")),
            "trainable_params": trainable,
            "trainable_params_with_head": vpeft.count_trainable(model, include_head=True),
            "total_params": vpeft.count_parameters(model),
            "run_key": task_keys[name],
            "identity": identity,
            "multitask": {
                "run_key": key,
                "tasks": [t.name for t in tasks],
                "sampling": SAMPLING,
                "trainable_params_total": total_params,
            },
            "eval_split": eval_split,
            "selection": "final_epoch",
            "selected_epoch": cfg.epochs,
            "top1": 100.0 * accuracy,
            "ppt": ppt(accuracy, trainable),
            "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - started,
            "images_per_s": images / max(train_seconds, 1e-9),
            "peak_memory_mb": scorer.peak_memory_mb()[0],
            "memory_kind": scorer.peak_memory_mb()[1],
            "final_train_loss": last_losses.get(name),
            "device": str(device),
            "world_size": 1,
            "versions": {"vpeft": vpeft.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "git_commit": git_commit(),
            "host": platform.node(),
        }
        folder = folders[name]
        mm.save_adapter(name, folder)
        # the task's own run spec (what `vpeft eval` reads: its data and mode), and the whole multi-task spec
        (folder / "config.yaml").write_text(yaml.safe_dump(spec.task_spec(data).to_dict(), sort_keys=False))
        (folder / "multitask.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        write_model_card(folder, record)
        write_json_atomic(folder / "result.json", record)  # last: the record marks the task finished
        records.append(record)
    return records


def _is_head(mm: MultiAdapterModel, key: str) -> bool:
    adapter, _, pname = key.partition(".")
    if adapter == "shared":
        return False
    return vpeft.get_state(mm.get_adapter(adapter)).anatomy.is_head_param(pname)


def _add_to_manifest(out: Path, key: str, spec: MultiTaskSpec, tasks: list[str], keys: list[str]) -> None:
    from vpeft.train.run import write_json_atomic

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
