"""Joint multi-task training on one backbone, and the delta-m metric of multi-task learning."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from vpeft.multi.model import BASE, MultiAdapterModel


def multitask_loss(
    model: MultiAdapterModel,
    x: torch.Tensor,
    y: torch.Tensor,
    task_names: Sequence[str],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    weights: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed loss of a batch mixed from several tasks (one adapter per task), and each task's loss.

    One forward of the mixed batch: a single pass of the frozen layers when every task's adapter is an
    additive low-rank update (LoRA, MTLoRA), else one pass per task group (each sample passes the shared
    frozen backbone once either way); the sum, ``sum_t weights[t] * mean loss of task t``, takes one
    ``backward()`` that reaches every task's adapter and head (and MTLoRA's shared update, from every
    task). Labels are each task's own class indices.
    """
    if BASE in task_names or None in task_names:
        raise ValueError("every sample of a training batch needs a task adapter (not the plain backbone)")
    out = model(x, adapter_names=task_names)
    losses = {name: loss_fn(logits, y[index.to(y.device)]) for name, (index, logits) in out.groups.items()}
    total = sum((weights or {}).get(name, 1.0) * loss for name, loss in losses.items())
    return total, losses  # type: ignore[return-value]


def delta_m(
    multi: Mapping[str, float], single: Mapping[str, float], lower_is_better: Mapping[str, bool] | None = None
) -> float:
    """Mean relative gain (in %) of multi-task scores over single-task ones (Maninis et al. 2019; MTLoRA):

    ``100 / T * sum_t (-1)^{l_t} (M_t - S_t) / S_t``, with ``l_t = 1`` for metrics where lower is better.
    """
    if set(multi) != set(single) or not multi:
        raise ValueError(f"delta_m needs the same tasks in both: {sorted(multi)} vs {sorted(single)}")
    lower = lower_is_better or {}
    gains = [(-1 if lower.get(t, False) else 1) * (multi[t] - single[t]) / single[t] for t in multi]
    return 100.0 * sum(gains) / len(gains)
