"""Small random-init timm backbones, one per anatomy case the library supports."""

from __future__ import annotations

import os

import timm
import torch

# pytest -n 2 runs two workers on a 2-core machine: one torch thread each avoids oversubscription
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

NUM_CLASSES = 5
IMG = 32

VIT_KW = dict(img_size=IMG, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=NUM_CLASSES)

#: name -> (timm model name, kwargs); every test matrix draws its backbones from here
BACKBONES: dict[str, tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", VIT_KW),
    "vit_reg_avg": ("vit_tiny_patch16_224", {**VIT_KW, "reg_tokens": 2, "class_token": False, "global_pool": "avg"}),
    "vit_reg_cls": ("vit_tiny_patch16_224", {**VIT_KW, "reg_tokens": 4}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", VIT_KW),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=IMG, window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=16, num_classes=NUM_CLASSES),
    ),
    "resnet": ("test_resnet", dict(num_classes=NUM_CLASSES)),
    "convnext": ("test_convnext", dict(num_classes=NUM_CLASSES)),
    "efficientnet": ("test_efficientnet", dict(num_classes=NUM_CLASSES)),
}


def make_backbone(key: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs = BACKBONES[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    # timm initialises some parameters at exactly zero (biases, reg tokens); randomise them so a
    # test cannot pass by accident on an all-zero tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def make_input(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=g)
