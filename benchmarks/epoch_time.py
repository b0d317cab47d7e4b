"""Epoch time with and without the frozen-prefix feature cache, relative to LoRA, through `vpeft.train.run`.

    python benchmarks/epoch_time.py [--model vit_small_patch16_224 --img 112 --data mini:mnist --epochs 3]

Each method trains the same task in one process, in tune mode (train -> val), with the cache on
(`feature_cache: auto`) and off. Reported: the one-off feature extraction, the median epoch after
the first, and that epoch relative to LoRA's and to the same method without the cache. Random
initial weights (timing does not depend on them) and no drop-path, so the cache is exact.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from vpeft.train import RunSpec, TrainConfig, run

DEFAULT_METHODS = ["lora", "linear", "partial_k", "lst"]


def timed_run(args, method: str, cache: str, out: Path) -> tuple[float, float]:
    """(extraction + first epoch seconds, median seconds of the later epochs) of one run."""
    spec = RunSpec(
        model=args.model,
        model_args={"img_size": args.img},
        data=args.data,
        method=method,
        mode="tune",
        pretrained=False,
        feature_cache=cache,
        train=TrainConfig(
            epochs=args.epochs, warmup_epochs=0, batch_size=args.batch, drop_path=0.0, device=args.device
        ),
    )
    record = run(spec, out, progress=False)
    epochs = [json.loads(line)["seconds"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert record["feature_cache"] == (cache == "auto" and method != "lora"), record["feature_cache"]
    extraction = record["train_seconds"] - sum(epochs)
    return extraction + epochs[0], statistics.median(epochs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--data", default="mini:mnist", help="dataset spec (default: the embedded mini MNIST task)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: the first epoch is reported apart")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for cache in ("auto", "off") if method != "lora" else ("off",):
                rows[method, cache] = timed_run(args, method, cache, Path(tmp) / f"{method}-{cache}")
    lora = rows["lora", "off"][1]
    print(f"{args.model} at {args.img}px on {args.data}, batch {args.batch}, {args.epochs} epochs, "
          f"{platform.processor() or platform.machine()} with {torch.get_num_threads()} threads")  # fmt: skip
    print("| method | feature cache | first epoch s (with extraction) | later epoch s | / LoRA | cache speed-up |")
    print("|---|---|---|---|---|---|")
    for (method, cache), (first, later) in rows.items():
        uncached = rows.get((method, "off"), (first, later))[1]
        print(f"| {method} | {cache} | {first:.2f} | {later:.3f} | {later / lora:.3f} | {uncached / later:.1f}x |")


if __name__ == "__main__":
    main()
