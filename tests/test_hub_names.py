"""Backbones named as a Hugging Face Hub repository (hf-hub:) or a local folder in its layout (local-dir:)."""

from __future__ import annotations

import json

import pytest
import timm
from safetensors.torch import save_file

from datagen import make_vtab_task
from vpeft.backbones.create import create_backbone
from vpeft.cli import main
from vpeft.errors import VPeftError

ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    """A backbone saved the way timm / huggingface_hub save one: config.json + model.safetensors."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-vit"
    folder.mkdir()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **ARGS)
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 7, "model_args": ARGS,
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                 "classifier": "head", "num_classes": 7}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return folder, model


def test_local_dir_backbone_loads_its_weights_with_a_new_head(local_dir) -> None:
    folder, saved = local_dir
    model = create_backbone(f"local-dir:{folder}", 4)
    assert model.head.out_features == 4
    own = model.state_dict()
    assert all((own[k] == v).all() for k, v in saved.state_dict().items() if not k.startswith("head."))


def test_cli_trains_and_evaluates_a_local_dir_backbone(local_dir, tmp_path, capsys) -> None:
    folder, _ = local_dir
    task = make_vtab_task(tmp_path / "task", num_classes=3, n_train=24, n_val=6, n_test=12)
    name = f"local-dir:{folder}"
    train = ["train", "--model", name, "--data", f"vtab1k:{task}", "--method", "lora", "--epochs", "1",
             "--warmup-epochs", "0", "--batch-size", "8", "--quiet", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(train) == 0
    record = json.loads((tmp_path / "run/result.json").read_text())
    assert record["model"] == name and record["identity"]["local_dir_sha256"]
    assert main(["eval", "--model", name, "--adapter", str(tmp_path / "run"), "--data", f"vtab1k:{task}"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_local_dir_without_config_and_offline_hub_give_clear_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(VPeftError, match="no config.json there"):
        create_backbone(f"local-dir:{tmp_path}", 3)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VPeftError, match="could not load pretrained weights.*--no-pretrained"):
        create_backbone("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", 3)
