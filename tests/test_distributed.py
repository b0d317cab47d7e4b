"""`vpeft train` under torchrun: DDP over gloo on CPU gives the weights of a 1-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from datagen import make_vtab_task

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data: str, out) -> list[str]:
    # the CPU: gloo, fp32, and two ranks that one GPU could not host (the trainer would pick CUDA)
    args = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", data, "--method", "lora",
            "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16", "--lr", "3e-3", "--drop-path", "0",
            "--out", str(out), "--quiet", "--device", "cpu"]  # fmt: skip
    return args + [a for k, v in TINY_VIT.items() for a in ("--model-arg", f"{k}={v}")]


def test_torchrun_two_processes_match_one(tmp_path) -> None:
    task = make_vtab_task(tmp_path / "task", num_classes=4, n_train=48, n_val=16, n_test=16)
    data = f"vtab1k:{task}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "vpeft.cli", *_train_args(data, tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "vpeft.cli", *_train_args(data, tmp_path / "two")]  # fmt: skip
    double = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (
        load_file(str(tmp_path / "one/adapter.safetensors")),
        load_file(str(tmp_path / "two/adapter.safetensors")),
    )
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
    record = json.loads((tmp_path / "two/result.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "ok"
    assert json.loads((tmp_path / "one/result.json").read_text())["world_size"] == 1
    assert len((tmp_path / "two/log.jsonl").read_text().splitlines()) == 2  # rank 0 alone writes
