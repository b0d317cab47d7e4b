"""vpeft push and hf-hub: adapters, offline: a fake HfApi and a fake snapshot_download (no network)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

import vpeft
from vpeft.card import write_model_card
from vpeft.cli import main
from vpeft.errors import AdapterMismatchError, ConfigError
from vpeft.hub import HubError, push_adapter, resolve_adapter
from vpeft.multi import MultiAdapterModel

from conftest import make_backbone, make_input


@pytest.fixture
def adapter(tmp_path):
    """A trained-looking LoRA adapter folder with its model card, and the model it came from."""
    model = vpeft.apply(make_backbone("vit"), "lora", rank=2)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(0.05)
    folder = tmp_path / "adapter"
    vpeft.save_adapter(model, folder)
    write_model_card(folder, {"method": "lora", "model": "vit_tiny_patch16_224", "task": "toy", "top1": 50.0,
                              "trainable_params": vpeft.count_trainable(model, False), "num_classes": 5})  # fmt: skip
    (folder / "notes.txt").write_text("not uploaded")
    return folder, model.eval()


class FakeApi:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail:
            raise self.fail

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_creates_the_repo_and_uploads_the_adapter_card_only(adapter) -> None:
    folder, _ = adapter
    api = FakeApi()
    result = push_adapter(folder, "me/toy-lora", private=True, api=api)
    (create, kw1), (upload, kw2) = api.calls
    assert create == "create_repo" and kw1 == {"repo_id": "me/toy-lora", "private": True, "exist_ok": True,
                                                "repo_type": "model"}  # fmt: skip
    assert upload == "upload_folder" and kw2["folder_path"] == str(folder)
    assert sorted(kw2["allow_patterns"]) == ["README.md", "adapter.safetensors", "adapter_config.json"]
    assert result["url"].endswith("/commit/abc")


def test_cli_push_dry_run_lists_files_and_contacts_nothing(adapter, capsys, monkeypatch) -> None:
    folder, _ = adapter
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any Hub call would fail
    assert main(["push", str(folder), "me/toy-lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 3 files" in out and "adapter.safetensors" in out and "README.md" in out
    assert "notes.txt" not in out


def test_cli_push_through_huggingface_hub(adapter, capsys, monkeypatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    folder, _ = adapter
    api = FakeApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_fake")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["push", str(folder), "me/toy-lora", "--message", "first"]) == 0
    assert api.calls[1][1]["commit_message"] == "first"
    assert "hf-hub:me/toy-lora" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "offline", "logged_out", "network", "bad_id", "no_card"])
def test_push_errors_name_the_problem_and_the_fix(case: str, adapter, monkeypatch, capsys) -> None:
    folder, _ = adapter
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    expected = {"missing": "pip install huggingface_hub", "offline": "HF_HUB_OFFLINE is set",
                "logged_out": "not logged in.*hf auth login", "network": "could not reach the Hugging Face Hub",
                "bad_id": "not a Hub repository id", "no_card": "lacks README.md.*write_model_card"}[case]  # fmt: skip
    kwargs = {}
    repo = "me/toy"
    if case == "missing":
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)
        monkeypatch.setattr("vpeft.hub._offline", lambda: False)
    elif case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif case == "logged_out":
        hub = pytest.importorskip("huggingface_hub")
        monkeypatch.setattr(hub, "get_token", lambda: None)
    elif case == "network":
        kwargs["api"] = FakeApi(fail=ConnectionError("Name or service not known"))
    elif case == "bad_id":
        repo = "toy"
    else:
        (folder / "README.md").unlink()
    with pytest.raises((HubError, ConfigError), match=expected):
        push_adapter(folder, repo, **kwargs)
    if case != "network":  # the CLI prints the same message, exit status 2
        assert main(["push", str(folder), repo]) == 2
        assert "vpeft: error:" in capsys.readouterr().err


def test_load_from_a_hub_id_goes_through_snapshot_download(adapter, monkeypatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    folder, model = adapter
    asked = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, repo_type=None):
        asked.append((repo_id, revision, tuple(allow_patterns)))
        return str(folder)  # the "downloaded" snapshot: the local folder

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    x = make_input(3)
    loaded = vpeft.load_adapter(make_backbone("vit"), "hf-hub:me/toy-lora@v1").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert asked[-1][:2] == ("me/toy-lora", "v1") and "adapter.safetensors" in asked[-1][2]
    mm = MultiAdapterModel(make_backbone("vit")).eval()
    mm.load_adapter("toy", "hf-hub:me/toy-lora")
    with torch.no_grad():
        assert torch.equal(mm(x), model(x))
    assert resolve_adapter(folder) == folder  # a local folder is used as it is


def test_offline_without_a_cached_copy_is_a_clear_error(tmp_path, monkeypatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        vpeft.load_adapter(make_backbone("vit"), "hf-hub:me/never-downloaded")


def test_read_adapter_config_names_a_peft_folder_and_the_fix(tmp_path) -> None:
    """A peft folder (or a vpeft folder holding only its peft/ export) is named as such, with the import to use."""
    peft_dir = tmp_path / "peft_only"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(1, 1)}, str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match=r"peft adapter \(LORA\).*vpeft.import_from_peft"):
        vpeft.read_adapter_config(peft_dir)
    with pytest.raises(AdapterMismatchError, match="import_from_peft"):
        vpeft.load_adapter(make_backbone("vit"), peft_dir)
    outer = tmp_path / "outer"
    (outer / "peft").mkdir(parents=True)
    (outer / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterMismatchError, match="only a peft export.*import_from_peft"):
        vpeft.read_adapter_config(outer)
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(AdapterMismatchError, match="not a vpeft adapter config"):
        vpeft.read_adapter_config(other)
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--adapter", str(peft_dir), "--data", "mini:x"]) == 2
