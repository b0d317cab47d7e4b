"""One-command GPU check (``make gpu-check``): what the trainer runs, measured on the GPU at hand.

    python benchmarks/gpu_check.py [--out DIR] [--smoke] [--skip step,train,profile,tests]

For a machine with a GPU and no network: torch, timm and peft installed, the project on PYTHONPATH
(``make gpu-check`` sets it). Four sections, within ``--budget`` seconds (default 360) on one H100:

1. **step table**: ``benchmarks/step_time.py --device cuda`` with the trainer's bf16 autocast,
   ViT-B/16 at 224 px, batch 64, every method, vpeft LoRA(qkv) and peft LoRA, against full FT;
2. **end-to-end train**: ``vpeft train`` (LoRA, 10 epochs, random-init ViT-B/16) on a generated
   VTAB-1k-sized task, 1,000 train (train800val200) + 1,000 test JPEGs at 224 px;
3. **profile**: one step per method under ``torch.profiler``: device time, kernels launched, the
   largest kernels, and the host (wall) time of the step;
4. **tests**: the test suite (``pytest -n <cores>`` when pytest-xdist is installed).

``--smoke`` runs the same four sections small (a tiny ViT at 32 px, a 40-image task, three methods,
the step-cost tests only) so the script itself can be checked on a CPU. Exit status: 0 when every
section ran and passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PROFILE_METHODS = ["full", "lora", "peft_lora", "ssf", "dora", "repadapter", "fact_tt", "mona", "convpass", "lst",
                   "adaptformer", "adapter"]  # fmt: skip


def make_task(root: Path, size: int = 224, counts: tuple[int, int, int] = (800, 200, 1000)) -> Path:
    """A VTAB-1k-shaped task in NOAH's txt layout: a bright square whose position (one of 10) is the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for split, count in zip(("train800", "val200", "test"), counts, strict=True):
        out = []
        for i in range(count):
            c = i % 10
            img = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
            s, (r, q) = size // 5, divmod(c, 5)
            img[2 * r * s : (2 * r + 1) * s, q * s : (q + 1) * s] = 255
            rel = f"images/{split}_{i}.jpg"
            Image.fromarray(img).save(root / rel, quality=90)
            out.append(f"{rel} {c}")
        lines[split] = out
    files = {"train800.txt": lines["train800"], "val200.txt": lines["val200"], "test.txt": lines["test"],
             "train800val200.txt": lines["train800"] + lines["val200"]}  # fmt: skip
    for name, rows in files.items():
        (root / name).write_text("\n".join(rows) + "\n")
    return root


def profile(methods: list[str], model: str, img: int, batch: int, device: str) -> None:
    """One training step per method under torch.profiler (after 3 warm-up steps)."""
    import timm
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import vpeft

    cuda = device.startswith("cuda")
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    print(f"{model} at {img}px, batch {batch}, {device}, bf16 autocast: {'CUDA' if cuda else 'CPU'} time of one step")
    print("| method | device ms | kernels | wall ms | largest kernels (ms) |")
    print("|---|---|---|---|---|")
    for name in methods:
        torch.manual_seed(0)
        m = timm.create_model(model, pretrained=False, num_classes=100, img_size=img)
        if name == "peft_lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                print("| peft_lora | peft not installed | | | |")
                continue
            m = get_peft_model(m, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
        elif name != "full":
            try:
                vpeft.apply(m, name)
            except vpeft.VPeftError as exc:
                print(f"| {name} | skipped: {exc} | | | |")
                continue
        m = m.to(device).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
        with torch_profile(activities=[activity]) as prof:
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            wall = 1000 * (time.perf_counter() - start)
        events = [e for e in prof.key_averages() if (e.device_time_total if cuda else e.self_cpu_time_total)]
        total = sum(e.device_time_total if cuda else e.self_cpu_time_total for e in events) / 1000
        kernels = sum(e.count for e in events)
        top = sorted(events, key=lambda e: e.device_time_total if cuda else e.self_cpu_time_total, reverse=True)[:4]
        names = ", ".join(
            f"{e.key[:40]} {(e.device_time_total if cuda else e.self_cpu_time_total) / 1000:.1f}" for e in top
        )
        print(f"| {name} | {total:.1f} | {kernels} | {wall:.1f} | {names} |")
        del m, opt
        if cuda:
            torch.cuda.empty_cache()


def _run(cmd: list[str], timeout: float, env: dict) -> tuple[int, float]:
    """Run a command with its output streamed; (exit status, seconds). 124 when it ran past ``timeout``."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, env=env, timeout=max(timeout, 1), cwd=ROOT).returncode
    except subprocess.TimeoutExpired:
        print(f"(stopped after {timeout:.0f} s)")
        rc = 124
    return rc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="everything small, to check the script on a CPU")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: step, train, profile, tests")
    parser.add_argument("--budget", type=float, help="seconds for all four sections (360; with --smoke 1800)")
    args = parser.parse_args(argv)
    args.budget = args.budget or (1800.0 if args.smoke else 360.0)
    sys.path.insert(0, str(ROOT / "src"))  # the project, also when run without make
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("no GPU found: run on a GPU machine, or pass --smoke to check the script on this CPU")
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vpeft-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    if args.smoke:
        model, img, batch, methods = "vit_tiny_patch16_224", 32, 4, "full,lora,ssf"
        geometry = ["--model", model, "--img", str(img), "--batch", str(batch), "--rounds", "1", "--methods", methods]
        counts, epochs, tests = (32, 8, 40), 1, [str(ROOT / "tests" / "test_step_cost.py"), "-k", "deterministic"]
    else:
        model, img, batch, methods = "vit_base_patch16_224", 224, 64, None
        geometry = ["--model", model, "--img", str(img), "--batch", str(batch), "--rounds", "6"]
        counts, epochs, tests = (800, 200, 1000), 10, [str(ROOT / "tests")]
    start, results = time.perf_counter(), {}

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    print(f"vpeft GPU check on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke)'}, "
          f"torch {torch.__version__}, output in {out}", flush=True)  # fmt: skip

    if "step" not in skip:
        print("\n## 1. Training step against full FT and peft (step_time.py, the trainer's autocast)", flush=True)
        cmd = [py, str(BENCH / "step_time.py"), "--device", device, *geometry]
        results["step"] = _run(cmd, min(150.0 if not args.smoke else 600.0, left()), env)

    if "train" not in skip:
        print("\n## 2. End to end: vpeft train, LoRA, on a generated VTAB-1k-sized task", flush=True)
        t = time.perf_counter()
        task = make_task(out / "task", img if args.smoke else 224, counts)
        print(f"generated {sum(counts)} JPEGs at {img if args.smoke else 224} px in {time.perf_counter() - t:.1f} s")
        run_dir = out / "train-lora"
        cmd = [py, "-m", "vpeft.cli", "train", "--model", model, "--no-pretrained", "--data", f"vtab1k:{task}",
               "--method", "lora", "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", "1e-3",
               "--out", str(run_dir), "--quiet"]  # fmt: skip
        if args.smoke:
            cmd += ["--batch-size", "8", "--model-arg", f"img_size={img}"]
        rc, seconds = _run(cmd, min(100.0 if not args.smoke else 600.0, left()), env)
        results["train"] = (rc, seconds)
        record = run_dir / "result.json"
        if rc == 0 and record.exists():
            r = json.loads(record.read_text())
            keys = ("status", "device", "top1", "train_seconds", "images_per_s", "peak_memory_mb")
            print("result: " + ", ".join(f"{k} {r.get(k)}" for k in keys) + f", wall {seconds:.1f} s")

    if "profile" not in skip:
        print("\n## 3. One step per method under torch.profiler", flush=True)
        t = time.perf_counter()
        rc = 0
        try:
            profile(methods.split(",") if methods else PROFILE_METHODS, model, img, batch, device)
        except Exception as exc:  # report and go on to the tests
            print(f"profile failed: {type(exc).__name__}: {exc}")
            rc = 1
        results["profile"] = (rc, time.perf_counter() - t)

    if "tests" not in skip:
        print("\n## 4. Test suite", flush=True)
        try:
            import xdist  # noqa: F401

            workers = ["-n", str(min(14, os.cpu_count() or 1))] if not args.smoke else []
        except ImportError:
            workers = []
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *tests]
        results["tests"] = _run(cmd, max(left(), 30.0), env)

    total = time.perf_counter() - start
    print("\n## Summary")
    for name, (rc, seconds) in results.items():
        print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.1f} s")
    print(f"total {total:.1f} s (budget {args.budget:.0f} s)")
    return 0 if all(rc == 0 for rc, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
