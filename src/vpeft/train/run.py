"""One run of the protocol: a backbone, a method, a task, a seed -> an adapter and a result record.

Protocol modes (VPT / V-PETL Bench):
- ``tune``: train on ``train`` (train800), report accuracy on ``val`` (val200); used to pick lr/wd.
- ``final``: train on ``trainval`` (train800val200), report ``test`` accuracy of the final epoch.
Nothing is ever chosen on test data: test images are read once, after training ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml

from vpeft.api import apply as apply_method
from vpeft.api import (
    count_parameters,
    count_trainable,
    get_state,
    load_adapter,
    make_config,
    read_adapter_config,
    save_adapter,
)
from vpeft.backbones.create import create_backbone
from vpeft.backbones.registry import describe
from vpeft.card import write_model_card
from vpeft.config import coerce_fields, option
from vpeft.data import DataError
from vpeft.errors import AdapterMismatchError, ConfigError, VPeftError
from vpeft.files import write_json_atomic
from vpeft.hub import resolve_adapter
from vpeft.methods.base import MethodConfig, StageContext, StageData, get_method
from vpeft.metrics import ppt
from vpeft.tasks import DEFAULT_TASK_TYPE, DataOptions, TaskOptions, TaskType, get_task_type, task_type_names
from vpeft.tasks.base import backbone_of
from vpeft.train.feature_cache import plan_cached_prefix
from vpeft.train.folders import (
    RESULT,
    RunExistsError,
    RunLock,
    commit_staged,
    holds_run,
    read_record,
    remove_stale_temporaries,
    staging_dir,
)
from vpeft.train.identity import file_sha256, identity_diff, run_identity, run_key
from vpeft.train.memory import KIND as MEMORY_ESTIMATE_KIND
from vpeft.train.trainer import (
    CHECKPOINT,
    EpochStats,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    distributed_from_env,
    resolve_device,
    trainable,
)
from vpeft.version import __version__

MODES = ("tune", "final")
#: version of the record layout; part of every run's identity (a new layout never reuses old records)
RECORD_VERSION = 2


@dataclass
class RunSpec:
    """Everything that defines one run. Serialised as ``config.yaml`` in the run folder."""

    model: str = option("vpeft/vit-mini", "timm model name, or an embedded vpeft/... backbone")
    data: str = option("", "dataset spec: vtab1k:<dir>, fgvc:<dir>, folder:<dir>, mini:<task>")
    model_args: dict[str, Any] = option({}, "keyword arguments for timm.create_model (e.g. img_size: 384)")
    method: str = option("lora", "registered PEFT method (vpeft methods)")
    options: dict[str, Any] = option({}, "the method's options")
    mode: str = option("final", "protocol: tune trains on train, scores val; final trains on train+val, scores test",
                       choices=MODES)  # fmt: skip
    preset: str | None = option(
        None, "transform preset (default: fgvc for fgvc data, else vtab)", choices=("vtab", "fgvc")
    )
    pretrained: bool = option(True, "start from pretrained weights (hub, file or embedded)")
    pretrained_file: str | None = option(None, "local weights: .safetensors, .pth, or Google .npz")
    num_classes: int | None = option(None, "override the task's class count")
    skip_bad_images: bool = option(False, "skip images that are missing or cannot be decoded, and count them")
    cache_images: str = option(
        "auto",
        "keep decoded inputs in memory: auto (when the transform is deterministic), on, off",
        choices=("auto", "on", "off"),
    )
    feature_cache: str = option(
        "auto",
        "train from cached frozen-prefix features where exact (linear probe, Partial-k, LST): auto or off",
        choices=("auto", "off"),
    )
    feature_cache_gb: float = option(8.0, "largest frozen-prefix feature cache to build, in GB; above it, no cache")
    task_type: str = option(
        DEFAULT_TASK_TYPE,
        "what the run predicts, a registered task type: classification, segmentation (ade20k:, vocseg:, "
        "masks:, mini-dense:segmentation data), detection (coco:, voc:, mini-dense:detection data)",
    )
    task_options: dict[str, Any] = option({}, "the task type's options (segmentation: channels, inference, ...)")
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        # YAML 1.1 reads a bare off/on as booleans
        if isinstance(self.feature_cache, bool):
            self.feature_cache = "auto" if self.feature_cache else "off"
        if isinstance(self.cache_images, bool):
            self.cache_images = "on" if self.cache_images else "off"
        coerce_fields(self, "run")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"--num-classes must be >= 2, got {self.num_classes}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.feature_cache not in ("auto", "off"):
            raise ConfigError(f"feature_cache must be auto or off, got '{self.feature_cache}'")
        if self.feature_cache_gb < 0:
            raise ConfigError(f"feature_cache_gb must be >= 0, got {self.feature_cache_gb}")
        if self.cache_images not in ("auto", "on", "off"):
            raise ConfigError(f"cache_images must be auto, on or off, got '{self.cache_images}'")
        if self.task_type not in task_type_names():
            raise ConfigError(f"task_type must be one of {', '.join(task_type_names())}, got '{self.task_type}'")
        if self.pretrained_file is not None and self.model.startswith("vpeft/"):
            raise ConfigError(
                f"--pretrained-file cannot be used with the embedded backbone '{self.model}' (it ships its own "
                "weights); pass a timm model name with the file, or drop --pretrained-file"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_splits(mode: str) -> tuple[str, str]:
    """(training split, evaluation split) of a protocol mode: tune trains on train and scores val, final trains
    on train + val and scores test."""
    return ("train", "val") if mode == "tune" else ("trainval", "test")


def data_options(spec: RunSpec, *, read_once: bool = False) -> DataOptions:
    """How the run reads its data, for the task type's datasets."""
    return DataOptions(spec.preset, spec.skip_bad_images, spec.cache_images, read_once)


def run_datasets(spec: RunSpec, task_type: TaskType, options: TaskOptions, task: Any,
                 model: torch.nn.Module) -> tuple[Any, Any]:  # fmt: skip
    """The run's training and evaluation sets, transformed for ``model`` by its task type (test is read once)."""
    train_split, eval_split = run_splits(spec.mode)
    train_set = task_type.dataset(task, train_split, model, options, train=True, data=data_options(spec))
    eval_set = task_type.dataset(task, eval_split, model, options, train=False,
                                 data=data_options(spec, read_once=spec.mode == "final"))  # fmt: skip
    return train_set, eval_set


def build_backbone(spec: RunSpec, num_classes: int) -> torch.nn.Module:
    """The run's backbone, seeded so a run's initialisation is reproducible."""
    seed_everything(spec.train.seed)
    return create_backbone(
        spec.model,
        num_classes,
        pretrained=spec.pretrained,
        pretrained_file=spec.pretrained_file,
        drop_path_rate=spec.train.drop_path,
        **spec.model_args,
    )


def build_model(spec: RunSpec, num_classes: int, task_type: TaskType | None = None,
                options: TaskOptions | None = None) -> torch.nn.Module:  # fmt: skip
    """The task model: the backbone (seeded) with the method applied and the task type's head on top.

    A method whose stage must first read the training split (GPS, SPT, SCT) is only checked against the
    backbone here: the backbone is returned as it is, and :func:`prepare_model` applies the method once the
    run has its data.
    """
    task_type = task_type or get_task_type(spec.task_type)
    options = options if options is not None else task_type.options(spec.task_options)
    backbone = build_backbone(spec, num_classes if task_type.head_in_backbone else 0)
    if needs_stage(spec):
        if not task_type.data_stages:
            raise ConfigError(
                f"method '{spec.method}' chooses what to train from classification data (a data stage); "
                f"it does not run on {task_type.name} tasks yet"
            )
        get_method(spec.method).check_backbone(describe(backbone))
        return backbone
    apply_method(backbone, spec.method, **spec.options)
    return task_type.build(backbone, num_classes, options)


def needs_stage(spec: RunSpec) -> bool:
    """Whether the run's method must read the training split before it is applied."""
    impl = get_method(spec.method)
    return impl.stage is not None and not impl.prepared(make_config(spec.method, **spec.options))


def _stage_split(split: str, mode: str, method: str, stage: str) -> str:
    """The task split a stage reads: the run's training split, or validation (a search, tune mode only)."""
    if split == "train":
        return run_splits(mode)[0]
    if mode != "tune":
        raise ConfigError(
            f"{method}: the {stage} stage reads the validation split, which a final run trains on; "
            "run it with --mode tune"
        )
    return "val"


def stage_data(spec: RunSpec, task: Any, model: torch.nn.Module, split: str, train_set: Any = None) -> StageData:
    """The one split a stage reads (never test), without augmentation, from the run's task type."""
    dataset = get_task_type(spec.task_type).stage_dataset(task, split, model, data_options(spec), train_set)
    return StageData(
        dataset, split=split, batch_size=spec.train.batch_size, device=resolve_device(spec.train.device),
        seed=spec.train.seed,
    )  # fmt: skip


def prepare_model(spec: RunSpec, task: Any, model: torch.nn.Module, train_set: Any) -> dict[str, Any]:
    """Run the method's stage on the training split, then apply the method; returns the record's stage fields."""
    impl = get_method(spec.method)
    split = _stage_split(impl.stage.split, spec.mode, spec.method, impl.stage.name)
    started = time.perf_counter()
    data = stage_data(spec, task, model, split, train_set)
    apply_method(model.to(data.device), spec.method, data=data, **spec.options)
    return {"stage": impl.stage.name, "stage_split": split, "stage_seconds": time.perf_counter() - started}


def _run_standalone(spec: RunSpec, out: Path, config: MethodConfig) -> dict[str, Any]:
    """A stage that is a whole run (NOAH's search): it reads its one split, trains nothing, writes its files
    and a record, through the method's interface."""
    impl = get_method(spec.method)
    stage = impl.standalone_stage(config)
    task_type = get_task_type(spec.task_type)
    if not task_type.data_stages:
        raise ConfigError(
            f"method '{spec.method}' searches on classification data (a standalone stage); it does not run on "
            f"{task_type.name} tasks yet"
        )
    task = load_spec_task(spec)
    split = _stage_split(stage.split, spec.mode, spec.method, stage.name)
    context = StageContext(
        build_backbone=lambda num_classes: build_backbone(spec, num_classes),
        data_for=lambda model: stage_data(spec, task, model, split),
        read_adapter_config=read_adapter_config,
        load_adapter=load_adapter,
        seed=spec.train.seed,
    )
    started = time.time()
    output = impl.run_standalone(config, context)
    seconds = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    for name, content in output.files.items():
        write_json_atomic(out / name, content)
    if output.adapter is not None:  # with the run's spec, as a training run's folder: `vpeft eval` reads both
        save_adapter(output.adapter, out)
        (out / "config.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    record = {"status": "ok", "method": spec.method, "stage": stage.name, "mode": stage.name, "eval_split": split,
              "task": task.name, "model": spec.model, "seed": spec.train.seed, "wall_seconds": seconds,
              "stage_seconds": seconds, **output.record}  # fmt: skip
    write_json_atomic(out / RESULT, record)
    return record


def run(
    spec: RunSpec,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reuse_finished: bool = False,
    progress: bool = True,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run of any task type; write the adapter, ``config.yaml`` and ``result.json``.

    Bad input (data, options, model) raises before anything is written. A folder that already holds
    a run is refused unless ``resume`` (continue its checkpoint; the spec must be the same) or
    ``overwrite`` (train beside it, replace it only once the new run has succeeded).
    ``reuse_finished`` returns the folder's record when it is a finished run of the same spec.
    ``on_epoch`` is called with each epoch's statistics (a sweep prints progress inside runs with it).
    A diverged run writes a record with ``status: failed`` and raises :class:`TrainingDivergedError`.
    The run holds a lock on its folder: a second process asking for the same run gets
    :class:`~vpeft.train.folders.RunBusyError`.
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: pass only one")
    config = make_config(spec.method, **spec.options)  # fail fast on a bad method or option
    task_type = get_task_type(spec.task_type)
    options = task_type.options(spec.task_options)
    if get_method(spec.method).standalone_stage(config) is not None:  # trains nothing
        return _run_standalone(spec, out, config)
    task = load_spec_task(spec)
    check_task_splits(task, spec.mode)
    identity = run_identity(spec, task, RECORD_VERSION)
    key = run_key(identity)
    num_classes = spec.num_classes or task.num_classes
    model = build_model(spec, num_classes, task_type, options)  # a bad model name fails before any write
    main_process = distributed_from_env().is_main  # under torchrun only rank 0 writes
    lock = RunLock(out).acquire() if main_process else None
    try:
        work = _work_folder(out, identity, key, resume=resume, overwrite=overwrite, reuse=reuse_finished)
        if isinstance(work, dict):
            return work  # a finished run of the same spec
        return _train_and_record(spec, task_type, options, task, model, identity, key, out, work, resume=resume,
                                 progress=progress, on_epoch=on_epoch)  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def load_spec_task(spec: RunSpec) -> Any:
    """The run's task, read by its task type's loader."""
    return get_task_type(spec.task_type).load_task(spec.data, spec.num_classes)


def check_task_splits(task: Any, mode: str) -> None:
    """Refuse a run whose training or evaluation split is empty (it would train on nothing, or score nothing)."""
    for split in run_splits(mode):
        if not task.split(split):
            raise DataError(f"the '{split}' split of task '{task.name}' ({task.root}) is empty; check its split file")


def _work_folder(out: Path, identity: dict[str, Any], key: str, *, resume: bool, overwrite: bool, reuse: bool):
    """Where this run trains (``out`` or its staging folder), or the finished record to reuse."""
    existing = read_record(out)
    if existing is not None and existing.get("status") == "ok" and (resume or reuse):
        if existing.get("run_key") == key:
            return {**existing, "reused": True}
        if resume:
            raise RunExistsError(
                f"--resume: '{out}' holds a finished run of another spec ({_describe_diff(existing, identity)}); "
                "pass --overwrite to replace it, or use another --out"
            )
    if distributed_from_env().is_main:
        remove_stale_temporaries(out)
    if resume and not (out / CHECKPOINT).is_file():
        raise RunExistsError(
            f"--resume: no {CHECKPOINT} in '{out}' (nothing to continue); run without --resume to start afresh"
            + (", with --overwrite to replace what is there" if holds_run(out) else "")
        )
    if not holds_run(out):
        return out
    if resume:
        saved = _saved_identity(out)
        if saved is not None and run_key(saved) != key:
            raise RunExistsError(
                f"--resume: the run in '{out}' was started with other settings "
                f"({'; '.join(identity_diff(saved, identity)[:8])}); resume it with its own config.yaml "
                f"(-c {out}/config.yaml), pass --overwrite to replace it, or use another --out"
            )
        return out
    if overwrite or reuse:
        return staging_dir(out)
    what = "a finished run" if existing is not None and existing.get("status") == "ok" else "a started run"
    raise RunExistsError(
        f"'{out}' already holds {what}; pass --resume to continue it, --overwrite to replace it (the old files "
        "stay until the new run succeeds), or use another --out"
    )


def _describe_diff(record: dict[str, Any], identity: dict[str, Any]) -> str:
    if isinstance(record.get("identity"), dict):
        return "; ".join(identity_diff(record["identity"], identity)[:8])
    return f"run key {record.get('run_key')} vs {run_key(identity)}"


def _saved_identity(out: Path) -> dict[str, Any] | None:
    """The identity of the run a folder's config.yaml describes (None if there is none)."""
    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = RunSpec(**(yaml.safe_load(path.read_text()) or {}))
        return run_identity(saved, load_spec_task(saved), RECORD_VERSION)
    except (VPeftError, TypeError, ValueError, yaml.YAMLError):
        return None


def _train_and_record(
    spec: RunSpec,
    task_type: TaskType,
    options: TaskOptions,
    task: Any,
    model: torch.nn.Module,
    identity: dict[str, Any],
    key: str,
    out: Path,
    work: Path,
    *,
    resume: bool,
    progress: bool,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> dict[str, Any]:
    train_set, eval_set = run_datasets(spec, task_type, options, task, model)
    num_classes = spec.num_classes or task.num_classes
    started = time.time()
    stage = {"stage_seconds": 0.0}
    if needs_stage(spec):  # build_model left the method for its data stage: it reads the training split first
        stage = prepare_model(spec, task, model, train_set)
        model = task_type.build(model, num_classes, options)
    trainer = Trainer(model, spec.train, work, progress=progress, on_epoch=on_epoch, task_type=task_type,
                      options=options, eval_kwargs=task_type.eval_kwargs(task, options))  # fmt: skip
    main_process = trainer.dist.is_main
    if main_process:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    base = {**record_base(spec, task, model, task_type, options), "run_key": key, "identity": identity}
    if spec.train.device == "auto" and trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    fit_set: Any = train_set
    plan = None
    if (task_type.feature_cache and spec.feature_cache == "auto" and getattr(train_set, "cached", False)
            and trainer.dist.world == 1 and not spec.train.compile):  # fmt: skip
        plan = plan_cached_prefix(model)
    if plan is not None:  # the frozen prefix runs once per image; epochs train the suffix only
        extract_start = time.perf_counter()
        features = plan.features(model, train_set, spec.train.batch_size, trainer.device, spec.feature_cache_gb * 1e9)
        trainer.train_seconds += time.perf_counter() - extract_start  # counted as training time
        if features is None:
            plan = None  # over the size limit: train through the prefix
        else:
            fit_set, trainer.train_forward = features, plan.suffix
    try:
        history = trainer.fit(fit_set, eval_set if spec.mode == "tune" else None, resume=resume)
    except TrainingDivergedError as exc:
        if main_process:
            write_json_atomic(work / RESULT, {**base, "status": "failed", "error": str(exc)})
        raise
    metrics = trainer.last_metrics if spec.mode == "tune" and trainer.last_metrics else trainer.evaluate(eval_set)
    score = metrics[task_type.primary_metric]
    memory, memory_kind = trainer.peak_memory_mb()
    record = {
        **base,
        "status": "ok",
        "eval_split": run_splits(spec.mode)[1],
        "selection": "final_epoch",
        "selected_epoch": history[-1].epoch,
        "metrics": metrics,
        "metric_names": [m for m in task_type.metric_names if m in metrics],
        **metrics,
        "score": score,
        "ppt": ppt(score / 100.0, base["trainable_params"]) if 0 <= score <= 100 else None,  # a percentage only
        **task_type.record_fields(task, options),
        "train_seconds": trainer.train_seconds,
        "compile_seconds": trainer.compile_seconds,
        **stage,
        "wall_seconds": time.time() - started,
        "images_per_s": trainer.images_seen / max(trainer.train_seconds, 1e-9),
        "peak_memory_mb": memory,
        "memory_kind": memory_kind,
        "memory_estimate_mb": trainer.memory_estimate_mb,
        "memory_estimate_kind": MEMORY_ESTIMATE_KIND,
        "final_train_loss": history[-1].train_loss,
        "skipped_images": len(getattr(train_set, "skipped", ())) + len(getattr(eval_set, "skipped", ())),
        "device": str(trainer.device),
        "world_size": trainer.dist.world,
        "feature_cache": plan is not None,
    }
    if main_process:
        task_type.save(model, work, num_classes, options)
        write_model_card(work, record, tag=task_type.hub_tag)  # README.md: a Hub-style card
        trainer.remove_checkpoint()
        if work != out:
            commit_staged(work, out)
        write_json_atomic(out / RESULT, record)  # last: the record is what marks the run finished
    return record


def record_base(spec: RunSpec, task: Any, model: torch.nn.Module, task_type: TaskType | None = None,
                options: TaskOptions | None = None) -> dict[str, Any]:  # fmt: skip
    """The fields every record of a run has before training (spec, backbone identity, parameter counts,
    versions); ``model`` is the task model (the backbone itself for classification)."""
    task_type = task_type or get_task_type(spec.task_type)
    options = options if options is not None else task_type.options(spec.task_options)
    backbone = backbone_of(model)[1]
    state = get_state(backbone)
    weights = {"pretrained": spec.pretrained, "digest": state.identity["weights"]}
    if spec.pretrained_file:
        weights["file"] = spec.pretrained_file
        weights["file_sha256"] = (file_sha256(spec.pretrained_file) or "")[:16]  # hashed once, for the run key
    method_params = count_trainable(backbone, include_head=False)
    with_head = sum(p.numel() for p in trainable(model).values())
    return {
        "record_version": RECORD_VERSION,
        "method": spec.method,
        "options": record_options(state.config.to_dict()),
        "model": spec.model,
        "architecture": state.identity["architecture"],
        "weights": weights,
        "task": task.name,
        "data": spec.data,
        "task_type": task_type.name,
        "task_options": options.to_dict(),
        "primary_metric": task_type.primary_metric,
        "num_classes": task.num_classes if spec.num_classes is None else spec.num_classes,
        "seed": spec.train.seed,
        "mode": spec.mode,
        "epochs": spec.train.epochs,
        "lr": spec.train.lr,
        "wd": spec.train.weight_decay,
        "train": dataclasses.asdict(spec.train),
        "train_size": len(task.split(run_splits(spec.mode)[0])),
        "trainable_params": method_params,
        "trainable_params_with_head": with_head,
        "head_params": with_head - method_params,
        "total_params": count_parameters(model),
        "versions": {
            "vpeft": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "git_commit": git_commit(),
        "host": platform.node(),
    }


def record_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options for the record: a stage's selection (long lists, kept in adapter_config.json) as its digest."""
    if options.get("selection") is None:
        return options
    text = json.dumps(options["selection"], sort_keys=True)
    return {**options, "selection": f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"}


def evaluate_adapter(
    model_name: str,
    adapter_dir: str | Path,
    data: str,
    *,
    split: str = "test",
    pretrained: bool = True,
    pretrained_file: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    preset: str | None = None,
    model_args: dict[str, Any] | None = None,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Accuracy of a saved classification adapter on a split of a task.

    Refuses an adapter whose head does not fit the task's class count; warns (``warnings`` in the
    result) when the split was part of the adapter's training data.
    """
    adapter_dir = resolve_adapter(adapter_dir)  # a folder, or hf-hub:<repo id> fetched once
    saved = read_adapter_config(adapter_dir)
    num_classes = saved["backbone"]["num_classes"]
    task_type = get_task_type(DEFAULT_TASK_TYPE)
    task = task_type.load_task(data)
    if task.num_classes != num_classes:
        raise AdapterMismatchError(
            f"the adapter in '{adapter_dir}' has a {num_classes}-class head, but task '{task.name}' ({data}) has "
            f"{task.num_classes} classes; evaluate it on the task it was trained for"
        )
    warnings = []
    run_config = Path(adapter_dir) / "config.yaml"
    trained = yaml.safe_load(run_config.read_text()) if run_config.is_file() else None
    trained = trained if isinstance(trained, dict) else {}
    if trained.get("data") and task_type.load_task(trained["data"]).name == task.name:
        mode = trained.get("mode", "final")
        seen = ("train",) if mode == "tune" else ("train", "val", "trainval")
        if split in seen:
            warnings.append(
                f"the '{split}' split was part of this adapter's training data ({mode} mode trains on "
                f"{'train' if mode == 'tune' else 'train+val'}): this accuracy is not a held-out score"
            )
    if trained:  # the run's seed: a --no-pretrained backbone gets the same random weights
        seed_everything(int((trained.get("train") or {}).get("seed", 0)))
    model = create_backbone(
        model_name, num_classes, pretrained=pretrained, pretrained_file=pretrained_file, **(model_args or {})
    )
    load_adapter(model, adapter_dir)
    reading = DataOptions(preset, skip_bad_images, cache_images="off", read_once=True)
    dataset = task_type.dataset(task, split, model, task_type.options(), train=False, data=reading)
    trainer = Trainer(
        model, TrainConfig(epochs=1, warmup_epochs=0, batch_size=batch_size, device=device), progress=False
    )
    metrics = trainer.evaluate(dataset)
    return {
        "task": task.name,
        "split": split,
        "top1": metrics["top1"],
        "images": len(dataset),
        "method": saved["method"],
        "warnings": warnings,
    }
