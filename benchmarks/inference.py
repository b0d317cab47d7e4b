"""Inference latency of each mergeable method, merged and unmerged, relative to the untouched backbone.

    python benchmarks/inference.py [--model vit_small_patch16_224 --img 112 --batch 16 --rounds 15]

Each variant is timed against the backbone in adjacent pairs (order alternating per round) and the
median of the per-pair ratios is reported, so drift of the machine's speed cancels. A second copy
of the backbone is timed the same way: its ratio is the noise floor of the measurement. "same graph"
says whether the variant has exactly the backbone's module types and parameter shapes.
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
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img).to(args.device).eval()
    variants = {"backbone copy (noise floor)": copy.deepcopy(base)}
    for name in METHODS:
        unmerged = vpeft.apply(copy.deepcopy(base), name).eval()
        with torch.no_grad():  # move the update away from its identity init
            for p in vpeft.trainable_parameters(unmerged, include_head=False).values():
                p.add_(torch.randn_like(p) * 0.01)
        variants[f"{name} unmerged"] = unmerged
        variants[f"{name} merged"] = vpeft.merge(copy.deepcopy(unmerged))
    x = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(model: torch.nn.Module) -> float:
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        return time.perf_counter() - start

    ratios: dict[str, list[float]] = {k: [] for k in variants}
    base_times: list[float] = []
    with torch.inference_mode():
        for m in (base, *variants.values()):
            m(x)
        for r in range(args.rounds):
            for k, m in variants.items():
                if r % 2:
                    t_variant, t_base = timed(m), timed(base)
                else:
                    t_base, t_variant = timed(base), timed(m)
                ratios[k].append(t_variant / t_base)
                base_times.append(t_base)
    print(f"{args.model} at {args.img}px, batch {args.batch}, {args.device} ({torch.get_num_threads()} threads), "
          f"median of {args.rounds} paired rounds; backbone {1000 * statistics.median(base_times):.1f} ms")  # fmt: skip
    print("| variant | / backbone | same graph |")
    print("|---|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {statistics.median(v):.3f} | {'yes' if same_graph(variants[k], base) else 'no'} |")


def same_graph(model: torch.nn.Module, base: torch.nn.Module) -> bool:
    """The same module types in the same places, and parameters and buffers of the same shapes."""
    types = [(n, type(m)) for n, m in model.named_modules()]
    shapes = [(n, t.shape) for n, t in model.state_dict().items()]
    return types == [(n, type(m)) for n, m in base.named_modules()] and shapes == [
        (n, t.shape) for n, t in base.state_dict().items()
    ]


if __name__ == "__main__":
    main()
