"""MTLoRA: a shared (task-agnostic) low-rank update tied across tasks plus one update per task (issue 20)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vpeft
from vpeft.errors import ConfigError
from vpeft.methods.mtlora import MTLoRALinear
from vpeft.multi import MultiAdapterModel, multitask_loss

from conftest import make_backbone, make_input

D, HIDDEN, DEPTH = 48, 96, 2  # the test ViT
#: (in + out) of each default target of one ViT block: qkv, proj, fc1, fc2
VIT_WIDTHS = (D + 3 * D) + (D + D) + (D + HIDDEN) + (HIDDEN + D)


def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model, include_head=False).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def three_tasks(**options) -> MultiAdapterModel:
    mm = MultiAdapterModel(make_backbone("vit")).eval()
    for i, (name, classes) in enumerate((("a", 3), ("b", 4), ("c", 2))):
        torch.manual_seed(i)
        mm.add_adapter(name, "mtlora", num_classes=classes, **options)
    return mm


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_identity_at_init(backbone: str) -> None:
    x = make_input(3)
    model = vpeft.apply(make_backbone(backbone), "mtlora").eval()
    with torch.no_grad():
        assert torch.equal(model(x), make_backbone(backbone)(x))


@pytest.mark.parametrize(
    "options,tasks,shared,per_task",
    [
        ({}, 3, DEPTH * 8 * VIT_WIDTHS, DEPTH * 8 * VIT_WIDTHS),
        ({"rank": 4, "task_rank": 2}, 2, DEPTH * 4 * VIT_WIDTHS, DEPTH * 2 * VIT_WIDTHS),
        ({"task_blocks": "last"}, 3, DEPTH * 8 * VIT_WIDTHS, 1 * 8 * VIT_WIDTHS),  # task part: the last block only
        ({"targets": ["q", "v"], "rank": 2, "task_rank": 1}, 4, DEPTH * 2 * 2 * (D + D), DEPTH * 2 * 1 * (D + D)),
    ],
)
def test_closed_form_counts(options: dict, tasks: int, shared: int, per_task: int) -> None:
    """The shared rank r once plus every task's rank r_t, each times (in + out) of each adapted layer (slice)."""
    mm = MultiAdapterModel(make_backbone("vit"))
    for t in range(tasks):
        mm.add_adapter(f"t{t}", "mtlora", num_classes=3 + t, **options)
    heads = sum((D + 1) * (3 + t) for t in range(tasks))
    assert sum(p.numel() for p in mm.trainable_parameters().values()) == shared + tasks * per_task + heads
    assert sum(p.numel() for k, p in mm.trainable_parameters().items() if k.startswith("shared.")) == shared
    for t in range(tasks):  # one task's own model: the shared update and its own
        assert vpeft.count_trainable(mm.get_adapter(f"t{t}"), include_head=False) == shared + per_task


def test_task_blocks_last_is_the_last_block_of_each_stage() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             depths=(2, 1, 3), num_heads=(1, 2, 2), embed_dim=16, num_classes=3)  # fmt: skip
    for backbone, last in ((swin, {"layers.0.blocks.1", "layers.1.blocks.0", "layers.2.blocks.2"}),
                           (make_backbone("vit"), {"blocks.1"})):  # fmt: skip
        model = vpeft.apply(backbone, "mtlora", task_blocks="last")
        layers = {n: m for n, m in model.named_modules() if isinstance(m, MTLoRALinear)}
        assert {n.rsplit(".", 2)[0] for n, m in layers.items() if len(m.task_A)} == last
        assert len({n.rsplit(".", 2)[0] for n in layers}) > len(last)  # the others hold the shared update only


def test_shared_update_is_tied_and_gradients_go_where_they_belong() -> None:
    mm = three_tasks()
    wrappers = [dict(mm.get_adapter(t).named_modules())["blocks.0.attn.qkv"] for t in "abc"]
    assert wrappers[0].shared_A[0] is wrappers[1].shared_A[0] is wrappers[2].shared_A[0]
    assert wrappers[0].task_A[0] is not wrappers[1].task_A[0]
    for t in "abc":
        perturb(mm.get_adapter(t), seed=ord(t))
    mm.train()
    x, y = make_input(4, seed=2), torch.tensor([0, 1, 3, 2])
    params = mm.trainable_parameters()
    total, _ = multitask_loss(mm, x, y, ["a", "a", "b", "b"])  # no sample of task c
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True), strict=True))
    for key, g in grads.items():
        if key.startswith("c."):
            assert g is None or not g.any(), key
        else:
            assert g is not None and g.any(), key
    # the shared update's gradient is the sum of the tasks' own
    loss_a = F.cross_entropy(mm.get_adapter("a")(x[:2]), y[:2])
    loss_b = F.cross_entropy(mm.get_adapter("b")(x[2:]), y[2:])
    shared = [k for k in params if k.startswith("shared.")]
    split = torch.autograd.grad(loss_a + loss_b, [params[k] for k in shared])
    for key, g in zip(shared, split, strict=True):
        torch.testing.assert_close(grads[key], g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"task_blocks": "last", "targets": ["q", "v", "fc1"]}])
def test_merge_per_task_equals_unmerged(options: dict, tmp_path) -> None:
    """Each task's model (shared + that task's update) merged == unmerged; the tasks differ."""
    mm = three_tasks(**options)
    for t in "abc":
        perturb(mm.get_adapter(t), seed=ord(t))
    x = make_input(3, seed=5)
    outs = {}
    for t in "abc":
        mm.save_adapter(t, tmp_path / t)
        fresh = make_backbone("vit")
        fresh.reset_classifier(mm.get_adapter(t).num_classes)
        single = vpeft.load_adapter(fresh, tmp_path / t).eval()
        with torch.no_grad():
            outs[t] = single(x)
            torch.testing.assert_close(outs[t], mm.eval().get_adapter(t)(x), atol=1e-6, rtol=1e-6)
            vpeft.merge(single)
            assert not any(isinstance(m, MTLoRALinear) for m in single.modules())
            torch.testing.assert_close(single(x), outs[t], atol=1e-5, rtol=1e-5)
            vpeft.unmerge(single)
            torch.testing.assert_close(single(x), outs[t], atol=1e-5, rtol=1e-5)


def test_save_load_exact_and_tied_again(tmp_path) -> None:
    mm = three_tasks(rank=4, task_rank=2)
    for t in "abc":  # (each perturbs the shared update too: save once all are done)
        perturb(mm.get_adapter(t), seed=ord(t))
    for t in "abc":
        mm.save_adapter(t, tmp_path / t)
    x = make_input(5, seed=3)
    routing = ["a", "b", "c", "b", "a"]
    with torch.no_grad():
        want = mm(x, adapter_names=routing).per_sample()
    back = MultiAdapterModel(make_backbone("vit")).eval()
    for t in "abc":
        back.load_adapter(t, tmp_path / t)
    qkv = [dict(back.get_adapter(t).named_modules())["blocks.1.attn.qkv"] for t in "abc"]
    assert qkv[0].shared_B[0] is qkv[2].shared_B[0]  # tied after loading
    with torch.no_grad():
        got = back(x, adapter_names=routing).per_sample()
    assert all(torch.equal(u, v) for u, v in zip(got, want, strict=True))
    assert sum(p.numel() for p in back.trainable_parameters().values()) == sum(
        p.numel() for p in mm.trainable_parameters().values()
    )
    # an adapter saved from another multi-task model carries another shared update: refused
    other = three_tasks(rank=4, task_rank=2)
    perturb(other.get_adapter("a"), seed=99)
    other.save_adapter("a", tmp_path / "foreign")
    with pytest.raises(ConfigError, match="shared update .* differs"):
        back.load_adapter("foreign", tmp_path / "foreign")
    assert "foreign" not in back.adapter_names


def test_shared_options_must_agree_and_the_group_goes_with_the_last_adapter() -> None:
    mm = MultiAdapterModel(make_backbone("vit"))
    mm.add_adapter("a", "mtlora", num_classes=3, rank=4)
    mm.add_adapter("b", "mtlora", num_classes=3, rank=4, task_rank=2)  # task ranks may differ
    with pytest.raises(ConfigError, match="need the same"):
        mm.add_adapter("c", "mtlora", num_classes=3, rank=8)
    mm.delete_adapter("a")
    mm.delete_adapter("b")
    assert not mm._shared_trainable
    mm.add_adapter("c", "mtlora", num_classes=3, rank=8)  # a new group with the new options
    assert not any(k.startswith("a.") for k in mm.trainable_parameters())


def test_joint_training_learns_every_task() -> None:
    torch.manual_seed(0)
    mm = three_tasks(rank=2, task_rank=2)
    before = {k: v.clone() for k, v in mm.backbone.state_dict().items()}
    opt = torch.optim.AdamW(mm.trainable_parameters().values(), lr=3e-2)
    tasks = ["a", "b", "c"] * 4
    x = make_input(len(tasks), seed=7)
    y = torch.tensor([i % {"a": 3, "b": 4, "c": 2}[t] for i, t in enumerate(tasks)])
    mm.train()
    first = None
    for _ in range(25):
        total, losses = multitask_loss(mm, x, y, tasks)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(losses[k].item() < 0.5 * first[k] for k in first)
    assert all(torch.equal(v, before[k]) for k, v in mm.backbone.state_dict().items())
