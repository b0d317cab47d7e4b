"""Bad input, table-driven: every case exits 2 with a message naming the problem and the fix, prints no
traceback, and leaves an existing finished run untouched."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import vpeft
from datagen import make_vtab_task
from vpeft.cli import main
from vpeft.errors import ConfigError

from conftest import make_backbone

TINY = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-arg", "img_size=32", "--model-arg",
        "patch_size=8", "--model-arg", "embed_dim=48", "--model-arg", "depth=2", "--model-arg", "num_heads=3"]  # fmt: skip
QUICK = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--quiet", "--method", "bitfit"]


class Evil:
    """Pickled into a checkpoint: weights_only loading must refuse it."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tasks (good and broken), a finished run, and damaged files the cases point at."""
    root = tmp_path_factory.mktemp("bad")
    good = make_vtab_task(root / "good", num_classes=4, n_train=32, n_val=8, n_test=16)
    empty_trainval = shutil.copytree(good, root / "empty_trainval")
    (empty_trainval / "train800val200.txt").write_text("")
    all_empty = shutil.copytree(good, root / "all_empty")
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
        (all_empty / name).write_text("")
    test_only = shutil.copytree(good, root / "test_only_label")
    first = (test_only / "test.txt").read_text().splitlines()[0].rsplit(" ", 1)[0]
    with open(test_only / "test.txt", "a") as f:
        f.write(f"{first} 9\n")
    finished = root / "finished"
    assert main(["train", *TINY, *QUICK, "--data", f"vtab1k:{good}", "--out", str(finished)]) == 0
    truncated = shutil.copytree(finished, root / "truncated")
    weights = truncated / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    evil_ckpt = root / "evil_ckpt"
    evil_ckpt.mkdir()
    torch.save({"trainable": {}, "payload": Evil()}, evil_ckpt / "checkpoint.pt")
    np.savez(root / "evil.npz", payload=np.array([Evil()], dtype=object))
    (root / "syntax.yaml").write_text("lr: [3e-3\n")
    (root / "float_epochs.yaml").write_text("epochs: 1.7\n")
    (root / "list_options.yaml").write_text("options: [rank, 4]\n")
    (root / "a_file").write_text("not a folder")
    return {"root": root, "good": good, "finished": finished, "truncated": truncated, "evil_ckpt": evil_ckpt,
            "empty_trainval": empty_trainval, "all_empty": all_empty, "test_only": test_only}  # fmt: skip


def _train(data: str = "good", *extra: str) -> list[str]:
    return ["train", *TINY, *QUICK, "--data", f"vtab1k:{{{data}}}", "--out", "{root}/out", *extra]


#: case -> (argv with {placeholders} from the world fixture, fragments the error must contain)
CASES = {
    "epochs below the default warm-up": (_train("good", "--warmup-epochs", "10", "--epochs", "2"),
                                         ["--warmup-epochs 10 exceeds --epochs 2", "pass --warmup-epochs"]),
    "negative clip-grad": (_train("good", "--clip-grad", "-1"), ["--clip-grad", "must be > 0"]),
    "negative min-lr": (_train("good", "--min-lr", "-0.05"), ["--min-lr", "must be >= 0"]),
    "negative warmup-lr": (_train("good", "--warmup-lr", "-1"), ["--warmup-lr", "must be >= 0"]),
    "lr nan": (_train("good", "--lr", "nan"), ["'lr'", "finite number"]),
    "device bogus": (_train("good", "--device", "bogus"), ["'bogus' is not a device", "cpu"]),
    "negative seed": (_train("good", "--seed", "-1"), ["--seed", "[0, 2**32)"]),
    "label smoothing 2": (_train("good", "--label-smoothing", "2"), ["--label-smoothing", "[0, 1)"]),
    "drop path 5": (_train("good", "--drop-path", "5"), ["--drop-path", "[0, 1)"]),
    "negative workers": (_train("good", "--num-workers", "-1"), ["--num-workers", ">= 0"]),
    "resume and overwrite": (_train("good", "--resume", "--overwrite"), ["pass only one"]),
    "empty trainval split": (_train("empty_trainval"), ["'trainval' split", "is empty"]),
    "all splits empty": (_train("all_empty"), ["training splits", "are empty"]),
    "label only in test": (_train("test_only"), ["label 9", "outside the 4 classes", "--num-classes"]),
    "pretrained file with the embedded backbone": (
        ["train", "--model", "vpeft/vit-mini", "--pretrained-file", "{root}/evil.npz", "--data", "mini:mnist",
         "--out", "{root}/out", *QUICK], ["embedded backbone", "drop --pretrained-file"]),
    "yaml syntax error": (_train("good", "-c", "{root}/syntax.yaml"), ["not valid YAML", "syntax.yaml"]),
    "yaml float epochs": (["train", *TINY, "--quiet", "--data", "vtab1k:{good}", "--out", "{root}/out", "-c",
                           "{root}/float_epochs.yaml"], ["'epochs'", "expects int, got 1.7"]),
    "yaml options list": (_train("good", "-c", "{root}/list_options.yaml"), ["'options'", "must be a mapping"]),
    "config is a folder": (_train("good", "-c", "{root}"), ["is a folder", "YAML file"]),
    "output under a file": (["train", *TINY, *QUICK, "--data", "vtab1k:{good}", "--out", "{root}/a_file/run"],
                            ["a_file", "writable"]),
    "malicious npz": (_train("good", "--pretrained-file", "{root}/evil.npz"), ["never loaded"]),
    "malicious checkpoint": (["train", *TINY, *QUICK, "--data", "vtab1k:{good}", "--out", "{evil_ckpt}",
                              "--resume"], ["cannot be loaded safely", "--overwrite"]),
    "truncated adapter": (["eval", *TINY, "--adapter", "{truncated}", "--data", "vtab1k:{good}"],
                          ["adapter.safetensors is damaged", "save or copy the adapter again"]),
    "eval on another class count": (["eval", *TINY, "--adapter", "{finished}", "--data", "mini:count"],
                                    ["4-class head", "6 classes"]),
    "bench unknown option": (["bench", "--methods", "lora", "--opt", "lora.rnk=2", "--out", "{root}/b"],
                             ["unknown option", "rank"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_message(world, case, capsys) -> None:
    argv, fragments = CASES[case]
    before = {p.name: p.read_bytes() for p in world["finished"].iterdir() if p.is_file()}
    argv = [a.format(**world) for a in argv]
    code = main(argv)
    assert code == 2, f"{case}: exit {code}"
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{case}: {fragment!r} not in {err!r}"
    assert not (world["root"] / "out" / "result.json").exists()
    assert {p.name: p.read_bytes() for p in world["finished"].iterdir() if p.is_file()} == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(world, capsys) -> None:
    argv = [a.format(**world) for a in _train("good", "--device", "cuda")]
    assert main(argv) == 2
    assert "CUDA is not available on this machine; use --device cpu or auto" in capsys.readouterr().err


def test_values_in_yaml_and_python_are_converted_by_type(world, tmp_path) -> None:
    from vpeft.train import TrainConfig

    cfg = TrainConfig(lr="3e-3", weight_decay="1e-4", epochs=2.0, warmup_epochs=0, amp=False)  # as YAML 1.1 reads
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.amp) == (3e-3, 1e-4, 2, "off")
    (tmp_path / "c.yaml").write_text("lr: 3e-3\nepochs: 1\nwarmup_epochs: 0\n")
    argv = [a.format(**world) for a in _train("good", "-c", str(tmp_path / "c.yaml"))]
    argv[argv.index("{root}/out".format(**world))] = str(tmp_path / "run")
    assert main(argv) == 0
    model = vpeft.apply(make_backbone("vit"), "lora", rank=2.0)  # an integral float is an int
    assert vpeft.get_state(model).config.rank == 2
    for bad in ({"rank": 2.5}, {"alpha": float("nan")}, {"rank": "two"}):
        with pytest.raises(ConfigError, match="lora"):
            vpeft.apply(make_backbone("vit"), "lora", **bad)


def test_byte_order_mark_in_a_split_file_is_not_part_of_the_path(world, tmp_path) -> None:
    from vpeft.data import load_task

    task_dir = shutil.copytree(world["good"], tmp_path / "bom")
    for name in ("train800.txt", "train800val200.txt"):
        (task_dir / name).write_bytes(b"\xef\xbb\xbf" + (task_dir / name).read_bytes())
    task = load_task(f"vtab1k:{task_dir}")
    assert all("\ufeff" not in path for path, _ in task.split("trainval"))
    assert task.split("trainval") == [(p.replace(str(world["good"]), str(task_dir)), y)
                                      for p, y in load_task(f"vtab1k:{world['good']}").split("trainval")]  # fmt: skip


def test_the_readme_config_file_parses() -> None:
    from pathlib import Path

    from vpeft.cli import _spec_from_args, build_parser

    config = Path(__file__).parents[1] / "configs" / "lora_vtab.yaml"
    args = build_parser().parse_args(["train", "-c", str(config), "--data", "mini:mnist", "--out", "x", "--lr", "5e-3"])
    spec = _spec_from_args(args)
    assert spec.method == "lora" and spec.options == {"rank": 8, "targets": ["q", "v"]}
    assert spec.train.lr == 5e-3 and spec.train.weight_decay == 1e-4 and spec.train.epochs == 100
