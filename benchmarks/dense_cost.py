"""Training-step time and memory of each method on semantic segmentation, relative to full fine-tuning.

    python benchmarks/dense_cost.py [--model vit_small_patch16_224 --img 128 --batch 4 --channels 128 --rounds 5]

The model is the segmentation task's: the backbone with the method applied, as a dense encoder (a ViT
gets the simple feature pyramid), and the UPerNet head; a step is pixel cross-entropy on the logits at
input size, backward, AdamW. Methods are timed in interleaved rounds (one step of each per round, the
order reversed every other round) and each ratio is the median over rounds of the method's time over
full fine-tuning's in the same round, so drift of a shared machine's speed cancels. Memory: on CUDA the
peak allocated memory of a step; on CPU vpeft's estimate (parameters + autograd-saved tensors + grads +
AdamW state), which is deterministic where process RSS is not. The dense head trains in every row.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

import vpeft
from vpeft.tasks import get_task_type
from vpeft.train.memory import SavedTensorBytes, step_memory_mb

DEFAULT_METHODS = ["full", "linear", "bitfit", "ln_tune", "partial_k", "lora", "ssf", "adapter", "adaptformer", "mona"]


def build(method: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    seg = get_task_type("segmentation")
    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img)
    vpeft.apply(backbone, method)
    model = seg.build(backbone, args.classes, seg.options({"channels": args.channels})).to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model, optimizer, batch) -> None:
    loss = get_task_type("segmentation").loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_methods(methods: list[str], args, build_fn, step_fn, batch, task_type: str, encoder_of) -> tuple:
    """Build each method's model (skipping those its backbone refuses), take a warm-up step and measure one
    step's memory: CUDA's peak, else vpeft's estimate. Returns (built, memory MB, trainable, head params)."""
    built, memory, params, head = {}, {}, {}, {}
    for m in methods:
        try:
            model, opt = build_fn(m, args)
        except vpeft.UnsupportedBackboneError as exc:
            print(f"{m}: skipped ({str(exc).split(';')[0]})")
            continue
        step_fn(model, opt, batch)  # warm-up (allocations, lazy inits)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            step_fn(model, opt, batch)
            sync(args.device)
            memory[m] = torch.cuda.max_memory_allocated() / 2**20
        else:
            saved = SavedTensorBytes()
            with saved:
                loss = get_task_type(task_type).loss(model, batch)
            loss.backward()
            opt.zero_grad(set_to_none=True)
            memory[m] = step_memory_mb(model, saved.total)
        params[m] = vpeft.count_trainable(encoder_of(model).backbone, include_head=False)
        head[m] = sum(p.numel() for p in model.parameters() if p.requires_grad) - params[m]
        built[m] = (model, opt)
    return built, memory, params, head


def time_interleaved(built: dict, rounds: int, device: str, batch, step_fn) -> dict[str, list[float]]:
    """Seconds of one step per method and round; rounds alternate the method order so drift cancels."""
    times: dict[str, list[float]] = {m: [] for m in built}
    for r in range(rounds):
        order = list(built) if r % 2 == 0 else list(reversed(built))
        for m in order:
            model, opt = built[m]
            sync(device)
            start = time.perf_counter()
            step_fn(model, opt, batch)
            sync(device)
            times[m].append(time.perf_counter() - start)
    return times


def machine(device: str) -> tuple[str, str]:
    """The device's name and the kind of memory figure measured on it."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.processor() or 'cpu'})"
    kind = "CUDA peak allocated" if device.startswith("cuda") else "estimate: params + saved + grads + AdamW"
    return name, kind


def print_ratios(built, params, head, times, memory, head_label: str = "head (M)") -> None:
    """The Markdown table of each method's step time and memory against full fine-tuning's."""
    print(
        f"| method | trainable (M, w/o head) | {head_label} | step ms (median) | time / full | memory MB | memory / full |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in built:
        ratio = statistics.median(t / f for t, f in zip(times[m], times["full"], strict=True))
        print(f"| {m} | {params[m] / 1e6:.3f} | {head[m] / 1e6:.3f} | {1000 * statistics.median(times[m]):.0f} | "
              f"{ratio:.2f} | {memory[m]:.0f} | {memory[m] / memory['full']:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--channels", type=int, default=128, help="UPerNet width (512 in the published recipe)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if "full" not in methods:
        methods.insert(0, "full")
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (args.batch, 3, args.img, args.img), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, args.classes, (args.batch, args.img, args.img), generator=g),
    }
    batch = {k: v.to(args.device) for k, v in batch.items()}
    built, memory, params, head = measure_methods(
        methods, args, build, step, batch, "segmentation", lambda model: model.encoder
    )
    times = time_interleaved(built, args.rounds, args.device, batch, step)
    device, kind = machine(args.device)
    print(f"segmentation step, {args.model} @ {args.img}px, batch {args.batch}, UPerNet {args.channels} ch, "
          f"{args.classes} classes, {args.rounds} rounds, {device}; memory: {kind}")  # fmt: skip
    print_ratios(built, params, head, times, memory)


if __name__ == "__main__":
    main()
