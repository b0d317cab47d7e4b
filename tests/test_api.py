"""The public API's contracts: options, errors, adapter files, the command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import vpeft
from vpeft.backbones.anatomy import PARTS
from vpeft.cli import main
from vpeft.methods.lora import LoRAConfig

from conftest import make_backbone, make_input


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(vpeft.UnknownMethodError, match=r"unknown method 'loar'.*lora.*ssf"):
        vpeft.apply(make_backbone("vit"), "loar")


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(vpeft.ConfigError, match=r"unknown option\(s\) \['rnak'\].*'rank'.*'targets'"):
        vpeft.apply(make_backbone("vit"), "lora", rnak=4)


def test_bad_option_values() -> None:
    with pytest.raises(vpeft.ConfigError, match="rank must be >= 1"):
        vpeft.apply(make_backbone("vit"), "lora", rank=0)
    with pytest.raises(vpeft.ConfigError, match="unknown target 'z'"):
        vpeft.apply(make_backbone("vit"), "lora", targets=["z"])
    with pytest.raises(vpeft.ConfigError, match="expects"):
        vpeft.make_config("lora", rank="eight")
    with pytest.raises(vpeft.ConfigError, match="partial_k: k=9 exceeds the 2 blocks"):
        vpeft.apply(make_backbone("vit"), "partial_k", k=9)


def test_string_options_are_converted() -> None:
    config = vpeft.make_config("lora", rank="4", alpha="8", targets="q,k,v", dropout="0.1")
    assert config == LoRAConfig(rank=4, alpha=8.0, targets=["q", "k", "v"], dropout=0.1)


def test_apply_accepts_config_object() -> None:
    model = vpeft.apply(make_backbone("vit"), LoRAConfig(rank=2, targets=["qkv"]))
    assert vpeft.count_trainable(model, include_head=False) == 2 * (48 * 2 + 2 * 144)


def test_apply_twice_refused() -> None:
    model = vpeft.apply(make_backbone("vit"), "bitfit")
    with pytest.raises(vpeft.VPeftError, match="already has vpeft method 'bitfit'"):
        vpeft.apply(model, "lora")


def test_unsupported_backbone_says_so() -> None:
    with pytest.raises(vpeft.UnsupportedBackboneError, match="lacks isotropic, tokens"):
        vpeft.apply(make_backbone("swin"), "vpt_deep")
    with pytest.raises(vpeft.UnsupportedBackboneError, match="does not know the anatomy of Linear"):
        vpeft.apply(torch.nn.Linear(2, 2), "lora")


def test_load_onto_other_architecture_names_both(tmp_path) -> None:
    model = vpeft.apply(make_backbone("vit"), "bitfit")
    vpeft.save_adapter(model, tmp_path)
    with pytest.raises(
        vpeft.AdapterMismatchError, match=r"saved for backbone vit_tiny_patch16_224.*this model is test_resnet"
    ):
        vpeft.load_adapter(make_backbone("resnet"), tmp_path)
    deeper = make_backbone("vit_reg_cls")  # same timm name, other structure
    with pytest.raises(vpeft.AdapterMismatchError, match="structure"):
        vpeft.load_adapter(deeper, tmp_path)


def test_load_with_other_head_size(tmp_path) -> None:
    import timm

    model = vpeft.apply(make_backbone("vit"), "lora")
    vpeft.save_adapter(model, tmp_path)
    from conftest import VIT_KW

    other = timm.create_model("vit_tiny_patch16_224", **{**VIT_KW, "num_classes": 7})
    with pytest.raises(vpeft.AdapterMismatchError, match="num_classes=5"):
        vpeft.load_adapter(other, tmp_path)


def test_load_warns_on_other_weights(tmp_path) -> None:
    model = vpeft.apply(make_backbone("vit", seed=0), "lora")
    vpeft.save_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match="weights differ"):
        vpeft.load_adapter(make_backbone("vit", seed=1), tmp_path)


def test_adapter_files(tmp_path) -> None:
    model = vpeft.apply(make_backbone("vit"), "lora", rank=4)
    vpeft.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "lora" and saved["options"]["rank"] == 4
    assert saved["backbone"]["architecture"] == "vit_tiny_patch16_224"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        vpeft.load_adapter(make_backbone("vit"), tmp_path / "missing")


def test_save_while_merged_refused(tmp_path) -> None:
    model = vpeft.merge(vpeft.apply(make_backbone("vit"), "lora"))
    with pytest.raises(vpeft.VPeftError, match="unmerge"):
        vpeft.save_adapter(model, tmp_path)


def test_merged_then_deepcopied_model_still_unmerges() -> None:
    base = make_backbone("vit")
    model = vpeft.apply(copy.deepcopy(base), "ssf", init_std=0.1)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(vpeft.merge(model))
        torch.testing.assert_close(vpeft.unmerge(twin)(x), expected, rtol=1e-5, atol=1e-5)


def test_cli_methods_lists_every_method(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in vpeft.list_methods():
        assert f"| {m['name']}" in out


def test_list_methods_fields() -> None:
    for m in vpeft.list_methods():
        assert set(m) == {"name", "family", "paper", "requires", "mergeable", "options"}
        assert set(m["requires"]) <= PARTS
        assert all(text for text in m["options"].values()), f"{m['name']} has an option without help"
