"""Serving N tasks: one backbone with N LoRA adapters (vpeft.multi) vs N merged copies of the model.

    python benchmarks/serving.py [--model vit_small_patch16_224 --img 112 --batch 32 --tasks 1 4 16]

Every request batch mixes the N tasks round robin (sample i belongs to task i mod N) and each
serving set-up answers the whole batch:

- "single pass": one :class:`~vpeft.multi.MultiAdapterModel` (the frozen backbone once, N unmerged
  LoRA adapters, each with its own head); every frozen layer runs once on the whole batch and each
  adapter adds its low-rank update to its own rows (peft's ``adapter_names`` semantics);
- "grouped": the same model, the batch split per adapter, one pass per group;
- "merged": N full models with their LoRA folded in (the same per-task split).

The set-ups are timed in alternating rounds and the medians reported. Weights: the bytes of the
distinct tensors each set-up holds (parameters and buffers, a shared tensor counted once).
Activations: the peak bytes of live operator outputs during one forward (a dispatch-mode count on
CPU, ``max_memory_allocated`` minus the weights on CUDA). Everything runs under ``torch.no_grad()``:
under ``torch.inference_mode()`` the tensors LoRA's autograd Function saves stay alive after the
forward (5 MB for ViT-Ti at 64 px, batch 8, by this count), which would skew the comparison.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import weakref

import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vpeft
from vpeft.multi import MultiAdapterModel


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of live operator outputs (each storage once) and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in self.live:
                    self.live[ptr][1] += 1
                else:
                    self.live[ptr] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, ptr)
        return out


def peak_activation_mb(job, device: torch.device, weights: int) -> float:
    """Peak MB of activations (live operator outputs) during one call of ``job``."""
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            job()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - weights) / 2**20
        with _LiveBytes() as counter:
            job()
        return counter.peak / 2**20


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


def jobs_for(shared: MultiAdapterModel, merged: list[nn.Module], routing: list[str], x: torch.Tensor) -> dict:
    n = len(merged)
    return {
        "single pass": lambda: shared(x, adapter_names=routing, single_pass=True),
        "grouped": lambda: shared(x, adapter_names=routing, single_pass=False),
        "merged": lambda: serve_merged(merged, x, n),
    }


def measure(jobs: dict, batch: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median images/s of each set-up answering the mixed batch, timed in alternating rounds."""
    runs: dict[str, list[float]] = {key: [] for key in jobs}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for job in jobs.values():  # warm-up
            job()
        for r in range(rounds):
            for key in sorted(jobs, reverse=bool(r % 2)):
                sync()
                start = time.perf_counter()
                jobs[key]()
                sync()
                runs[key].append(batch / (time.perf_counter() - start))
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img).eval()
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} at {args.img}px, batch {args.batch} mixed round robin over the tasks, LoRA rank {args.rank}, "
          f"{where}, {args.rounds} rounds")  # fmt: skip
    print("| tasks | images/s: single pass | grouped | merged copies | weights MB: one backbone | merged copies "
          "| activations MB: single pass | grouped | merged copies |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.tasks:
        shared, merged, names = build(base, n, args.rank)
        shared, merged = shared.to(device), [m.to(device) for m in merged]
        routing = [names[i % n] for i in range(args.batch)]
        jobs = jobs_for(shared, merged, routing, x)
        with torch.no_grad():  # the set-ups answer alike (the merged fold is exact up to rounding)
            single, grouped = jobs["single pass"](), jobs["grouped"]()
            for t, logits in enumerate(jobs["merged"]()):
                torch.testing.assert_close(single.groups[names[t]][1], logits, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(grouped.groups[names[t]][1], logits, atol=1e-4, rtol=1e-4)
        speed = measure(jobs, args.batch, args.rounds, device)
        w_shared, w_merged = tensor_bytes([shared]), tensor_bytes(merged)
        acts = {k: peak_activation_mb(job, device, w_merged if k == "merged" else w_shared) for k, job in jobs.items()}
        print(
            f"| {n} | {speed['single pass']:.1f} | {speed['grouped']:.1f} | {speed['merged']:.1f} | "
            f"{w_shared / 2**20:.1f} | {w_merged / 2**20:.1f} | "
            f"{acts['single pass']:.1f} | {acts['grouped']:.1f} | {acts['merged']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
