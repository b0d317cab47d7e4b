"""Joint multi-task training on one backbone pass per batch, and delta-m by hand numbers (issue 20)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.multi import MultiAdapterModel, delta_m, multitask_loss

from conftest import make_backbone, make_input


def test_delta_m_by_hand() -> None:
    # task a: 80 -> 84 (+5 %); task b: error 10 -> 12, lower is better (-20 %); mean -7.5 %
    assert delta_m({"a": 84.0, "b": 12.0}, {"a": 80.0, "b": 10.0}, {"b": True}) == pytest.approx(-7.5)
    assert delta_m({"a": 50.0}, {"a": 50.0}) == 0.0
    with pytest.raises(ValueError, match="same tasks"):
        delta_m({"a": 1.0}, {"b": 1.0})


def test_joint_step_equals_the_sum_of_single_task_gradients() -> None:
    mm = MultiAdapterModel(make_backbone("vit"))
    for name, method, classes in (("a", "lora", 3), ("b", "adaptformer", 4), ("c", "vpt_deep", 2)):
        torch.manual_seed(len(name))
        mm.add_adapter(name, method, num_classes=classes)
    mm.train()
    tasks = ["a", "b", "a", "c", "b", "c"]
    x = make_input(len(tasks), seed=3)
    y = torch.tensor([2, 3, 0, 1, 1, 0])
    params = mm.trainable_parameters()
    total, losses = multitask_loss(mm, x, y, tasks)
    joint = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    assert set(losses) == {"a", "b", "c"}
    for task in ("a", "b", "c"):  # each task's adapter gets exactly its own task's gradient
        idx = [i for i, t in enumerate(tasks) if t == task]
        model = mm.get_adapter(task)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        own = {k: p for k, p in params.items() if k.startswith(task + ".")}
        grads = torch.autograd.grad(loss, list(own.values()), allow_unused=True)
        for (key, _), g in zip(own.items(), grads, strict=True):
            j = joint[list(params).index(key)]
            torch.testing.assert_close(j, g, atol=1e-7, rtol=1e-6)


def test_joint_training_learns_every_task_and_moves_nothing_shared() -> None:
    torch.manual_seed(0)
    mm = MultiAdapterModel(make_backbone("vit"))
    before = {k: v.clone() for k, v in mm.backbone.state_dict().items()}
    mm.add_adapter("a", "lora", num_classes=2)
    mm.add_adapter("b", "adaptformer", num_classes=3)
    opt = torch.optim.AdamW(mm.trainable_parameters().values(), lr=3e-2)
    x = make_input(12, seed=7)
    tasks = ["a", "b"] * 6
    y = torch.tensor([i % 2 if t == "a" else i % 3 for i, t in enumerate(tasks)])
    mm.train()
    first = None
    for _ in range(30):
        total, losses = multitask_loss(mm, x, y, tasks)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(losses[k].item() < 0.5 * first[k] for k in first), (first, {k: v.item() for k, v in losses.items()})
    for key, value in mm.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(p.requires_grad for p in mm.backbone.parameters())
    assert vpeft.count_trainable(mm.get_adapter("a")) > 0
