"""The trainer and `vpeft train`: learning, the honest protocol, resume, records, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from datagen import make_fgvc_task, make_vtab_task
from vpeft.cli import main
from vpeft.metrics import ppt
from vpeft.train import RunSpec, TrainConfig, TrainingDivergedError, run
from vpeft.train.trainer import lr_at

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}


def _spec(data: str, **kw) -> RunSpec:
    train = dict(epochs=4, warmup_epochs=1, batch_size=16, lr=3e-3, weight_decay=1e-4, drop_path=0.0, seed=0)
    train.update(kw.pop("train", {}))
    return RunSpec(
        model="vit_tiny_patch16_224",
        model_args=TINY_VIT,
        data=data,
        method=kw.pop("method", "lora"),
        pretrained=False,
        train=TrainConfig(**train),
        **kw,
    )


@pytest.fixture(scope="module")
def vtab_task(tmp_path_factory):
    return make_vtab_task(tmp_path_factory.mktemp("vtab") / "stripes", num_classes=4, n_train=64, n_val=16, n_test=48)


def test_cli_train_lora_beats_chance(vtab_task, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "vit_tiny_patch16_224",
        "--no-pretrained",
        "--data",
        f"vtab1k:{vtab_task}",
        "--method",
        "lora",
        "--opt",
        "rank=4",
        "--opt",
        "targets=q,v",
        "--epochs",
        "6",
        "--warmup-epochs",
        "1",
        "--lr",
        "3e-3",
        "--wd",
        "1e-4",
        "--batch-size",
        "16",
        "--drop-path",
        "0",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",  # the accuracy bound and the exact parameter counts are CPU fp32 facts; CUDA has its own test
    ]
    argv += [a for k, v in TINY_VIT.items() for a in ("--model-arg", f"{k}={v}")]
    assert main(argv) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "ok" and record["mode"] == "final" and record["eval_split"] == "test"
    assert record["top1"] >= 60.0, f"LoRA should clearly beat chance (25%) on a learnable task: {record['top1']}"
    assert record["options"]["rank"] == 4 and record["options"]["targets"] == ["q", "v"]
    assert record["trainable_params"] == 2 * 2 * 2 * 48 * 4
    assert record["trainable_params_with_head"] == record["trainable_params"] + 48 * 4 + 4
    assert record["ppt"] == pytest.approx(ppt(record["top1"] / 100, record["trainable_params"]))
    for key in ("lr", "wd", "seed", "epochs", "peak_memory_mb", "train_seconds", "images_per_s", "versions", "weights"):
        assert key in record
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter.safetensors",
        "adapter_config.json",
        "config.yaml",
        "log.jsonl",
        "result.json",
    ]
    assert len((out / "log.jsonl").read_text().splitlines()) == 6
    # the saved adapter evaluates to the same test accuracy
    eval_argv = [
        "eval",
        "--model",
        "vit_tiny_patch16_224",
        "--no-pretrained",
        "--adapter",
        str(out),
        "--data",
        f"vtab1k:{vtab_task}",
    ] + [a for k, v in TINY_VIT.items() for a in ("--model-arg", f"{k}={v}")]
    capsys.readouterr()
    assert main(eval_argv) == 0
    assert f"top-1 {record['top1']:.2f}%" in capsys.readouterr().out


def test_tune_mode_reports_val_and_never_reads_test(vtab_task, tmp_path) -> None:
    task = tmp_path / "task"
    import shutil

    shutil.copytree(vtab_task, task)
    (task / "test.txt").write_text("images/test/does_not_exist.png 0\n")  # tune mode must not touch it
    record = run(_spec(f"vtab1k:{task}", mode="tune"), tmp_path / "run", progress=False)
    assert record["eval_split"] == "val" and record["train_size"] == 64


def test_final_mode_selects_nothing_on_test(vtab_task, tmp_path) -> None:
    """Shuffled test labels change the reported accuracy but nothing that was chosen or trained."""
    import shutil

    shuffled = tmp_path / "shuffled"
    shutil.copytree(vtab_task, shuffled)
    lines = (shuffled / "test.txt").read_text().splitlines()
    labels = [line.rsplit(" ", 1)[1] for line in lines]
    random.Random(0).shuffle(labels)
    (shuffled / "test.txt").write_text(
        "\n".join(f"{line.rsplit(' ', 1)[0]} {lab}" for line, lab in zip(lines, labels, strict=True)) + "\n"
    )
    a = run(_spec(f"vtab1k:{vtab_task}"), tmp_path / "a", progress=False)
    b = run(_spec(f"vtab1k:{shuffled}"), tmp_path / "b", progress=False)
    for key in ("selected_epoch", "lr", "wd", "epochs", "final_train_loss", "selection"):
        assert a[key] == b[key], key
    wa, wb = load_file(str(tmp_path / "a/adapter.safetensors")), load_file(str(tmp_path / "b/adapter.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_gives_same_weights(vtab_task, tmp_path) -> None:
    full = run(_spec(f"vtab1k:{vtab_task}", method="adapter"), tmp_path / "full", progress=False)
    # interrupt after 2 of 4 epochs: run a 4-epoch spec whose trainer stops early
    from vpeft.train import trainer as trainer_mod

    original = trainer_mod.Trainer._train_epoch
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args, **kwargs)

    trainer_mod.Trainer._train_epoch = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run(_spec(f"vtab1k:{vtab_task}", method="adapter"), tmp_path / "resumed", progress=False)
    finally:
        trainer_mod.Trainer._train_epoch = original
    assert not (tmp_path / "resumed/result.json").exists()
    assert (tmp_path / "resumed/checkpoint.pt").exists()
    resumed = run(_spec(f"vtab1k:{vtab_task}", method="adapter"), tmp_path / "resumed", resume=True, progress=False)
    wa = load_file(str(tmp_path / "full/adapter.safetensors"))
    wb = load_file(str(tmp_path / "resumed/adapter.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert resumed["top1"] == full["top1"]
    assert not (tmp_path / "resumed/checkpoint.pt").exists()


def test_fgvc_task_trains(tmp_path) -> None:
    root = make_fgvc_task(tmp_path / "birds")
    record = run(_spec(f"fgvc:{root}", method="bitfit", train={"epochs": 2}), tmp_path / "run", progress=False)
    assert record["status"] == "ok" and record["train_size"] == 39 and record["num_classes"] == 3


def test_nan_loss_stops_and_records_why(vtab_task, tmp_path) -> None:
    with pytest.raises(TrainingDivergedError, match="loss became nan"):
        run(
            _spec(f"vtab1k:{vtab_task}", method="full", train={"lr": 1e30, "warmup_epochs": 0}),
            tmp_path / "run",
            progress=False,
        )
    record = json.loads((tmp_path / "run/result.json").read_text())
    assert record["status"] == "failed" and "loss became nan" in record["error"]


def test_bad_inputs_write_no_record(vtab_task, tmp_path, capsys) -> None:
    base = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--out", str(tmp_path / "r"), "--quiet"]
    cases = [
        (["--data", f"vtab1k:{tmp_path / 'missing'}", "--method", "lora"], "does not exist"),
        (["--data", f"vtab1k:{vtab_task}", "--method", "lorra"], "unknown method 'lorra'"),
        (["--data", f"vtab1k:{vtab_task}", "--method", "lora", "--opt", "rnk=2"], "unknown option"),
        (["--data", f"vtab1k:{vtab_task}", "--method", "lora", "--opt", "rank"], "--opt expects key=value"),
        (["--data", f"vtab1k:{vtab_task}", "--method", "lora", "--resume"], "no checkpoint.pt"),
        (["--model", "not_a_model", "--data", f"vtab1k:{vtab_task}"], "not a timm model name"),
        (["--data", f"vtab1k:{vtab_task}", "--num-classes", "2"], "outside the 2 classes"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (tmp_path / "r/result.json").exists()


def test_yaml_config_and_override(vtab_task, tmp_path) -> None:
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(
        "model: vit_tiny_patch16_224\nmodel_args: {img_size: 32, patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}\n"
        "method: lora\noptions: {rank: 2}\npretrained: false\nepochs: 1\nwarmup_epochs: 0\nbatch_size: 32\n"
        "train: {lr: 0.002}\n"
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "-c",
                str(cfg),
                "--data",
                f"vtab1k:{vtab_task}",
                "--opt",
                "rank=3",
                "--lr",
                "0.005",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    record = json.loads((out / "result.json").read_text())
    assert record["options"]["rank"] == 3 and record["lr"] == 0.005 and record["epochs"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    assert main(["train", "-c", str(bad), "--data", f"vtab1k:{vtab_task}", "--out", str(out)]) == 2


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, epochs=10, warmup_epochs=2)
    assert lr_at(0, 100, 20, cfg) == pytest.approx(1e-6)
    assert lr_at(20, 100, 20, cfg) == pytest.approx(1e-3)
    assert lr_at(60, 100, 20, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, 100, 20, cfg) == pytest.approx(1e-5)


def test_no_weight_decay_on_biases_norms_prompts() -> None:
    import timm

    import vpeft
    from vpeft.train.trainer import param_groups

    model = vpeft.apply(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT), "vpt_deep")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])  # only the head's weight
    assert sum(p.ndim == 3 for p in no_decay["params"]) == 2  # the two blocks' prompts


def test_ppt_matches_published_example() -> None:
    assert round(ppt(0.7170, 2_380_000), 2) == 0.65


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_train_defaults_to_cuda_with_autocast(vtab_task, tmp_path) -> None:
    """Without --device the trainer picks CUDA and its autocast (bf16, or fp16 with a scaler) and still learns."""
    out = tmp_path / "run"
    argv = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", f"vtab1k:{vtab_task}",
            "--method", "lora", "--opt", "rank=4", "--epochs", "6", "--warmup-epochs", "1", "--lr", "3e-3",
            "--batch-size", "16", "--drop-path", "0", "--out", str(out), "--quiet"]  # fmt: skip
    argv += [a for k, v in TINY_VIT.items() for a in ("--model-arg", f"{k}={v}")]
    assert main(argv) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "ok" and record["device"].startswith("cuda")
    assert record["top1"] >= 50.0, f"LoRA under autocast should clearly beat chance (25%): {record['top1']}"


@pytest.mark.parametrize("method", ["linear", "partial_k", "lst"])
def test_frozen_prefix_cache_is_exact(vtab_task, tmp_path, method: str) -> None:
    """Training from cached frozen-prefix features gives the weights of training through the prefix."""
    cpu = {"device": "cpu"}  # exact to 1e-5: fp32 on the CPU (the trainer would pick CUDA and bf16)
    cached = run(_spec(f"vtab1k:{vtab_task}", method=method, train=cpu), tmp_path / "cached", progress=False)
    plain = run(_spec(f"vtab1k:{vtab_task}", method=method, feature_cache="off", train=cpu), tmp_path / "plain",
                progress=False)  # fmt: skip
    assert cached["feature_cache"] is True and plain["feature_cache"] is False
    wa = load_file(str(tmp_path / "cached/adapter.safetensors"))
    wb = load_file(str(tmp_path / "plain/adapter.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert cached["top1"] == pytest.approx(plain["top1"], abs=2.1)  # at most one test image flips


def test_prefix_cache_off_where_inexact(vtab_task, tmp_path) -> None:
    with_drop_path = run(_spec(f"vtab1k:{vtab_task}", method="linear", train={"drop_path": 0.1, "epochs": 1}),
                         tmp_path / "dp", progress=False)  # fmt: skip
    assert with_drop_path["feature_cache"] is False  # drop-path in the frozen blocks is random per epoch
    lora = run(_spec(f"vtab1k:{vtab_task}", method="lora", train={"epochs": 1}), tmp_path / "lora", progress=False)
    assert lora["feature_cache"] is False
    too_big = run(_spec(f"vtab1k:{vtab_task}", method="lst", train={"epochs": 1}, feature_cache_gb=1e-6),
                  tmp_path / "big", progress=False)  # fmt: skip
    assert too_big["feature_cache"] is False and too_big["status"] == "ok"


def test_noah_supernet_search_retrain(vtab_task, tmp_path, capsys) -> None:
    """The three NOAH stages from `vpeft train`; the search reads val only and respects the budget."""
    import shutil

    task = tmp_path / "task"
    shutil.copytree(vtab_task, task)
    (task / "test.txt").write_text("images/test/missing.png 0\n")  # supernet and search must not read test
    model_args = [a for k, v in TINY_VIT.items() for a in ("--model-arg", f"{k}={v}")]
    common = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", f"vtab1k:{task}", "--method", "noah",
              "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16", "--drop-path", "0", "--quiet", *model_args]  # fmt: skip
    assert main(["train", *common, "--mode", "tune", "--out", str(tmp_path / "supernet")]) == 0
    budget = 3000
    assert main(["train", *common, "--mode", "tune", "--opt", "stage=search", "--opt", f"supernet={tmp_path / 'supernet'}",
                 "--opt", f"budget={budget}", "--out", str(tmp_path / "search")]) == 0  # fmt: skip
    found = json.loads((tmp_path / "search/architecture.json").read_text())
    assert found["params"] <= budget and len(found["architecture"]) == 2 and found["evaluated"] > 1
    shutil.copy(vtab_task / "test.txt", task / "test.txt")
    arch = str(tmp_path / "search/architecture.json")
    assert main(["train", *common, "--opt", "stage=retrain", "--opt", f"architecture={arch}",
                 "--out", str(tmp_path / "retrain")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "retrain/result.json").read_text())
    assert record["trainable_params"] == found["params"]
    saved = json.loads((tmp_path / "retrain/adapter_config.json").read_text())
    assert json.loads(saved["options"]["architecture"]) == found["architecture"]  # saved inline with the adapter


def test_cli_feature_cache_flag_and_limit(vtab_task, tmp_path) -> None:
    model_args = [a for k, v in TINY_VIT.items() for a in ("--model-arg", f"{k}={v}")]
    common = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", f"vtab1k:{vtab_task}", "--method", "lst",
              "--epochs", "1", "--warmup-epochs", "0", "--drop-path", "0", "--quiet", *model_args]  # fmt: skip
    limit = tmp_path / "limit.yaml"
    limit.write_text("feature_cache_gb: 0\n")
    for name, extra, cached in [("auto", [], True), ("off", ["--feature-cache", "off"], False),
                                ("limit", ["-c", str(limit)], False)]:  # fmt: skip
        assert main(["train", *common, *extra, "--out", str(tmp_path / name)]) == 0
        assert json.loads((tmp_path / name / "result.json").read_text())["feature_cache"] is cached
