"""Pre-train vpeft's embedded mini ViT on Fashion-MNIST, then measure how well it transfers.

Data: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), 60,000 training and
10,000 test images of clothing, 28x28. Run:

    python scripts/pretrain_vit_mini.py              # pre-train, save, then the linear-probe report
    python scripts/pretrain_vit_mini.py --probe-only # only the report, with the committed weights

Writes src/vpeft/assets/vit_mini.safetensors (fp16 backbone, no head) and vit_mini.json (recipe,
pre-training accuracy, transfer report). Seeded: running it again reproduces the weights up to
floating-point differences between machines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1] / "src" / "vpeft" / "assets"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

RECIPE = {
    "architecture": {"img_size": 28, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0,
                     "class_token": True, "global_pool": "token"},
    "data": "Fashion-MNIST train (60,000), Debian dataset-fashion-mnist",
    "epochs": 6, "batch_size": 128, "optimizer": "AdamW", "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1,
    "schedule": "linear warm-up, cosine to 1e-5", "label_smoothing": 0.1, "drop_path": 0.05,
    "augmentation": "random crop 28 from 2-px zero padding, horizontal flip", "seed": 0,
    "mean": 0.2860, "std": 0.3530,
}  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 3, 28, 28), the gray channel repeated."""
    x = images.float().div(255).sub(RECIPE["mean"]).div(RECIPE["std"])
    return x.unsqueeze(1).expand(-1, 3, -1, -1)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 5, (n,), generator=gen)
    out = torch.stack([padded[i, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def pretrain(out: Path) -> dict:
    import timm

    torch.manual_seed(RECIPE["seed"])
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, drop_path_rate=RECIPE["drop_path"],
        **RECIPE["architecture"],
    )  # fmt: skip
    x_train, y_train = load_fmnist("train")
    x_test, y_test = load_fmnist("test")
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    bs, epochs = RECIPE["batch_size"], RECIPE["epochs"]
    steps_per_epoch = math.ceil(len(x_train) / bs)
    total, warmup = epochs * steps_per_epoch, RECIPE["warmup_epochs"] * steps_per_epoch
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    started = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            lr = RECIPE["lr"] * step / warmup if step < warmup else 1e-5 + 0.5 * (RECIPE["lr"] - 1e-5) * (
                1 + math.cos(math.pi * (step - warmup) / (total - warmup)))  # fmt: skip
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[i * bs : (i + 1) * bs]
            logits = model(to_input(augment(x_train[idx], gen)))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=RECIPE["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f}, Fashion-MNIST test top-1 "
              f"{100 * acc:.2f}%, {time.time() - started:.0f}s", flush=True)  # fmt: skip
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "vit_mini.safetensors"), metadata={"recipe": json.dumps(RECIPE)})
    card = {
        "recipe": RECIPE,
        "fashion_mnist_test_top1": round(100 * acc, 2),
        "train_seconds": round(time.time() - started),
    }
    (out / "vit_mini.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 500):
        correct += (model(to_input(images[i : i + 500])).argmax(-1) == labels[i : i + 500]).sum().item()
    return correct / len(images)


def linear_probe_report(out: Path, epochs: int = 100) -> dict:
    """Linear-probe top-1 on every mini task (train800val200 -> test), pretrained vs random init."""
    import vpeft
    from vpeft.backbones.create import create_backbone
    from vpeft.data.mini import load_mini_task, mini_task_names

    report: dict = {"protocol": f"frozen features, linear head, AdamW lr 1e-2, {epochs} full-batch epochs, "
                    "train800val200 -> test", "tasks": {}}  # fmt: skip
    for pretrained in (True, False):
        key = "pretrained" if pretrained else "random_init"
        for name in mini_task_names():
            task = load_mini_task(name)
            torch.manual_seed(0)
            model = create_backbone("vpeft/vit-mini", task.num_classes, pretrained=pretrained).eval()
            vpeft.apply(model, "linear")
            feats = {s: _features(model, task, s) for s in ("trainval", "test")}
            head = torch.nn.Linear(feats["trainval"][0].shape[1], task.num_classes)
            opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
            mean, std = feats["trainval"][0].mean(0), feats["trainval"][0].std(0) + 1e-6
            xtr, ytr = (feats["trainval"][0] - mean) / std, feats["trainval"][1]
            for _ in range(epochs):
                loss = F.cross_entropy(head(xtr), ytr)
                opt.zero_grad()
                loss.backward()
                opt.step()
            xte, yte = (feats["test"][0] - mean) / std, feats["test"][1]
            acc = 100 * (head(xte).argmax(-1) == yte).float().mean().item()
            report["tasks"].setdefault(name, {})[key] = round(acc, 2)
            print(f"{key:12s} {name:15s} {acc:.2f}", flush=True)
    for key in ("pretrained", "random_init"):
        report[f"mean_{key}"] = round(float(np.mean([t[key] for t in report["tasks"].values()])), 2)
    print(f"mean linear-probe top-1: pretrained {report['mean_pretrained']:.2f}, "
          f"random init {report['mean_random_init']:.2f}")  # fmt: skip
    card_path = out / "vit_mini.json"
    card = json.loads(card_path.read_text())
    card["transfer_linear_probe"] = report
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return report


@torch.no_grad()
def _features(model: torch.nn.Module, task, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from vpeft.data import ImageDataset, build_transform, input_config

    geometry, normalize = build_transform(input_config(model), "vtab", train=False)
    ds = ImageDataset(task.split(split), geometry, normalize=normalize, read=task.read)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([ds.samples[i][1] for i in range(len(ds))])
    feats = torch.cat([model.forward_head(model.forward_features(xs[i : i + 500]), pre_logits=True)
                       for i in range(0, len(xs), 500)])  # fmt: skip
    return feats, ys


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--probe-only", action="store_true", help="skip pre-training; report on committed weights")
    parser.add_argument("--skip-probe", action="store_true", help="pre-train only")
    args = parser.parse_args()
    if not args.probe_only:
        print(json.dumps(pretrain(args.out), indent=2))
    if not args.skip_probe:
        linear_probe_report(args.out)
