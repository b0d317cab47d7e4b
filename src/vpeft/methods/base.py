"""The method registry, the config base class, the method lifecycle and the helpers every method shares.

A method is a :class:`Method` subclass in its own file, decorated with :func:`register`. It
declares a :class:`MethodConfig` dataclass (every field carries ``help`` metadata), the backbone
parts it requires (:attr:`Method.requires`), and implements :meth:`Method.inject`, which changes a model whose
parameters are already all frozen.

Lifecycle. A method may read data before it is injected (GPS's gradients, SPT's sensitivity,
SCT's salient channels): it declares a :class:`Stage` as ``Method.stage`` and implements
:meth:`Method.prepare`, which runs on the unchanged backbone and writes its decision into the
config; :meth:`Method.inject` then builds from the config alone, so a saved adapter reloads
without data. A stage that is a whole run and trains nothing (NOAH's search) is declared by
:meth:`Method.standalone_stage` and run by :meth:`Method.run_standalone`. A stage reads one
split, named by :attr:`Stage.split`: the run's training split, or the validation split for a
search in tune mode. The test split cannot be named, so no stage can read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import convert_options, option
from vpeft.data.transforms import input_config
from vpeft.errors import ConfigError, NotMergeableError, UnknownMethodError, UnsupportedBackboneError, VPeftError


@dataclass
class MethodConfig:
    """Base of every method's options. Subclasses add dataclass fields made with :func:`option`."""

    method: ClassVar[str] = ""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def option_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build a config from keyword options; strings (from a command line) are converted."""
        valid = cls.option_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method '{cls.method}'; valid options: "
                f"{valid or 'none (this method takes no options)'}"
            )
        return cls(**convert_options(cls, cls.method, options))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for out-of-range values. Override in subclasses."""


@dataclass
class SelectionConfig(MethodConfig):
    """Options of a method whose data stage decides what trains (GPS, SPT, SCT): the decision is the
    ``selection`` option, filled by :meth:`Method.prepare` and saved with the adapter, so a config that
    holds one is prepared and a loaded adapter needs no data."""

    selection: dict[str, Any] | None = option(
        None, "decided by the method's data stage and saved with the adapter (set it only to reuse a saved selection)"
    )


class Method:
    """A PEFT method. Subclasses set the class attributes and implement :meth:`inject`."""

    name: ClassVar[str]
    family: ClassVar[str]  # taxonomy: "addition/adapter", "partial/reparameterization", ...
    paper: ClassVar[str]
    #: backbone parts it needs, in the vocabulary of :data:`vpeft.backbones.anatomy.PARTS`
    requires: ClassVar[frozenset[str]] = frozenset()
    mergeable: ClassVar[bool] = False
    #: whether the method trains the whole model itself (full fine-tuning)
    trains_everything: ClassVar[bool] = False
    #: whether one training run is the whole method (NOAH needs supernet -> search -> retrain runs)
    single_run: ClassVar[bool] = True
    config_class: ClassVar[type[MethodConfig]]
    #: a stage that reads the training split before injection (see :meth:`prepare`); None for most methods
    stage: ClassVar[Stage | None] = None
    #: whether adapters of the method can share one frozen backbone (:class:`vpeft.multi.MultiAdapterModel`);
    #: a method that cannot says why in :attr:`not_shareable_reason`
    shareable: ClassVar[bool] = True
    not_shareable_reason: ClassVar[str] = ""

    def prepared(self, config: MethodConfig) -> bool:
        """Whether ``config`` already holds what :attr:`stage` decides (a loaded adapter's config does)."""
        return not isinstance(config, SelectionConfig) or config.selection is not None

    def prepare(self, model: nn.Module, anatomy: Anatomy, config: MethodConfig, data: StageData) -> MethodConfig:
        """Run :attr:`stage` on the unchanged backbone; return ``config`` with its decision filled in.

        Reads only ``data``; leaves the model's weights, modes and ``requires_grad`` flags as it found them.
        """
        raise NotImplementedError(f"method '{self.name}' has no data stage")

    def standalone_stage(self, config: MethodConfig) -> Stage | None:
        """A stage that is a whole run and trains nothing (NOAH's search), or None: the run trains."""
        return None

    def run_standalone(self, config: MethodConfig, context: StageContext) -> StageOutput:
        """Run :meth:`standalone_stage` with the backbone and data the runner provides."""
        raise NotImplementedError(f"method '{self.name}' has no standalone stage")

    def cached_prefix(self, model: nn.Module, anatomy: Anatomy, config: MethodConfig) -> PrefixSplit | None:
        """Where the model splits into a frozen prefix whose output can be computed once per image and a
        trainable suffix (linear probing, Partial-k, LST), or None: the whole model runs every step."""
        return None

    def task_shared_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters, by name in ``model``, that every task's adapter of this method shares on one multi-task
        backbone (MTLoRA's task-agnostic update; :class:`vpeft.multi.MultiAdapterModel` ties them). None for most."""
        return {}

    def check_backbone(self, anatomy: Anatomy) -> None:
        """Refuse a backbone that lacks a part this method :attr:`requires`, naming the missing parts."""
        missing = self.requires - anatomy.parts
        if missing:
            raise UnsupportedBackboneError(
                f"method '{self.name}' does not apply to {anatomy.architecture} (a {anatomy.family} backbone): "
                f"it needs the parts {', '.join(sorted(self.requires))}; the backbone lacks {', '.join(sorted(missing))} "
                f"(it has: {', '.join(sorted(anatomy.parts)) or 'none'})"
            )

    def inject(self, model: nn.Module, anatomy: Anatomy, config: MethodConfig) -> None:
        raise NotImplementedError

    def saved_buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Buffers the method adds that training changes (BatchNorm statistics), by name in the model.

        Saved and loaded with the trainable parameters; most methods have none."""
        return {}

    def after_merge(self, model: nn.Module) -> None:
        """Called after every wrapper was folded: remove any module the method added at the model's root."""

    def before_unmerge(self, model: nn.Module) -> None:
        """Called before the wrappers are restored: put back what :meth:`after_merge` removed."""

    def merge(self, model: nn.Module) -> None:
        """Fold the method into the backbone. Selection methods have nothing to fold."""
        if not self.mergeable:
            raise NotMergeableError(
                f"method '{self.name}' adds modules that cannot be folded into the backbone's "
                "weights; serve the model unmerged (mergeable methods: "
                f"{', '.join(m.name for m in _REGISTRY.values() if m.mergeable)})"
            )


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method '{cls.name}' registered twice")
    cls.config_class.method = cls.name
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method '{name}'; registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_methods() -> list[Method]:
    return list(_REGISTRY.values())


# ---------------------------------------------------------------- stages: what a method may read before training

#: the splits a stage can name: the run's training split, or (a search, in tune mode only) validation
STAGE_SPLITS = ("train", "val")


@dataclass(frozen=True)
class Stage:
    """A step of a method that reads data and trains nothing.

    ``split`` is the only data it may read: ``"train"`` is the run's training split (``train`` in
    tune mode, ``trainval`` in final mode); ``"val"`` is the validation split, for a search, and
    only in tune mode. There is no way to name the test split.
    """

    name: str
    split: str
    description: str

    def __post_init__(self) -> None:
        if self.split not in STAGE_SPLITS:
            raise ValueError(f"a stage reads one of {STAGE_SPLITS}, not '{self.split}'")


@dataclass
class StageData:
    """The one split a stage reads: a dataset of (model input, label) pairs and how to batch it."""

    dataset: torch.utils.data.Dataset
    #: the split's name in the task (train, trainval or val), recorded with the run
    split: str = "train"
    batch_size: int = 32
    device: torch.device | str = "cpu"
    #: seeds the order of shuffled batches and any augmentation of the stage
    seed: int = 0

    def batches(
        self, batch_size: int | None = None, *, shuffle: bool = False, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) on the device; a seeded order when ``shuffle``; at most ``limit`` batches.

        The loader draws from its own generator, never from the global random state.
        """
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed),
        )
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                return
            yield x.to(self.device), torch.as_tensor(y).to(self.device)

    @classmethod
    def wrap(cls, data: Any, model: nn.Module) -> StageData:
        """``data`` as stage data: a StageData, a Dataset of (input, label) pairs, or a DataLoader (its dataset)."""
        if isinstance(data, StageData):
            return data
        if isinstance(data, torch.utils.data.DataLoader):
            return cls(data.dataset, batch_size=data.batch_size or 32, device=_device_of(model))
        if isinstance(data, torch.utils.data.Dataset):
            return cls(data, device=_device_of(model))
        raise ConfigError(
            f"data must be a torch Dataset of (input, label) pairs, a DataLoader or a StageData, got {type(data).__name__}"
        )

    def fit(self, model: nn.Module, epochs: int, lr: float) -> None:
        """Train ``model``'s trainable parameters on this split with the trainer vpeft registered
        (:func:`set_stage_trainer`): a stage that trains (E2VPT's pruning) never writes a loop of its own."""
        if _STAGE_TRAINER is None:
            raise VPeftError("no stage trainer is registered; import vpeft.train (import vpeft does) first")
        _STAGE_TRAINER(model, self, epochs, lr)


#: trains a model on a stage's split: (model, data, epochs, lr); registered by vpeft.train's trainer
_STAGE_TRAINER: Callable[[nn.Module, StageData, int, float], None] | None = None


def set_stage_trainer(trainer: Callable[[nn.Module, StageData, int, float], None]) -> None:
    """Register the function :meth:`StageData.fit` trains with (vpeft.train registers its Trainer)."""
    global _STAGE_TRAINER
    _STAGE_TRAINER = trainer


@dataclass
class PrefixSplit:
    """A model as a frozen prefix and a trainable suffix: ``suffix(prefix(x))`` is the model's output.

    ``prefix_modules`` are the modules the prefix runs: caching it is exact only when none of them holds
    randomness that is active in training (dropout, drop-path)."""

    prefix: Callable[[torch.Tensor], torch.Tensor]
    suffix: Callable[[torch.Tensor], torch.Tensor]
    prefix_modules: list[nn.Module]


def token_embedding(
    model: nn.Module, anatomy: Anatomy
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]] | None:
    """A token backbone's input embedding (patch embedding, position embedding and prefix tokens, pre-norm) as
    a function of the image, with the modules it runs; None when the backbone has no such embedding."""
    if "tokens" not in anatomy.parts or not hasattr(model, "_pos_embed"):
        return None

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    return embed, [model.patch_embed, model.patch_drop, model.norm_pre, getattr(model, "pos_drop", nn.Identity())]


def random_stage_data(model: nn.Module, num_classes: int, n: int = 8, seed: int = 0) -> StageData:
    """Random inputs at the model's input size, labels 0, 1, ...: a stand-in training split for counting
    parameters without data (GPS's and SCT's counts do not depend on the data; SPT's does)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, *input_config(model).size, generator=g)
    dataset = torch.utils.data.TensorDataset(x, torch.arange(n) % num_classes)
    return StageData(dataset, batch_size=n, device=_device_of(model), seed=seed)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass
class StageContext:
    """What the runner hands a standalone stage: how to build the run's backbone, read the stage's split and
    load a saved adapter (the API's functions: a method never imports the API)."""

    #: a fresh backbone with this many classes, built (and seeded) as the run builds its model
    build_backbone: Callable[[int], nn.Module]
    #: the stage's split, transformed for that model (its input size, mean and std)
    data_for: Callable[[nn.Module], StageData]
    #: the saved adapter's config for a folder or ``hf-hub:`` id (:func:`vpeft.read_adapter_config`)
    read_adapter_config: Callable[[str], dict[str, Any]]
    #: applies a saved adapter (folder or ``hf-hub:`` id) to a fresh backbone, returns it (:func:`vpeft.load_adapter`)
    load_adapter: Callable[[nn.Module, str], nn.Module]
    seed: int = 0


@dataclass
class StageOutput:
    """What a standalone stage found: fields of the run's record, JSON files for the run folder, and optionally
    an adapter to save there."""

    record: dict[str, Any]
    files: dict[str, Any] = field(default_factory=dict)
    #: a model with the method applied whose adapter the run saves (GLoRA's searched subnet), or None
    adapter: nn.Module | None = None


@contextlib.contextmanager
def stage_mode(model: nn.Module, grad_params: typing.Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Inside: evaluation mode (no dropout, drop-path or BatchNorm statistics updates), and only
    ``grad_params`` require gradients. Afterwards the model's modes and flags are as they were."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in grad_params}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def accumulate_gradients(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: typing.Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    square: bool = False,
) -> dict[str, torch.Tensor]:
    """Sum over batches of the gradient (``square``: of its square) of ``loss_fn(inputs, labels)`` w.r.t. ``params``.

    Runs in :func:`stage_mode`; the parameters' ``.grad`` fields are not touched.
    """
    names, tensors = list(params), list(params.values())
    total = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    with stage_mode(model, tensors):
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(x, y), tensors, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc += g.float().square() if square else g.float()
    return dict(zip(names, total, strict=True))


# ---------------------------------------------------------------- helpers for methods


class BaseLayerWrapper(nn.Module):
    """A module that replaces a backbone module and keeps it as ``base_layer``.

    Mergeable wrappers implement :meth:`merge_into_base` and :meth:`unmerge_from_base`, which
    change ``base_layer``'s weights in place.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def merge_into_base(self) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged")

    def unmerge_from_base(self) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged")


class DeltaWeightWrapper(BaseLayerWrapper):
    """A wrapper whose update is W + delta_weight(): merging adds it to the base weight, unmerging subtracts it."""

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.weight += self.delta_weight()

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        self.base_layer.weight -= self.delta_weight()


class SlicedDeltaWrapper(BaseLayerWrapper):
    """A wrapper updating output-row slices ``self.slices`` of the base weight (q and v of a fused qkv):
    slice i becomes W[start:end] + delta_weight(i); merging adds each, unmerging subtracts each."""

    slices: list[tuple[int, int]]

    def delta_weight(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge_into_base(self) -> None:
        for i, (start, end) in enumerate(self.slices):
            self.base_layer.weight[start:end] += self.delta_weight(i)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        for i, (start, end) in enumerate(self.slices):
            self.base_layer.weight[start:end] -= self.delta_weight(i)


class RoutableUpdate:
    """Capability of a wrapper whose output is ``base_layer(x)`` plus an update it computes from ``x`` alone, added
    row by row (LoRA, MTLoRA): on a mixed batch the frozen layer runs once and each adapter adds its update to its
    own rows (peft's ``_mixed_batch_forward``; :mod:`vpeft.multi.single_pass`).

    A class declares it by listing :class:`RoutableUpdate` among its own bases: a subclass that inherits it
    (DoRA's wrapper, whose per-row magnitude rescales the frozen output too) is not routable unless it lists it
    again. See :func:`routes_update`.
    """

    def add_update_span_(self, out: torch.Tensor, x: torch.Tensor, start: int, end: int) -> None:
        """Add the update of input rows ``x[start:end]`` to the frozen layer's output rows ``out[start:end]``,
        in place."""
        raise NotImplementedError


def routes_update(module: nn.Module) -> bool:
    """Whether ``module``'s own class declares :class:`RoutableUpdate` (not merely inherits it)."""
    return RoutableUpdate in type(module).__bases__


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def backbone_modules(model: nn.Module, anatomy: Anatomy) -> typing.Iterator[tuple[str, nn.Module]]:
    """Named modules of the model, without the classifier head(s)."""
    for name, module in model.named_modules():
        if name and not anatomy.is_head_param(name):
            yield name, module


def match_pattern(names: typing.Iterable[str], pattern: str) -> list[str]:
    """Module names that fully match a regular expression."""
    regex = re.compile(pattern)
    return [n for n in names if regex.fullmatch(n)]


class SparseUpdate(BaseLayerWrapper):
    """A layer whose parameters train only at chosen entries: ``p + scatter(delta)`` (GPS; SPT's unstructured part).

    ``entries`` maps a parameter name of the layer (``weight``, ``bias``) to flat indices into that
    parameter; each index gets one trainable value, zero at first. The forward builds each updated
    parameter once (one copy of it) and calls the layer with it, so any layer type works (Linear,
    Conv2d, LayerNorm); merging adds the deltas in place. The indices are buffers outside the
    state_dict: they come from the method's config.
    """

    def __init__(self, base_layer: nn.Module, entries: dict[str, torch.Tensor]):
        super().__init__(base_layer)
        self.names = sorted(entries)
        self.delta = nn.ParameterDict()
        for name in self.names:
            param = getattr(base_layer, name)
            index = torch.as_tensor(entries[name], dtype=torch.long, device=param.device)
            if index.numel() and (index.min() < 0 or index.max() >= param.numel()):
                raise ConfigError(f"sparse update: an index of '{name}' is outside its {param.numel()} entries")
            self.register_buffer(f"index_{name}", index, persistent=False)
            self.delta[name] = nn.Parameter(torch.zeros(index.numel(), dtype=param.dtype, device=param.device))

    def index(self, name: str) -> torch.Tensor:
        return getattr(self, f"index_{name}")

    def updated(self, name: str) -> torch.Tensor:
        """The parameter with its delta added at the chosen entries (a new tensor)."""
        param = getattr(self.base_layer, name)
        return param.flatten().index_add(0, self.index(name), self.delta[name].to(param.dtype)).view_as(param)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.names:
            return self.base_layer(x, *args, **kwargs)
        updated = {name: self.updated(name) for name in self.names}
        return torch.func.functional_call(self.base_layer, updated, (x, *args), kwargs)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        for name in self.names:
            getattr(self.base_layer, name).view(-1).index_add_(0, self.index(name), self.delta[name])

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        for name in self.names:
            getattr(self.base_layer, name).view(-1).index_add_(0, self.index(name), -self.delta[name])


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, BatchNorm and timm's norm layers (by class name)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
        "norm" in type(module).__name__.lower()
    )
