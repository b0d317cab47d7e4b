"""Serving N tasks: one backbone with N LoRA adapters (vpeft.multi) vs N merged copies of the model.

    python benchmarks/serving.py [--model vit_small_patch16_224 --img 112 --batch 32 --tasks 1 4 16]

Every request batch mixes the N tasks round robin (sample i belongs to task i mod N) and each
serving set-up answers the whole batch: "shared" is one :class:`~vpeft.multi.MultiAdapterModel`
(the frozen backbone once, N unmerged LoRA adapters, each with its own head; the batch is split
per adapter), "merged" is N full models with their LoRA folded in (the same per-task split). The
two set-ups are timed in alternating rounds and the medians reported. Memory is the bytes of the
distinct tensors each set-up holds (parameters and buffers, a shared tensor counted once).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn

import vpeft
from vpeft.multi import MultiAdapterModel


def tensor_bytes(models: list[nn.Module]) -> int:
    """Bytes of the distinct tensors (by storage) of the models' parameters and buffers."""
    seen: dict[int, int] = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def build(base: nn.Module, n: int, rank: int) -> tuple[MultiAdapterModel, list[nn.Module], list[str]]:
    names = [f"task{i}" for i in range(n)]
    shared = MultiAdapterModel(copy.deepcopy(base)).eval()
    merged = []
    for i, name in enumerate(names):
        perturb(shared.add_adapter(name, "lora", num_classes=10 + i, rank=rank), seed=i)
        # the same adapter, folded into its own full copy of the backbone
        shared_state = vpeft.trainable_parameters(shared.get_adapter(name))
        fresh = copy.deepcopy(base)
        fresh.reset_classifier(10 + i)
        single = vpeft.apply(fresh, "lora", rank=rank)
        with torch.no_grad():
            for key, p in vpeft.trainable_parameters(single).items():
                p.copy_(shared_state[key])
        merged.append(vpeft.merge(single).eval())
    return shared, merged, names


def serve_merged(models: list[nn.Module], x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [models[t](x[t::n]) for t in range(n) if t < x.shape[0]]


def measure(
    shared: MultiAdapterModel, merged: list[nn.Module], routing: list[str], x: torch.Tensor, rounds: int
) -> dict[str, float]:
    """Median images/s of each set-up answering the mixed batch, timed in alternating rounds."""
    n = len(merged)
    jobs = {"shared": lambda: shared(x, adapter_names=routing), "merged": lambda: serve_merged(merged, x, n)}
    runs: dict[str, list[float]] = {key: [] for key in jobs}
    with torch.inference_mode():
        for job in jobs.values():  # warm-up
            job()
        for r in range(rounds):
            for key in sorted(jobs, reverse=bool(r % 2)):
                start = time.perf_counter()
                jobs[key]()
                runs[key].append(x.shape[0] / (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img).eval()
    x = torch.randn(args.batch, 3, args.img, args.img)
    print(f"{args.model} at {args.img}px, batch {args.batch} mixed round robin over the tasks, LoRA rank {args.rank}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")  # fmt: skip
    print("| tasks | shared: images/s | merged copies: images/s | shared: MB | merged copies: MB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.tasks:
        shared, merged, names = build(base, n, args.rank)
        routing = [names[i % n] for i in range(args.batch)]
        with torch.no_grad():  # the two set-ups answer alike (the merged fold is exact up to rounding)
            out = shared(x, adapter_names=routing)
            for t, logits in enumerate(serve_merged(merged, x, n)):
                torch.testing.assert_close(out.groups[names[t]][1], logits, atol=1e-4, rtol=1e-4)
        speed = measure(shared, merged, routing, x, args.rounds)
        mb_shared, mb_merged = tensor_bytes([shared]) / 2**20, tensor_bytes(merged) / 2**20
        print(
            f"| {n} | {speed['shared']:.1f} | {speed['merged']:.1f} | "
            f"{mb_shared:.1f} | {mb_merged:.1f} | {mb_merged / mb_shared:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
