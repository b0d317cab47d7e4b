"""Single-pass mixed batches: the frozen layers once on the whole batch, each LoRA/MTLoRA on its own rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.errors import ConfigError
from vpeft.multi import BASE, MultiAdapterModel, multitask_loss, routable_wrappers
from vpeft.multi.single_pass import RoutedLayer

from conftest import make_backbone, make_input

#: backbone -> adapters (name, method, options): LoRA on slices and whole layers, convs, MTLoRA (tied shared)
CASES = {
    "vit": [("a", "lora", {}), ("b", "lora", {"rank": 3, "targets": ["k", "proj", "fc1"]}),
            ("c", "mtlora", {"rank": 2, "task_rank": 3}), ("d", "mtlora", {"rank": 2, "task_rank": 3})],
    "deit_distilled": [("a", "lora", {}), ("b", "mtlora", {"task_blocks": "last"})],
    "vit_reg_avg": [("a", "lora", {"targets": ["qkv", "fc2"]}), ("b", "lora", {"alpha": 3.0})],
    "swin": [("a", "lora", {"targets": ["qkv", "fc1"]}), ("b", "mtlora", {}), ("c", "lora", {})],
    "resnet": [("a", "lora", {"rank": 2}), ("b", "lora", {"rank": 4})],
    "convnext": [("a", "lora", {}), ("b", "lora", {"rank": 2})],
}  # fmt: skip


def build(backbone: str, adapters) -> MultiAdapterModel:
    mm = MultiAdapterModel(make_backbone(backbone)).eval()
    for i, (name, method, options) in enumerate(adapters):
        torch.manual_seed(i)
        model = mm.add_adapter(name, method, num_classes=3 + i, **options)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in vpeft.trainable_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return mm


def alone(mm: MultiAdapterModel, name: str, backbone: str, tmp_path) -> torch.nn.Module:
    """Adapter ``name`` as vpeft builds it on its own: saved, then loaded onto a fresh backbone."""
    if name == BASE:
        return make_backbone(backbone)
    mm.save_adapter(name, tmp_path / name)
    fresh = make_backbone(backbone)
    fresh.reset_classifier(vpeft.read_adapter_config(tmp_path / name)["backbone"]["num_classes"])
    return vpeft.load_adapter(fresh, tmp_path / name).eval()


@pytest.mark.parametrize("backbone", list(CASES))
def test_single_pass_equals_each_adapter_alone(backbone: str, tmp_path) -> None:
    adapters = CASES[backbone]
    mm = build(backbone, adapters)
    names = [n for n, _, _ in adapters]
    assert mm.single_pass_capable() == sorted(names)
    routing = [names[i % len(names)] for i in range(2 * len(names))] + [BASE]
    routing[1], routing[-2] = routing[-2], routing[1]  # groups not contiguous
    x = make_input(len(routing), seed=4)
    calls = []
    for module in mm._single_pass_router()[1].model.modules():
        if isinstance(module, RoutedLayer):
            module.base_layer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        rows = mm(x, adapter_names=routing, single_pass=True).per_sample()
        refs = {n: alone(mm, n, backbone, tmp_path) for n in set(routing)}
        for i, name in enumerate(routing):
            torch.testing.assert_close(rows[i], refs[name](x[i : i + 1])[0], atol=1e-6, rtol=1e-6)
        grouped = mm(x, adapter_names=routing, single_pass=False).per_sample()
        for a, b in zip(rows, grouped, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # every frozen layer some adapter adapts ran once, on the whole batch (Swin: batch x windows rows)
    assert calls and all(n % len(routing) == 0 for n in calls)
    assert len(calls) == sum(isinstance(m, RoutedLayer) for m in mm._single_pass_router()[1].model.modules())


def test_auto_falls_back_to_groups_and_single_pass_true_refuses() -> None:
    mm = build("vit", [("a", "lora", {}), ("b", "adaptformer", {})])
    assert mm.single_pass_capable() == ["a"]
    x = make_input(4)
    with torch.no_grad():
        auto = mm(x, adapter_names=["a", "b", "a", "b"]).per_sample()
        grouped = mm(x, adapter_names=["a", "b", "a", "b"], single_pass=False).per_sample()
        assert all(torch.equal(u, v) for u, v in zip(auto, grouped, strict=True))
        with pytest.raises(ConfigError, match=r"\['b'\] cannot run in a single pass"):
            mm(x, adapter_names=["a", "b", "a", "b"], single_pass=True)
        single = mm(x, adapter_names=["a", "a", BASE, "a"], single_pass=True)  # b absent: one pass
        assert set(single.groups) == {"a", BASE}


@pytest.mark.parametrize(
    "method,routable",
    [("lora", True), ("mtlora", True), ("dora", False), ("bitfit", False), ("ssf", False), ("vpt_deep", False),
     ("adapter", False), ("prefix", False), ("gps", False)],
)  # fmt: skip
def test_which_adapters_are_additive(method: str, routable: bool) -> None:
    backbone = make_backbone("vit")
    mm = MultiAdapterModel(backbone)
    data = torch.utils.data.TensorDataset(make_input(6), torch.arange(6) % 3) if method == "gps" else None
    model = mm.add_adapter("x", method, num_classes=3, data=data)
    assert (routable_wrappers(backbone, model) is not None) is routable


def test_single_pass_gradients_equal_grouped_ones() -> None:
    """Joint training in one pass: every adapter's (and the shared MTLoRA update's) gradient as in groups."""
    mm = build("vit", [("a", "lora", {}), ("b", "mtlora", {}), ("c", "mtlora", {}), ("d", "lora", {"rank": 2})])
    mm.train()
    tasks = ["a", "b", "c", "d", "b", "a", "c", "d"]
    x, y = make_input(len(tasks), seed=9), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])
    params = mm.trainable_parameters()
    assert any(k.startswith("shared.mtlora.") for k in params)
    grads = {}
    for single in (True, False):
        out = mm(x, adapter_names=tasks, single_pass=single)
        loss = sum(F.cross_entropy(logits, y[index]) for index, logits in out.groups.values())
        grads[single] = torch.autograd.grad(loss, list(params.values()))
    for key, g1, g2 in zip(params, grads[True], grads[False], strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5, msg=key)
    total, losses = multitask_loss(mm, x, y, tasks)  # the default path is the single pass here
    assert set(losses) == {"a", "b", "c", "d"} and total.requires_grad


def test_router_follows_adapter_changes() -> None:
    mm = build("vit", [("a", "lora", {}), ("b", "lora", {})])
    x = make_input(3)
    with torch.no_grad():
        before = mm(x, adapter_names=["a", "b", "a"]).per_sample()
        mm.delete_adapter("b")
        torch.manual_seed(5)
        mm.add_adapter("b", "lora", num_classes=6, rank=2)
        after = mm(x, adapter_names=["a", "b", "a"]).per_sample()
        mm.set_adapter("b")
        torch.testing.assert_close(after[1], mm(x[1:2])[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(before[0], after[0]) and after[1].shape != before[1].shape


def test_single_pass_gathers_the_input_once_and_nothing_per_layer() -> None:
    """One index_select of the input images (the batch put in adapter order); no per-layer gather or scatter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    mm = build("vit", [("a", "lora", {}), ("b", "mtlora", {}), ("c", "lora", {"targets": ["qkv", "fc1"]})])
    x = make_input(6)
    with torch.no_grad():
        for routing, gathers in ((["a", "a", "b", "c", "c", BASE], 0), (["c", "a", "b", "a", BASE, "c"], 1)):
            with Ops() as ops:
                mm(x, adapter_names=routing, single_pass=True)
            assert ops.names.count("index_select") == gathers, routing
            assert not {"index_add", "index_add_", "index_put", "index_put_", "index"} & set(ops.names)
