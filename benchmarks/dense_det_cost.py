"""Training-step time and memory of each method on object detection, relative to full fine-tuning.

    python benchmarks/dense_det_cost.py [--detector fcos|retinanet|maskrcnn] [--backbone swin|vit] [--rounds 5]

The model is the detection task's: the backbone with the method applied, as a dense encoder (a ViT gets
the simple feature pyramid), an FPN and torchvision's detector; a step is the detector's summed losses
on a fixed batch of two images with two boxes (and masks) each, backward, AdamW. Backbones are small
random-init models (a 4-stage Swin and a 4-block ViT at 96 px) so every method runs on a 2-core CPU.
Methods are timed in interleaved rounds (one step of each per round, the order reversed every other
round) and each time ratio is the median over rounds of the method's step time over full fine-tuning's
in the same round, so drift of a shared machine's speed cancels. Memory: on CUDA the peak allocated
memory of a step; on CPU vpeft's estimate (parameters + autograd-saved tensors + grads + AdamW state),
which is deterministic where process RSS is not. The FPN and heads train in every row.
"""

from __future__ import annotations

import argparse

import timm
import torch
from dense_cost import machine, measure_methods, print_ratios, time_interleaved  # the same protocol as segmentation's

import vpeft
from vpeft.tasks import get_task_type
from vpeft.train.trainer import set_train_mode

DEFAULT_METHODS = ["full", "linear", "bitfit", "ln_tune", "partial_k", "lora", "ssf", "adapter", "adaptformer", "mona"]
IMG = 96
BACKBONES = {
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=IMG, window_size=3, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), embed_dim=32)),
    "vit": ("vit_tiny_patch16_224", dict(img_size=IMG, patch_size=16, embed_dim=96, depth=4, num_heads=3)),
}  # fmt: skip


def make_batch(device: str, n: int = 2):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMG, IMG, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        masks = torch.zeros(2, IMG, IMG, dtype=torch.uint8)
        masks[0, 10:40, 8:38] = 1
        masks[1, 50:90, 44:92] = 1
        boxes = torch.tensor([[8.0, 10, 38, 40], [44, 50, 92, 90]])
        targets.append({"boxes": boxes.to(device), "labels": torch.tensor([1, 2], device=device),
                        "masks": masks.to(device)})  # fmt: skip
    return images, targets


def build(method: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    det = get_task_type("detection")
    torch.manual_seed(0)
    name, kwargs = BACKBONES[args.backbone]
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    vpeft.apply(backbone, method)
    options = det.options({"detector": args.detector, "fpn_channels": args.channels, "representation_size": 256})
    model = det.build(backbone, 2, options).to(args.device)
    set_train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model, optimizer, batch) -> None:
    loss = get_task_type("detection").loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="fcos", choices=["fcos", "retinanet", "maskrcnn"])
    parser.add_argument("--backbone", default="swin", choices=sorted(BACKBONES))
    parser.add_argument("--channels", type=int, default=64, help="FPN / head width (256 in torchvision)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if "full" not in methods:
        methods.insert(0, "full")
    batch = make_batch(args.device)
    built, memory, params, head = measure_methods(
        methods, args, build, step, batch, "detection", lambda model: model.backbone.encoder
    )
    times = time_interleaved(built, args.rounds, args.device, batch, step)
    device, kind = machine(args.device)
    print(f"detection step, {args.detector} over tiny {args.backbone} @ {IMG}px, batch 2, FPN {args.channels} ch, "
          f"{args.rounds} rounds, {device}, {torch.get_num_threads()} threads; memory: {kind}")  # fmt: skip
    print_ratios(built, params, head, times, memory, head_label="neck + heads (M)")


if __name__ == "__main__":
    main()
