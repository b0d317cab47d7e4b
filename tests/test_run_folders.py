"""`vpeft train` into a folder that holds a run, and `vpeft eval` of an adapter on the wrong task or split."""

from __future__ import annotations

import json

import pytest

from datagen import make_vtab_task
from vpeft.cli import main
from vpeft.tasks import get_task_type
from vpeft.train.folders import RunBusyError, RunLock

BASE = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--quiet", "--method", "bitfit",
        "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--drop-path", "0",
        "--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=48",
        "--model-arg", "depth=2", "--model-arg", "num_heads=3"]  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_vtab_task(tmp_path_factory.mktemp("vtab") / "stripes", num_classes=4, n_train=32, n_val=8, n_test=16)


@pytest.fixture(scope="module")
def finished(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(out)]) == 0
    return out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_train_into_a_finished_run_is_refused_and_keeps_it(task, finished, capsys) -> None:
    before = _snapshot(finished)
    assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(finished), "--lr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(finished) == before


def test_resume_of_a_finished_run_deletes_nothing(task, finished, capsys) -> None:
    before = _snapshot(finished)
    assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(finished), "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert _snapshot(finished) == before
    assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(finished), "--resume", "--lr", "1e-5"]) == 2
    err = capsys.readouterr().err
    assert "another spec" in err and "train.lr: 0.001 -> 1e-05" in err
    assert _snapshot(finished) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_succeeds(task, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(out)]) == 0
    before = _snapshot(out)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(get_task_type("classification"), "save", broken)  # the new run fails at its very end
    assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(out), "--overwrite", "--lr", "1e-4"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _snapshot(out) == before, "a failed overwrite changed the old run"
    monkeypatch.undo()
    assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(out), "--overwrite", "--lr", "1e-4"]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["lr"] == 1e-4 and record["identity"]["train"]["lr"] == 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == [".run.lock", "run"]  # no staging left


def test_a_run_being_trained_elsewhere_is_refused(task, tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    with RunLock(out):
        assert main([*BASE, "--data", f"vtab1k:{task}", "--out", str(out)]) == 2
        assert "being trained by pid" in capsys.readouterr().err
        with pytest.raises(RunBusyError):
            RunLock(out).acquire()
    RunLock(out).acquire().release()  # free again once the holder let go


def test_eval_refuses_another_class_count_and_warns_on_training_splits(task, finished, tmp_path, capsys) -> None:
    other = make_vtab_task(tmp_path / "six", num_classes=6, n_train=12, n_val=6, n_test=12)
    common = ["eval", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--adapter", str(finished),
              "--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=48",
              "--model-arg", "depth=2", "--model-arg", "num_heads=3"]  # fmt: skip
    assert main([*common, "--data", f"vtab1k:{other}"]) == 2
    err = capsys.readouterr().err
    assert "4-class head" in err and "6 classes" in err
    assert main([*common, "--data", f"vtab1k:{task}", "--split", "val"]) == 0
    captured = capsys.readouterr()
    assert "part of this adapter's training data" in captured.err and "top-1" in captured.out
    assert main([*common, "--data", f"vtab1k:{task}", "--split", "test"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_finished_run_has_a_model_card_that_parses_back(finished) -> None:
    from vpeft.card import read_model_card

    record = json.loads((finished / "result.json").read_text())
    card = read_model_card(finished)
    assert card["library_name"] == "vpeft" and card["base_model"] == "vit_tiny_patch16_224"
    assert card["vpeft"]["method"] == "bitfit" and card["vpeft"]["top1"] == record["top1"]
    assert card["vpeft"]["trainable_params"] == record["trainable_params"]
    assert card["vpeft"]["protocol"]["eval_split"] == "test" and card["vpeft"]["run_key"] == record["run_key"]
    assert f"{record['top1']:.2f}%" in (finished / "README.md").read_text()
