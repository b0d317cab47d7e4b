"""Task types: what a run predicts (classes, a label per pixel, boxes), with its head, loss, metric and data.

A task type turns a backbone (a timm model to which a vpeft method is already applied) into the full
trainable model, computes the training loss of a batch, scores a split, and loads a data spec's split
with its collate function. Methods never know the task: the model the task type builds reads the
backbone through :class:`vpeft.dense.DenseEncoder` (or the classifier itself).

Every task type trains through the one :class:`vpeft.train.trainer.Trainer` and runs through the one
:func:`vpeft.train.run.run`; a new task type is a subclass registered with :func:`register_task_type`
(and its data module), nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from vpeft.api import get_state, load_adapter, save_adapter
from vpeft.config import coerce_fields
from vpeft.errors import AdapterMismatchError, ConfigError, VPeftError
from vpeft.files import atomic_write

#: the file beside adapter.safetensors with the task model's own weights (head, pyramid, norm statistics)
HEAD_WEIGHTS = "task_head.safetensors"
#: task type, class count and options of a saved task model
TASK_CONFIG = "task_config.json"
#: the task type of a run or record that names none (records written before task types existed)
DEFAULT_TASK_TYPE = "classification"


@dataclass
class TaskOptions:
    """Options of a task type (each task type subclasses this); part of a run's identity."""

    def validate(self) -> None:
        """Refuse bad values with a message naming the option."""

    @classmethod
    def from_dict(cls, task: str, values: dict[str, Any] | None) -> TaskOptions:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {task} option(s) {unknown}; valid: {sorted(known) or 'none'} (pass them as --task-opt KEY=VALUE)"
            )
        options = cls(**values)
        coerce_fields(options, task)
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            if choices and getattr(options, f.name) not in choices:
                raise ConfigError(
                    f"{task} option '{f.name}' must be one of {', '.join(choices)}, got {getattr(options, f.name)!r}"
                )
        options.validate()
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataOptions:
    """How a run reads its data (the run spec's data fields), handed to :meth:`TaskType.dataset`."""

    #: transform preset (vtab, fgvc), or None for the task type's default
    preset: str | None = None
    skip_bad_images: bool = False
    #: keep decoded inputs in memory: auto (when the transform is deterministic), on, off
    cache_images: str = "auto"
    #: the split is read once, after training (final mode's test split): streaming is enough
    read_once: bool = False


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule after the linear warm-up: ``cosine`` or ``poly`` (``(1 - t) ** power``)
    down to the recipe's ``min_lr``; ``warmup_steps`` overrides the recipe's ``warmup_epochs`` when set."""

    kind: str = "cosine"
    power: float = 1.0
    warmup_steps: int | None = None


def inner_module(model: nn.Module) -> nn.Module:
    """The model itself under a DistributedDataParallel or ``torch.compile`` wrapper (for its attributes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class TaskType:
    """A kind of prediction. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    #: the metric a sweep tunes on and the leaderboard ranks by (higher is better)
    primary_metric: ClassVar[str]
    #: every metric :meth:`evaluate` returns, in the order the reports show them
    metric_names: ClassVar[tuple[str, ...]]
    options_class: ClassVar[type[TaskOptions]] = TaskOptions
    #: data spec kinds this task type reads (``ade20k:<dir>`` ...), for error messages and ``vpeft tasks``
    data_kinds: ClassVar[tuple[str, ...]] = ()
    #: the Hugging Face Hub's pipeline tag of a model of this task type (in the model card)
    hub_tag: ClassVar[str] = ""
    #: whether the backbone's own classifier is the head (created with the task's classes); otherwise the
    #: backbone is created without one and :meth:`build` adds the head
    head_in_backbone: ClassVar[bool] = False
    #: whether some trainable parameters may get no gradient in a step (a detector's unused pyramid level):
    #: DistributedDataParallel then looks for them every step
    find_unused_parameters: ClassVar[bool] = False
    #: whether a method's data stage (GPS, SPT, SCT, NOAH's search) can read this task's (input, label) pairs
    data_stages: ClassVar[bool] = False
    #: whether a training split held as (input, label) tensors may be replaced by frozen-prefix features
    feature_cache: ClassVar[bool] = False

    def options(self, values: dict[str, Any] | None = None) -> TaskOptions:
        return self.options_class.from_dict(self.name, values)

    # ------------------------------------------------------------ data

    def load_task(self, spec: str, num_classes: int | None = None) -> Any:
        """The task a data spec names: ``.name``, ``.kind``, ``.root``, ``.num_classes`` and ``.split(name)``
        (a list of (input, annotation) string pairs: it fingerprints the data of a run's identity)."""
        raise NotImplementedError

    def dataset(self, task: Any, split: str, model: nn.Module, options: TaskOptions, *, train: bool,
                data: DataOptions | None = None) -> Dataset:  # fmt: skip
        """A split of the task, transformed for ``model`` (the built task model); ``train`` adds augmentation."""
        raise NotImplementedError

    def stage_dataset(self, task: Any, split: str, model: nn.Module, data: DataOptions,
                      train_set: Dataset | None = None) -> Dataset:  # fmt: skip
        """The split a method's data stage reads (:attr:`data_stages` task types only), without augmentation."""
        raise ConfigError(f"method data stages do not run on {self.name} tasks")

    def collate(self, items: list[Any]) -> Any:
        """A list of dataset items -> one batch."""
        return torch.utils.data.default_collate(items)

    def batch_to(self, batch: Any, device: torch.device, channels_last: bool = False) -> Any:
        """The batch on ``device`` (tensors anywhere in tuples, lists and dicts); 4-D float inputs in the
        channels-last layout when asked (CNNs on CUDA)."""
        return _to_device(batch, device, channels_last)

    def batch_size(self, batch: Any) -> int:
        """Number of samples in a batch that count (a padded batch's extra rows do not)."""
        raise NotImplementedError

    # ------------------------------------------------------------ model

    def build(self, backbone_model: nn.Module, num_classes: int, options: TaskOptions) -> nn.Module:
        """The full trainable model: the backbone (method applied) as an encoder, plus this task's head."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of one batch (a scalar tensor; no host synchronisation)."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Any, label_smoothing: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """(loss, correct predictions or None) of one training batch; the count stays on the device.

        The default is :meth:`loss` without a count; ``label_smoothing`` is the recipe's."""
        return self.loss(model, batch), None

    def lr_schedule(self, options: TaskOptions) -> Schedule:
        """The learning-rate schedule after warm-up (cosine unless the task type says otherwise)."""
        return Schedule()

    def evaluate(self, model: nn.Module, batches: Iterable[Any], **kwargs: Any) -> dict[str, float]:
        """Every metric of :attr:`metric_names` (percentages where the metric is one) over ``batches``."""
        raise NotImplementedError

    def eval_kwargs(self, task: Any, options: TaskOptions) -> dict[str, Any]:
        """Keyword arguments of :meth:`evaluate` for this task (segmentation: whole or slide inference)."""
        return {}

    def record_fields(self, task: Any, options: TaskOptions) -> dict[str, Any]:
        """Fields this task type adds to a run's record."""
        return {}

    def save(self, model: nn.Module, directory: str | Path, num_classes: int, options: TaskOptions) -> Path:
        """Save what a trained task model needs to be rebuilt: the adapter, and the head when it is not in it."""
        return save_task_model(model, directory, self.name, num_classes, options)


_TASK_TYPES: dict[str, TaskType] = {}


def register_task_type(cls: type[TaskType]) -> type[TaskType]:
    """Class decorator: make a task type available by its ``name``."""
    if cls.name in _TASK_TYPES:
        raise VPeftError(f"task type '{cls.name}' is already registered")
    _TASK_TYPES[cls.name] = cls()
    return cls


#: built-in task types that could not be imported (a missing optional dependency), with the reason
IMPORT_ERRORS: dict[str, str] = {}


def get_task_type(name: str) -> TaskType:
    """The registered task type ``name``, or an error listing the known ones."""
    if name not in _TASK_TYPES:
        why = f" (it failed to import: {IMPORT_ERRORS[name]})" if name in IMPORT_ERRORS else ""
        raise ConfigError(f"unknown task type '{name}'{why}; known: {', '.join(task_type_names())}")
    return _TASK_TYPES[name]


def task_type_names() -> list[str]:
    return list(_TASK_TYPES)


def _to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.ndim == 4 and obj.is_floating_point():
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: _to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, channels_last) for v in obj)
    return obj


# ---------------------------------------------------------------- save / load of a task model


def backbone_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the one submodule of a task model that carries a vpeft method."""
    found = [(n, m) for n, m in model.named_modules() if get_state(m) is not None]
    if len(found) != 1:
        raise VPeftError(
            f"a task model must hold exactly one backbone with a vpeft method applied, found {len(found)}; "
            "build it with the task type's build() from a model passed through vpeft.apply"
        )
    return found[0]


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task model's own tensors (head, pyramid, their norm statistics): everything outside the backbone."""
    prefix = backbone_of(model)[0] + "."
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith(prefix)}


def save_task_model(model: nn.Module, directory: str | Path, task_type: str, num_classes: int,
                    options: TaskOptions) -> Path:  # fmt: skip
    """The backbone's adapter (``vpeft.save_adapter``) plus the head's weights and the task's config."""
    out = save_adapter(backbone_of(model)[1], directory)
    tensors = head_state(model)
    atomic_write(out / HEAD_WEIGHTS, lambda path: save_file(tensors, str(path), metadata={"task_type": task_type}))
    text = json.dumps({"task_type": task_type, "num_classes": num_classes, "options": options.to_dict()}, indent=2)
    atomic_write(out / TASK_CONFIG, lambda path: Path(path).write_text(text + "\n"))
    return out


def read_task_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TASK_CONFIG
    if not path.is_file():
        raise AdapterMismatchError(
            f"no {TASK_CONFIG} in '{directory}': it holds a classification adapter (or none); load it with "
            "vpeft.load_adapter"
        )
    return json.loads(path.read_text())


def load_task_model(backbone: nn.Module, directory: str | Path,
                    build: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:  # fmt: skip
    """Rebuild a saved task model on a fresh backbone (created with ``num_classes=0``): the method's weights
    into the backbone, then the head's. ``build`` overrides the task type's ``build`` (tests)."""
    saved = read_task_config(directory)
    task_type = get_task_type(saved["task_type"])
    options = task_type.options(saved["options"])
    load_adapter(backbone, directory)
    model = (build or (lambda b: task_type.build(b, saved["num_classes"], options)))(backbone)
    try:
        tensors = load_file(str(Path(directory) / HEAD_WEIGHTS))
    except FileNotFoundError:
        raise AdapterMismatchError(f"no {HEAD_WEIGHTS} in '{directory}'; the task model folder is incomplete") from None
    expected = set(head_state(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterMismatchError(
            f"{HEAD_WEIGHTS} does not fit this {saved['task_type']} model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise AdapterMismatchError(f"{HEAD_WEIGHTS}: unexpected keys {result.unexpected_keys[:5]}")
    return model
