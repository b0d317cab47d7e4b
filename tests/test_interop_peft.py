"""vpeft LoRA/DoRA <-> peft LoRA/DoRA on timm models: the same logits both ways (issue 20)."""

from __future__ import annotations

import pytest
import torch

import vpeft
from vpeft.errors import AdapterMismatchError
from vpeft.interop import PEFT_SUBDIR, export_to_peft, import_from_peft

peft = pytest.importorskip("peft")
from conftest import make_backbone, make_input  # noqa: E402

TOL = dict(atol=1e-6, rtol=1e-6)

#: (backbone, vpeft method, options): q/v slices of a fused qkv, mixed ranks (qkv 2r + fc1 r), Swin, CNN convs
EXPORT_CASES = [
    ("vit", "lora", {"rank": 4}),
    ("vit", "lora", {"rank": 2, "alpha": 5.0, "targets": ["q", "v", "fc1"]}),
    ("vit", "lora", {"rank": 3, "targets": ["k", "proj"]}),
    ("deit_distilled", "lora", {"rank": 2}),
    ("swin", "lora", {"rank": 2, "targets": ["qkv", "fc2"]}),
    ("resnet", "lora", {"rank": 2}),
    ("convnext", "lora", {"rank": 2}),
    ("vit", "dora", {"rank": 4}),
    ("vit", "dora", {"rank": 2, "alpha": 3.0, "targets": ["q", "k", "v", "fc2"]}),
]


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("backbone,method,options", EXPORT_CASES)
def test_export_then_peft_load_gives_the_same_logits(backbone: str, method: str, options: dict, tmp_path) -> None:
    model = vpeft.apply(make_backbone(backbone), method, **options)
    _perturb(model)
    model.eval()
    vpeft.save_adapter(model, tmp_path)  # vpeft's files and peft's share the folder without clashing
    out = export_to_peft(model, tmp_path)
    assert out == tmp_path / PEFT_SUBDIR
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "adapter.safetensors").is_file() and vpeft.read_adapter_config(tmp_path)["method"] == method
    loaded = peft.PeftModel.from_pretrained(make_backbone(backbone), str(out)).eval()
    x = make_input(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **TOL)
        back = import_from_peft(make_backbone(backbone), tmp_path).eval()  # and round trip into vpeft
        torch.testing.assert_close(back(x), model(x), **TOL)


#: (backbone, peft LoraConfig options): plain, per-layer ranks and alphas, rsLoRA, DoRA, conv layers
IMPORT_CASES = [
    ("vit", {"r": 4, "lora_alpha": 8, "target_modules": ["qkv", "fc2"]}),
    (
        "vit",
        {
            "r": 2,
            "lora_alpha": 3,
            "target_modules": ["qkv", "proj", "fc1"],
            "rank_pattern": {"blocks.1.attn.qkv": 6},
            "alpha_pattern": {"fc1": 7},
        },
    ),
    ("vit", {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": ["fc1"]}),
    ("vit", {"r": 3, "lora_alpha": 6, "use_dora": True, "target_modules": ["qkv", "fc1"]}),
    ("swin", {"r": 2, "lora_alpha": 2, "target_modules": ["qkv"]}),
    ("resnet", {"r": 2, "lora_alpha": 4, "target_modules": r".*layer\d\.\d\.conv\d"}),
]


@pytest.mark.parametrize("backbone,options", IMPORT_CASES)
def test_peft_save_then_import_gives_the_same_logits(backbone: str, options: dict, tmp_path) -> None:
    base = make_backbone(backbone)
    head = [n for n, _ in base.named_modules() if n and vpeft.describe(base).is_head_param(n + ".weight")]
    config = peft.LoraConfig(init_lora_weights=False, modules_to_save=head, **options)
    torch.manual_seed(0)
    trained = peft.get_peft_model(base, config)
    with torch.no_grad():  # a "trained" head and magnitudes, not their init
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trained.save_pretrained(str(tmp_path))
    x = make_input(3)
    model = import_from_peft(make_backbone(backbone), tmp_path).eval()
    assert vpeft.get_state(model).method == ("dora" if options.get("use_dora") else "lora")
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained.eval()(x), **TOL)


def test_import_refuses_a_vpeft_folder(tmp_path) -> None:
    vpeft.save_adapter(vpeft.apply(make_backbone("vit"), "lora"), tmp_path)
    with pytest.raises(AdapterMismatchError, match="vpeft adapter"):
        import_from_peft(make_backbone("vit"), tmp_path)


def test_export_refuses_other_methods(tmp_path) -> None:
    with pytest.raises(vpeft.VPeftError, match="only vpeft LoRA and DoRA"):
        export_to_peft(vpeft.apply(make_backbone("vit"), "ssf"), tmp_path)
