"""Training-step time and memory of every method relative to full fine-tuning, measured in one process.

    python benchmarks/step_time.py [--model vit_small_patch16_224 --img 112 --batch 16 --rounds 7]

Each step is the trainer's: forward under its autocast (on CUDA bf16, or fp16 with a grad scaler where
bf16 is missing; ``--amp`` overrides), cross-entropy on fp32 logits, backward, AdamW.
Methods are timed in interleaved rounds (one step of each method per round, the order reversed
every other round) and each ratio is the median over rounds of the two methods' times in the same
round, so drift of the machine's speed cancels and the ratios hold on a noisy machine. Memory: on CUDA the peak
allocated memory of a step; on CPU the bytes autograd saves for the backward pass plus gradients
and AdamW state of the trainable parameters (deterministic, where process RSS is not).
With Hugging Face peft installed, its LoRA (same rank, targets and head) is timed alongside.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

import vpeft

DEFAULT_METHODS = ["full", "linear", "bitfit", "ln_tune", "partial_k", "lora", "dora", "ssf", "adapter",
                   "adaptformer", "vpt_shallow", "vpt_deep", "convpass", "repadapter", "fact_tt", "fact_tk",
                   "mona", "prefix", "lst"]  # fmt: skip


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd keeps for the backward pass (each storage once)."""

    def __init__(self):
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t


def build(name: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img)
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        head = vpeft.describe(model).heads
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=head))
    elif name == "vpeft_lora_qkv":
        vpeft.apply(model, "lora", rank=8, targets=["qkv"])
    else:
        vpeft.apply(model, name)
    model = model.to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


#: the autocast dtype of a step (None: fp32), set from --amp; the trainer's choice on CUDA by default
AMP: torch.dtype | None = None
_SCALERS: dict[int, torch.amp.GradScaler] = {}  # one per optimizer, for fp16


def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """The trainer's rule (vpeft.train.trainer): on CUDA bf16 where supported, else fp16; fp32 on CPU."""
    if amp == "off" or (amp == "auto" and not device.startswith("cuda")):
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def step(model, opt, x, y) -> None:
    """One training step as the trainer runs it: forward under autocast, loss on fp32 logits, backward, AdamW."""
    with torch.autocast(x.device.type, dtype=AMP or torch.float32, enabled=AMP is not None):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    if AMP == torch.float16:  # fp16 needs loss scaling (the trainer's GradScaler)
        scaler = _SCALERS.setdefault(id(opt), torch.amp.GradScaler(x.device.type))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return
    loss.backward()
    opt.step()


def memory_of(model, opt, x, y, device: str) -> float:
    """MB: CUDA peak of a step, or on CPU saved activations + grads + AdamW state."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(model, opt, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    saved = SavedBytes()
    with saved, torch.autocast(x.device.type, dtype=AMP or torch.float32, enabled=AMP is not None):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    loss.backward()
    return (sum(saved.storages.values()) + 3 * trainable) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                        help="autocast: auto is the trainer's (bf16 on CUDA, else fp16; fp32 on CPU)")  # fmt: skip
    args = parser.parse_args(argv)
    global AMP
    AMP = amp_dtype(args.amp, args.device)
    names = args.methods.split(",")
    try:
        import peft  # noqa: F401

        names += ["vpeft_lora_qkv", "peft_lora"]
    except ImportError:
        print("(peft not installed: pip install peft to time its LoRA alongside)")
    x = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    y = torch.randint(0, 100, (args.batch,), device=args.device)
    built = {}
    for name in names:
        try:
            built[name] = build(name, args)
        except vpeft.VPeftError as exc:
            print(f"skip {name}: {exc}")
    memory = {n: memory_of(m, o, x, y, args.device) for n, (m, o) in built.items()}
    times: dict[str, list[float]] = {n: [] for n in built}
    for m, o in built.values():  # warm-up
        step(m, o, x, y)
    order = list(built)
    for r in range(args.rounds):
        for n in order if r % 2 == 0 else order[::-1]:  # alternate so no method always follows another
            m, o = built[n]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(m, o, x, y)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t)

    def ratio(a: str, b: str) -> float:
        """Median over rounds of a's step time over b's in the same round."""
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))

    amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[AMP]
    print(f"{args.model} at {args.img}px, batch {args.batch}, {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {amp}, median of {args.rounds} interleaved rounds")  # fmt: skip
    print("| method | step ms | step / full | memory MB | memory / full |")
    print("|---|---|---|---|---|")
    for n in built:
        print(f"| {n} | {1000 * statistics.median(times[n]):.1f} | {ratio(n, 'full'):.2f} | {memory[n]:.0f} | "
              f"{memory[n] / memory['full']:.2f} |")  # fmt: skip
    if "peft_lora" in times:
        print(f"\nvpeft LoRA / peft LoRA step time (rank 8 on qkv, same head; median of per-round ratios): "
              f"{ratio('vpeft_lora_qkv', 'peft_lora'):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
