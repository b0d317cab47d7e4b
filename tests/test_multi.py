"""Named adapters on one frozen backbone: switching, mixed batches, sharing, save/load (issue 20)."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.backbones.vit import VIT_PARTS
from vpeft.errors import ConfigError, VPeftError
from vpeft.multi import BASE, MultiAdapterModel

from conftest import IMG, make_backbone, make_input

METHODS = [m["name"] for m in vpeft.list_methods()]
SHAREABLE = [m for m in METHODS if vpeft.get_method(m).shareable]
#: methods whose default config reads the training split first (E2VPT's pruning is off by default)
STAGED = {m for m in METHODS if vpeft.get_method(m).stage and not vpeft.get_method(m).prepared(vpeft.make_config(m))}
#: (method, backbone) pairs beyond the ViT column: one per family where the method applies
EXTRA = [("lora", "swin"), ("lora", "resnet"), ("ssf", "convnext"), ("bitfit", "efficientnet"), ("adapter", "swin")]
CASES = [(m, "vit") for m in SHAREABLE if vpeft.get_method(m).requires <= VIT_PARTS] + EXTRA


def stage_data(num_classes: int, n: int = 8) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.arange(n) % num_classes)


def add(mm: MultiAdapterModel, name: str, method: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """Add an adapter and move its trainable weights off their init (B = 0, up = 0 ...) so it changes the output."""
    data = stage_data(num_classes) if method in STAGED else None
    torch.manual_seed(seed)
    model = mm.add_adapter(name, method, num_classes=num_classes, data=data)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def reference(mm: MultiAdapterModel, name: str, backbone: str, tmp_path) -> torch.nn.Module:
    """Adapter ``name`` alone, as vpeft builds it without a MultiAdapterModel: saved, loaded onto a fresh model."""
    folder = tmp_path / name
    mm.save_adapter(name, folder)
    fresh = make_backbone(backbone)
    fresh.reset_classifier(vpeft.read_adapter_config(folder)["backbone"]["num_classes"])
    return vpeft.load_adapter(fresh, folder).eval()


@pytest.mark.parametrize(
    "methods", [("lora", "adaptformer"), ("vpt_deep", "bitfit", "prefix"), ("lora", "lora", "ssf")]
)
def test_switching_gives_each_adapters_own_outputs(methods: tuple[str, ...], tmp_path) -> None:
    mm = MultiAdapterModel(make_backbone("vit")).eval()
    x = make_input(4)
    plain = make_backbone("vit")(x)
    names = [f"t{i}" for i in range(len(methods))]
    for i, (name, method) in enumerate(zip(names, methods, strict=True)):
        add(mm, name, method, num_classes=3 + 2 * i, seed=i)
    assert mm.active_adapter == "t0"
    refs = {name: reference(mm, name, "vit", tmp_path)(x) for name in names}
    for name in [*names, *reversed(names)]:
        mm.set_adapter(name)
        assert torch.equal(mm(x), refs[name])
    assert len({refs[n].shape[-1] for n in names}) == len(names)  # heads of different class counts
    with mm.disable_adapter():
        assert torch.equal(mm(x), plain)
    assert mm.active_adapter == names[0]  # the last one set, back after the with block
    mm.delete_adapter(names[0])
    assert names[0] not in mm.adapter_names
    for name in names[1:]:
        mm.set_adapter(name)
        assert torch.equal(mm(x), refs[name])
    mm.set_adapter(BASE)
    assert torch.equal(mm(x), plain)


@pytest.mark.parametrize("method,backbone", CASES)
def test_mixed_batch_equals_each_adapter_alone(method: str, backbone: str, tmp_path) -> None:
    """One forward over samples of three tasks (and the plain backbone) == each sample through its adapter alone."""
    mm = MultiAdapterModel(make_backbone(backbone)).eval()
    add(mm, "m", method, num_classes=3, seed=1)
    add(mm, "other", "lora", num_classes=7, seed=2)
    add(mm, "m2", method, num_classes=4, seed=3)
    names = ["m", "other", BASE, "m2", "m", "other", "m2"]
    x = make_input(len(names), seed=4)
    with torch.no_grad():
        out = mm(x, adapter_names=names)
        refs = {n: reference(mm, n, backbone, tmp_path) for n in ("m", "other", "m2")}
        refs[BASE] = make_backbone(backbone).eval()
        rows = out.per_sample()
        for i, name in enumerate(names):
            alone = refs[name](x[i : i + 1])[0]  # the sample alone, through the adapter built on its own
            torch.testing.assert_close(rows[i], alone, atol=1e-6, rtol=1e-6)
        grouped = mm(x, adapter_names=names, single_pass=False)  # (auto runs all-LoRA batches in one pass)
        for name, (index, logits) in grouped.groups.items():  # a group through the reference: bit-identical
            assert torch.equal(logits, refs[name](x[index]))


@pytest.mark.parametrize("method,backbone", CASES)
def test_copies_share_the_frozen_backbone(method: str, backbone: str) -> None:
    """Every copy holds the backbone's frozen tensors by identity; training one adapter moves nothing shared."""
    base = make_backbone(backbone)
    before = copy.deepcopy(base.state_dict())
    mm = MultiAdapterModel(base).eval()
    a = add(mm, "a", method, num_classes=3, seed=1)
    b = add(mm, "b", method, num_classes=4, seed=2)
    anatomy = vpeft.describe(base)
    ids = {id(p) for n, p in base.named_parameters() if not anatomy.is_head_param(n)}
    assert not any(p.requires_grad for p in base.parameters())
    for model in (a, b):
        held = {id(p) for p in model.parameters()}
        trained = {id(p) for p in vpeft.trainable_parameters(model).values()}
        assert not trained & ids  # what trains is private
        shared = held & ids
        assert len(shared) >= len(ids) - len(trained) - 4 or method in ("partial_k", "ln_tune", "bitfit")
    x = make_input(3, seed=6)
    out_b = b(x).detach()
    opt = torch.optim.SGD(list(mm.trainable_parameters(["a"]).values()), lr=0.1)
    mm.train()
    a(x).square().mean().backward()
    opt.step()
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    mm.eval()
    if vpeft.get_method(method).task_shared_parameters(b):  # MTLoRA: the shared update trains with every task
        assert not torch.equal(b(x), out_b)
    else:
        assert torch.equal(b(x), out_b)


def test_adapter_memory_is_the_adapters_own() -> None:
    mm = MultiAdapterModel(make_backbone("vit"))
    model = mm.add_adapter("l", "lora", num_classes=3, rank=2)
    own = sum(p.numel() * 4 for p in vpeft.trainable_parameters(model).values())
    assert mm.adapter_bytes("l") == own
    assert mm.adapter_bytes("l") < mm.shared_bytes() / 10


def test_load_adapter_by_name(tmp_path) -> None:
    single = vpeft.apply(make_backbone("vit"), "bitfit")
    with torch.no_grad():
        for p in vpeft.trainable_parameters(single).values():
            p.add_(0.1)
    vpeft.save_adapter(single, tmp_path / "bitfit")
    mm = MultiAdapterModel(make_backbone("vit")).eval()
    add(mm, "lora", "lora", num_classes=6)
    x = make_input(2)
    lora_out = mm(x)
    mm.load_adapter("bitfit", tmp_path / "bitfit")
    mm.set_adapter("bitfit")
    assert torch.equal(mm(x), single.eval()(x))
    mm.set_adapter("lora")
    assert torch.equal(mm(x), lora_out)  # loading wrote into the copy's own biases, not the shared ones


def test_refusals() -> None:
    mm = MultiAdapterModel(make_backbone("vit"))
    with pytest.raises(ConfigError, match="cannot share"):
        mm.add_adapter("f", "full")
    mm.add_adapter("a", "lora")
    with pytest.raises(ConfigError, match="exists"):
        mm.add_adapter("a", "lora")
    with pytest.raises(ConfigError, match="not allowed"):
        mm.add_adapter("a.b", "lora")
    with pytest.raises(VPeftError, match="no adapter 'zz'"):
        mm.set_adapter("zz")
    with pytest.raises(ConfigError, match="names for a batch"):
        mm(make_input(2), adapter_names=["a"])
    with pytest.raises(VPeftError, match="already has"):
        MultiAdapterModel(vpeft.apply(make_backbone("vit"), "lora"))


def test_mixed_output_stack_and_per_sample() -> None:
    mm = MultiAdapterModel(make_backbone("vit")).eval()
    add(mm, "a", "lora", num_classes=5)
    add(mm, "b", "ssf", num_classes=5)
    x = make_input(4)
    out = mm(x, adapter_names=["b", "a", "a", "b"])
    stacked = out.stack()
    assert torch.equal(stacked[1], out.per_sample()[1])
    mm.delete_adapter("b")
    add(mm, "b", "ssf", num_classes=2)
    with pytest.raises(VPeftError, match="different class counts"):
        mm(x, adapter_names=["b", "a", "a", "b"]).stack()


def test_a_method_says_whether_its_adapters_can_share_a_backbone() -> None:
    """multi asks the method (``Method.shareable``), not a list of names; a routable update is a layer capability."""
    from vpeft.methods.base import routes_update
    from vpeft.methods.dora import DoRALinear
    from vpeft.methods.lora import LoRALinear
    from vpeft.multi import check_shareable

    assert not vpeft.get_method("full").shareable and vpeft.get_method("lora").shareable
    with pytest.raises(ConfigError, match="cannot share a backbone: full fine-tuning"):
        check_shareable("full")
    check_shareable("lora")
    layer = torch.nn.Linear(4, 4)
    assert routes_update(LoRALinear(layer, [(0, 4)], 2, 1.0, 0.0))
    assert not routes_update(DoRALinear(torch.nn.Linear(4, 4), [(0, 4)], 2, 1.0, 0.0))
