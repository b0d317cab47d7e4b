"""GPS: gradient-based parameter selection.

Zhang et al., "Gradient-based Parameter Selection for Efficient Fine-Tuning", CVPR 2024. Stage
(reads the training split, no optimizer step): one pass over the training set, two augmented
views of every image, accumulating the gradient of a supervised-contrastive loss (SupCon,
temperature 0.07) on the pooled features before the head. Selection: in every row (output
neuron) of every weight matrix, the ``k`` input connections with the largest |gradient| (a
convolution's row is its output channel over in x kh x kw). Training: those entries as a sparse
delta on the frozen weight (zero at first, so the model starts unchanged), every other parameter
of the backbone's layers (biases, layer scales, Swin's relative position bias tables) fully, the
head fully; norms, position embeddings and class/register tokens stay frozen. Merging adds the
deltas into the weights.

The official code (FightingFighting/GPS: train_gps.py, utils/pruning.py) masks the gradient of
the full weights with Adam and no weight decay; a sparse delta trains the same entries and
counts and saves only them. The views follow its contrastive transform: random resized crop,
horizontal flip, colour jitter (p 0.8), grayscale (p 0.2), applied here to the decoded,
resized training images. Its gradient pass runs in training mode with drop-path 0; here it runs in
evaluation mode (no dropout, drop-path or BatchNorm statistics updates).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.data.transforms import input_config
from vpeft.errors import ConfigError
from vpeft.methods.base import (
    Method,
    SelectionConfig,
    SparseUpdate,
    Stage,
    StageData,
    accumulate_gradients,
    backbone_modules,
    is_norm,
    register,
    replace_module,
)


@dataclass
class GPSConfig(SelectionConfig):
    k: int = option(
        1, "input connections trained per row of every weight matrix (official: 1 on VTAB-1k, 1-20 on FGVC)"
    )
    temperature: float = option(0.07, "temperature of the supervised-contrastive loss of the gradient pass")
    batch_size: int = option(16, "images per batch of the gradient pass, two views each (the official scripts' 16)")
    selection: dict[str, Any] | None = option(
        None,
        "decided by the gradient pass: flat indices of the trained entries per weight matrix; saved with the "
        "adapter (set it only to reuse a saved selection)",
    )

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"gps: k must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ConfigError(f"gps: temperature must be > 0, got {self.temperature}")
        if self.batch_size < 2:
            raise ConfigError(f"gps: batch_size must be >= 2, got {self.batch_size}")


def layout(model: nn.Module, anatomy: Anatomy) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    """(weight matrices by module name, parameters that train fully), head excluded.

    Matrices are the weights of Linear and Conv2d layers; every other parameter of a non-norm layer
    below the model's root trains fully. Norms and root parameters (position embeddings, class,
    distillation and register tokens) stay frozen.
    """
    matrices: dict[str, nn.Module] = {}
    full: list[nn.Parameter] = []
    for name, module in backbone_modules(model, anatomy):
        if is_norm(module):
            continue
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            matrices[name] = module
            own.pop("weight")
        full.extend(own.values())
    return matrices, full


def _rows(weight: torch.Tensor, k: int) -> tuple[int, int, int]:
    rows, fan_in = weight.shape[0], weight[0].numel()
    return rows, fan_in, min(k, fan_in)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) of ``features`` (2B x d: view 1, then view 2).

    Every sample is an anchor; its positives are the other samples of its class, its own other view included.
    """
    z = F.normalize(features.float(), dim=-1)
    labels = labels.repeat(2)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()


class TwoViews:
    """The official contrastive transform, per image, on normalised inputs: crop, flip, colour jitter, grayscale.

    The crop is resized back to the input's own size. Draws from the global random state: seed it.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        from torchvision.transforms import v2 as T

        self.T = T
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """2B views of a batch of B normalised images: the first view of every image, then the second."""
        T = self.T
        transform = T.Compose([
            T.RandomResizedCrop(tuple(x.shape[-2:]), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])  # fmt: skip
        device, x = x.device, x.detach().cpu().float()
        images = (x * self.std + self.mean).clamp(0, 1)
        views = [torch.stack([transform(img) for img in images]) for _ in range(2)]
        return ((torch.cat(views) - self.mean) / self.std).to(device)


@register
class GPS(Method):
    name = "gps"
    family = "partial/specification"
    paper = "Zhang et al., Gradient-based Parameter Selection (GPS), CVPR 2024 (arXiv 2312.10136)"
    requires = frozenset()
    mergeable = True
    config_class = GPSConfig
    stage = Stage("gradients", "train", "one pass of supervised-contrastive gradients over the training split")

    def prepare(self, model: nn.Module, anatomy: Anatomy, config: GPSConfig, data: StageData) -> GPSConfig:
        matrices, _ = layout(model, anatomy)
        cfg = input_config(model)
        views = TwoViews(cfg.mean, cfg.std)

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            features = model.forward_head(model.forward_features(views(x)), pre_logits=True)
            return supcon_loss(features, y, config.temperature)

        with torch.random.fork_rng(devices=[]):  # the views' randomness: seeded, and the caller's stream untouched
            torch.manual_seed(data.seed)
            grads = accumulate_gradients(
                model,
                {name: m.weight for name, m in matrices.items()},
                data.batches(config.batch_size, shuffle=True),
                loss,
            )
        selection = {}
        for name, grad in grads.items():
            rows, fan_in, k = _rows(grad, config.k)
            order = grad.abs().reshape(rows, fan_in).sort(dim=1, descending=True, stable=True).indices[:, :k]
            flat = order.sort(dim=1).values + torch.arange(rows, device=order.device)[:, None] * fan_in
            selection[name] = flat.flatten().tolist()
        return replace(config, selection=selection)

    def inject(self, model: nn.Module, anatomy: Anatomy, config: GPSConfig) -> None:
        if config.selection is None:
            raise ConfigError("gps: no selection; apply it with data=<training set> (vpeft.apply) or load an adapter")
        matrices, full = layout(model, anatomy)
        missing = sorted(set(matrices) - set(config.selection))
        unknown = sorted(set(config.selection) - set(matrices))
        if missing or unknown:
            raise ConfigError(
                f"gps: the selection does not fit this model (missing {missing[:3]}, unknown {unknown[:3]}); "
                "it was made for another backbone"
            )
        for param in full:
            param.requires_grad_(True)
        for name, module in matrices.items():
            rows, _, k = _rows(module.weight, config.k)
            index = torch.as_tensor(config.selection[name], dtype=torch.long)
            if index.numel() != rows * k:
                raise ConfigError(f"gps: '{name}' has {index.numel()} selected entries, expected {rows} rows x {k}")
            replace_module(model, name, SparseUpdate(module, {"weight": index}))
