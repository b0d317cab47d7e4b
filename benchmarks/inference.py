"""Inference latency of each mergeable method, merged and unmerged, relative to the untouched backbone.

    python benchmarks/inference.py [--model vit_small_patch16_224 --img 112 --batch 16 --rounds 15]

Interleaved rounds, median per variant: the ratios hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import vpeft

METHODS = ["lora", "dora", "ssf", "bitfit", "fact_tt", "fact_tk", "repadapter"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img).eval()
    variants = {"backbone": base}
    for name in METHODS:
        unmerged = vpeft.apply(copy.deepcopy(base), name).eval()
        with torch.no_grad():  # move the update away from its identity init
            for p in vpeft.trainable_parameters(unmerged, include_head=False).values():
                p.add_(torch.randn_like(p) * 0.01)
        variants[f"{name} unmerged"] = unmerged
        variants[f"{name} merged"] = vpeft.merge(copy.deepcopy(unmerged))
    x = torch.randn(args.batch, 3, args.img, args.img)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():
            m(x)
        for _ in range(args.rounds):
            for k, m in variants.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} at {args.img}px, batch {args.batch}, CPU {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print("| variant | ms | / backbone |")
    print("|---|---|---|")
    for k, v in median.items():
        print(f"| {k} | {1000 * v:.1f} | {v / median['backbone']:.3f} |")


if __name__ == "__main__":
    main()
