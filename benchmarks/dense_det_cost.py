"""Memory and speed of one detector training step per method, relative to full fine-tuning.

Run: ``PYTHONPATH=src python benchmarks/dense_det_cost.py [--detector fcos] [--steps 3]``. A tiny Swin
(4 stages, 96 px) and the chosen torchvision detector over its dense encoder + FPN; per method: trainable
parameters (method; neck + heads), mean step time (forward + backward + AdamW) and the peak of memory
allocated by tensors during a step (torch's CPU profiler), each as a ratio to full fine-tuning from the
same run. CPU numbers are a proxy for the GPU: they show what a method adds, not GPU wall time.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import vpeft
from vpeft.dense.detection import build_detector
from vpeft.dense.encoder import dense_encoder
from vpeft.errors import UnsupportedBackboneError

METHODS = ["linear", "lora", "adapter", "adaptformer", "bitfit", "ssf", "mona", "ln_tune", "partial_k"]
IMG = 96
BACKBONES = {
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=IMG, window_size=3, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), embed_dim=32, num_classes=0)),
    "vit": ("vit_tiny_patch16_224",
            dict(img_size=IMG, patch_size=16, embed_dim=96, depth=4, num_heads=3, num_classes=0)),
}  # fmt: skip


def batch(n: int = 2):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMG, IMG, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        masks = torch.zeros(2, IMG, IMG, dtype=torch.uint8)
        masks[0, 10:40, 8:38] = 1
        masks[1, 50:90, 44:92] = 1
        targets.append({"boxes": torch.tensor([[8.0, 10, 38, 40], [44, 50, 92, 90]]), "labels": torch.tensor([1, 2]),
                        "masks": masks})  # fmt: skip
    return images, targets


def measure(method: str, detector_name: str, steps: int, backbone_name: str) -> dict[str, float] | None:
    torch.manual_seed(0)
    name, kwargs = BACKBONES[backbone_name]
    backbone = timm.create_model(name, pretrained=False, **kwargs)
    try:
        vpeft.apply(backbone, method)
    except UnsupportedBackboneError:
        return None
    detector = build_detector(dense_encoder(backbone), detector_name, 3, fpn_channels=64, representation_size=256)
    params = [p for p in detector.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    detector.train()
    images, targets = batch()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sum(detector(images, targets).values()).backward()
        opt.step()

    step()  # warm-up: optimizer state allocated, kernels chosen
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak = current = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):  # allocation events in time order
        current += event.cpu_memory_usage if event.cpu_memory_usage else 0
        peak = max(peak, current)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    method_params = vpeft.count_trainable(backbone, include_head=False)
    return {"method_params": method_params, "head_params": sum(p.numel() for p in params) - method_params,
            "step_s": seconds, "peak_mb": peak / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="fcos", choices=["fcos", "retinanet", "maskrcnn"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backbone", default="swin", choices=sorted(BACKBONES))
    parser.add_argument("--methods", nargs="*", default=METHODS)
    args = parser.parse_args()
    rows = {m: measure(m, args.detector, args.steps, args.backbone) for m in ["full", *args.methods]}
    full = rows["full"]
    print(f"detector {args.detector}, tiny {args.backbone} {IMG} px, batch 2, {args.steps} timed steps "
          f"(threads: {torch.get_num_threads()}; 2-core CPU, shared)")  # fmt: skip
    print(
        f"{'method':<12} {'method params':>13} {'neck+heads':>10} {'step s':>7} {'time/full':>9} {'peak MB':>8} {'mem/full':>8}"
    )
    for m, r in rows.items():
        if r is None:
            print(f"{m:<12} does not apply to {args.backbone}")
            continue
        print(f"{m:<12} {r['method_params']:>13,} {r['head_params']:>10,} {r['step_s']:>7.3f} "
              f"{r['step_s'] / full['step_s']:>9.2f} {r['peak_mb']:>8.1f} {r['peak_mb'] / full['peak_mb']:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
