"""Task types: what a run predicts (classes, a label per pixel, boxes), with its head, loss, metric and data.

A task type turns a backbone (a timm model to which a vpeft method is already applied) into the full
trainable model, computes the training loss of a batch, scores a split, and loads a data spec's split
with its collate function. Methods never know the task: the model the task type builds reads the
backbone through :class:`vpeft.dense.DenseEncoder` (or the classifier itself).

Classification keeps the trainer's fast path (:class:`vpeft.train.trainer.Trainer`); the other task
types run through this interface (:mod:`vpeft.train.task_run`).
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

from vpeft.api import _atomic_write, get_state, load_adapter, save_adapter
from vpeft.config import coerce_fields
from vpeft.errors import AdapterMismatchError, ConfigError, VPeftError

#: the file beside adapter.safetensors with the task model's own weights (head, pyramid, norm statistics)
HEAD_WEIGHTS = "task_head.safetensors"
#: task type, class count and options of a saved task model
TASK_CONFIG = "task_config.json"


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

    def options(self, values: dict[str, Any] | None = None) -> TaskOptions:
        return self.options_class.from_dict(self.name, values)

    # ------------------------------------------------------------ data

    def load_task(self, spec: str, num_classes: int | None = None) -> Any:
        """The task a data spec names: ``.name``, ``.kind``, ``.root``, ``.num_classes`` and ``.split(name)``
        (a list of (input, annotation) string pairs: it fingerprints the data of a run's identity)."""
        raise NotImplementedError

    def dataset(self, task: Any, split: str, model: nn.Module, options: TaskOptions, *, train: bool) -> Dataset:
        """A split of the task, transformed for ``model`` (the built task model); ``train`` adds augmentation."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        """A list of dataset items -> one batch."""
        return torch.utils.data.default_collate(items)

    def batch_to(self, batch: Any, device: torch.device) -> Any:
        """The batch on ``device`` (tensors anywhere in tuples, lists and dicts)."""
        return _to_device(batch, device)

    def batch_size(self, batch: Any) -> int:
        """Number of images in a batch."""
        raise NotImplementedError

    # ------------------------------------------------------------ model

    def build(self, backbone_model: nn.Module, num_classes: int, options: TaskOptions) -> nn.Module:
        """The full trainable model: the backbone (method applied) as an encoder, plus this task's head."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of one batch (a scalar tensor; no host synchronisation)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Every metric of :attr:`metric_names` (percentages where the metric is one) over ``batches``."""
        raise NotImplementedError


_TASK_TYPES: dict[str, TaskType] = {}


def register_task_type(cls: type[TaskType]) -> type[TaskType]:
    """Class decorator: make a task type available by its ``name``."""
    if cls.name in _TASK_TYPES:
        raise VPeftError(f"task type '{cls.name}' is already registered")
    _TASK_TYPES[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    import vpeft.tasks.classification
    import vpeft.tasks.segmentation

    try:
        import vpeft.tasks.detection  # noqa: F401
    except ImportError as exc:  # detection needs torchvision's detection models; report what is missing on use
        if "vpeft.tasks.detection" not in str(exc):
            _IMPORT_ERRORS["detection"] = str(exc)


_IMPORT_ERRORS: dict[str, str] = {}


def get_task_type(name: str) -> TaskType:
    """The registered task type ``name``, or an error listing the known ones."""
    _load_builtin()
    if name not in _TASK_TYPES:
        why = f" (it failed to import: {_IMPORT_ERRORS[name]})" if name in _IMPORT_ERRORS else ""
        raise ConfigError(f"unknown task type '{name}'{why}; known: {', '.join(task_type_names())}")
    return _TASK_TYPES[name]


def task_type_names() -> list[str]:
    _load_builtin()
    return list(_TASK_TYPES)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
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
    _atomic_write(out / HEAD_WEIGHTS, lambda path: save_file(tensors, str(path), metadata={"task_type": task_type}))
    text = json.dumps({"task_type": task_type, "num_classes": num_classes, "options": options.to_dict()}, indent=2)
    _atomic_write(out / TASK_CONFIG, lambda path: Path(path).write_text(text + "\n"))
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
