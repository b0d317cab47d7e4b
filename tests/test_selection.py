"""Methods that choose what to train from the training data (GPS, SPT, SCT) and the method lifecycle.

The table-driven checks (identity at init, one step, save/load, merge) are in test_methods.py; here:
the selection depends on the data and on nothing else, reproduces from the adapter alone, matches a
naive computation of its formula, lets gradients reach only the selected entries, and the runner's
stage reads the training split only.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import vpeft
from datagen import make_vtab_task
from vpeft.backbones.create import create_backbone
from vpeft.methods.base import StageData
from vpeft.methods.gps import supcon_loss
from vpeft.methods.spt import candidates
from vpeft.train import RunSpec, TrainConfig, run

from conftest import IMG, NUM_CLASSES, make_backbone, make_input

STAGED = ["gps", "spt_lora", "spt_adapter", "sct"]
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}


def _task(seed: int, n: int = 12, shift: float = 0.0) -> torch.utils.data.TensorDataset:
    """A training split: class c has mean c * shift, so two shifts are two different tasks."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, 3, IMG, IMG, generator=g) + shift * y.view(-1, 1, 1, 1)
    return torch.utils.data.TensorDataset(x, y)


def _selected(method: str, data, backbone: str = "vit", **options) -> dict:
    model = vpeft.apply(make_backbone(backbone), method, data=data, **options)
    return vpeft.get_state(model).config.selection


@pytest.mark.parametrize("method", STAGED)
def test_selection_depends_on_the_data_and_is_deterministic(method: str) -> None:
    # the tiny model is smaller than SPT's default budget and narrower (48) than SCT's default 96 channels
    options = {"budget": 3000} if method.startswith("spt") else {"channels": 8} if method == "sct" else {}
    a = _selected(method, _task(0, shift=0.0), **options)
    assert _selected(method, _task(0, shift=0.0), **options) == a  # same data and seed: the same selection
    assert _selected(method, _task(1, shift=1.5), **options) != a  # another task selects differently


def test_gps_views_follow_the_seed() -> None:
    data = _task(0)
    same = [_selected("gps", StageData(data, seed=3, batch_size=12)) for _ in range(2)]
    assert same[0] == same[1]
    assert _selected("gps", StageData(data, seed=4, batch_size=12)) != same[0]  # other random views


def test_stage_leaves_the_backbone_as_it_was() -> None:
    """The stage reads the model but changes no weight, mode or flag (BatchNorm statistics included)."""
    for backbone in ("resnet", "vit"):
        base = make_backbone(backbone).train()
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        vpeft.methods.gps.GPS().prepare(model, vpeft.describe(model), vpeft.make_config("gps"), StageData(_task(0)))
        assert all(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        for (name, a), b in zip(base.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("method", STAGED)
def test_load_reproduces_the_selection_without_data(method: str, tmp_path, monkeypatch) -> None:
    base = make_backbone("vit")
    model = vpeft.apply(copy.deepcopy(base), method, data=_task(0)).eval()
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    vpeft.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["options"]["selection"] == vpeft.get_state(model).config.selection
    impl = type(vpeft.get_method(method))
    monkeypatch.setattr(impl, "prepare", lambda *a, **k: pytest.fail("load_adapter ran the data stage"))
    fresh = vpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert vpeft.get_state(fresh).config.selection == vpeft.get_state(model).config.selection
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_apply_without_data_says_how() -> None:
    with pytest.raises(vpeft.ConfigError, match=r"gps.*training data.*data="):
        vpeft.apply(make_backbone("vit"), "gps")
    with pytest.raises(vpeft.ConfigError, match="lora.*reads no data"):
        vpeft.apply(make_backbone("vit"), "lora", data=_task(0))
    with pytest.raises(vpeft.ConfigError, match="selection does not fit"):
        vpeft.apply(make_backbone("vit"), "gps", selection={"blocks.0.attn.qkv": [0]})
    with pytest.raises(vpeft.ConfigError, match="data must be a torch Dataset"):
        vpeft.apply(make_backbone("vit"), "sct", data=[1, 2, 3])


# ---------------------------------------------------------------- the formulas, against naive computations


def test_supcon_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    f, y, t = torch.randn(8, 5, generator=g), torch.tensor([0, 1, 0, 2]), 0.07
    z = torch.nn.functional.normalize(f, dim=-1)
    labels = y.repeat(2)
    losses = []
    for i in range(8):
        others = [a for a in range(8) if a != i]
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / t for a in others]), 0)
        positives = [p for p in others if labels[p] == labels[i]]
        losses.append(-sum(z[i] @ z[p] / t - denom for p in positives) / len(positives))
    torch.testing.assert_close(supcon_loss(f, y, t), torch.stack(losses).mean())


def test_gps_selects_the_largest_gradients_of_every_row(monkeypatch) -> None:
    """With identity views (monkeypatched), the selection is the top-k |grad| of the SupCon loss, row by row."""
    import vpeft.methods.gps as gps

    monkeypatch.setattr(gps.TwoViews, "__call__", lambda self, x: torch.cat([x, x.flip(-1)]))
    data = _task(2, n=10)
    model = make_backbone("vit")
    sel = _selected("gps", StageData(data, batch_size=10), k=2)
    x, y = data.tensors
    features = model.forward_head(model.forward_features(torch.cat([x, x.flip(-1)])), pre_logits=True)
    weight = model.blocks[1].mlp.fc1.weight
    (grad,) = torch.autograd.grad(supcon_loss(features, y, 0.07), weight)
    expected = grad.abs().topk(2, dim=1).indices.sort(dim=1).values + torch.arange(96)[:, None] * 48
    assert sel["blocks.1.mlp.fc1"] == expected.flatten().tolist()


def test_sct_channels_are_the_largest_mean_per_class_norms() -> None:
    data = _task(3, n=15)
    model = make_backbone("vit")
    sel = _selected("sct", StageData(data, batch_size=4), channels=5)
    stream = []
    model.blocks[0].norm2.register_forward_pre_hook(lambda m, a: stream.append(a[0][:, 1:]))  # patch tokens
    with torch.no_grad():
        model(data.tensors[0])
    h, y = stream[0], data.tensors[1]
    per_class = torch.stack([h[y == c].square().sum((0, 1)).sqrt() for c in range(NUM_CLASSES)])  # L2 per channel
    expected = per_class.mean(0).topk(5).indices.sort().values
    assert sel["blocks.0"] == expected.tolist()


def _spt_count(model: torch.nn.Module, sel: dict, rank: int, kind: str) -> int:
    """SPT's trainable count from its selection, closed form: modules, whole vectors, entries, class token."""
    count = 0
    for param, start, end in sel["structured"]:
        in_dim = model.get_parameter(param).shape[1]
        count += rank * (in_dim + end - start) + (rank + end - start if kind == "adapter" else 0)
    count += sum(model.get_parameter(p).numel() for p in sel["whole"])
    return count + sum(len(v) for v in sel["entries"].values()) + model.cls_token.numel()


@pytest.mark.parametrize("method", ["spt_lora", "spt_adapter"])
@pytest.mark.parametrize("budget", [1500, 6000])
def test_spt_count_and_budget(method: str, budget: int) -> None:
    base = make_backbone("vit")
    model = vpeft.apply(copy.deepcopy(base), method, data=_task(0), budget=budget)
    sel = vpeft.get_state(model).config.selection
    count = vpeft.count_trainable(model, include_head=False)
    assert count == _spt_count(base, sel, 8, method.removeprefix("spt_"))
    assert abs(count - budget) <= 0.5 * budget  # tau is chosen to bring the count close to the budget
    assert sel["structured"] or budget < 2000  # a larger budget gives some matrix a LoRA / Adapter
    units = {u.param for u in candidates(base, vpeft.describe(base))}
    assert not any(p.startswith(("patch_embed", "head")) for p in units) and "cls_token" not in units


@pytest.mark.parametrize("method,backbone", [("gps", "vit"), ("gps", "swin"), ("gps", "convnext"),
                                             ("spt_lora", "vit"), ("spt_adapter", "swin")])  # fmt: skip
def test_gradients_reach_only_the_selected_entries(method: str, backbone: str) -> None:
    """After a step, every changed weight entry of the (merged) backbone is a selected one."""
    base = make_backbone(backbone)
    options = {"budget": 3000} if method.startswith("spt") else {}  # a small budget: sparse entries too
    model = vpeft.apply(copy.deepcopy(base), method, data=_task(0), **options)
    sel = vpeft.get_state(model).config.selection
    entries = sel["entries"] if method.startswith("spt") else {f"{m}.weight": v for m, v in sel.items()}
    structured = {p for p, *_ in sel.get("structured", [])}
    model.train()
    opt = torch.optim.SGD(vpeft.trainable_parameters(model).values(), lr=0.5)
    torch.nn.functional.cross_entropy(model(make_input(4)), torch.arange(4) % NUM_CLASSES).backward()
    opt.step()
    if method == "spt_adapter":  # not mergeable: read the updated weights from the wrappers
        changed = {}
        for name, module in model.named_modules():
            for pname in getattr(module, "names", []):
                changed[f"{name}.{pname}"] = module.updated(pname) - module.base_layer.get_parameter(pname)
    else:
        merged = dict(vpeft.merge(model).named_parameters())
        changed = {n: merged[n] - p for n, p in base.named_parameters() if n in merged}
    checked = 0
    for name, delta in changed.items():
        if name not in entries or name in structured or "." not in name:
            continue
        moved = set(delta.flatten().nonzero().flatten().tolist())
        assert moved and moved <= set(entries[name]), name
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def vtab_task(tmp_path_factory):
    return make_vtab_task(tmp_path_factory.mktemp("vtab") / "stripes", num_classes=4, n_train=32, n_val=8, n_test=16)


def _spec(data: str, method: str, **kw) -> RunSpec:
    train = dict(epochs=1, warmup_epochs=0, batch_size=8, lr=3e-3, drop_path=0.0, seed=0)
    return RunSpec(model="vit_tiny_patch16_224", model_args=TINY_VIT, data=data, method=method, pretrained=False,
                   train=TrainConfig(**train), **kw)  # fmt: skip


@pytest.mark.parametrize("method", STAGED)
def test_run_does_stage_then_training(vtab_task, tmp_path, method: str, monkeypatch) -> None:
    """One run: the stage reads trainval (final mode), its seconds are recorded apart, the adapter keeps the selection."""
    impl = type(vpeft.get_method(method))
    seen = {}
    real = impl.prepare

    def spy(self, model, anatomy, config, data):
        seen["split"] = data.split
        seen["paths"] = {path for path, _ in data.dataset.samples}
        return real(self, model, anatomy, config, data)

    monkeypatch.setattr(impl, "prepare", spy)
    record = run(_spec(f"vtab1k:{vtab_task}", method), tmp_path / "run", progress=False)
    trainval = {p for p, _ in vpeft.data.load_task(f"vtab1k:{vtab_task}").split("trainval")}
    assert seen["split"] == "trainval" and seen["paths"] == trainval
    assert record["status"] == "ok" and record["stage_split"] == "trainval"
    assert record["stage_seconds"] > 0 and record["train_seconds"] > 0
    saved = json.loads((tmp_path / "run/adapter_config.json").read_text())
    assert saved["options"]["selection"]
    assert record["options"]["selection"].startswith("sha256:")  # the record keeps a digest, the adapter the lists
    torch.manual_seed(0)  # the run's seed: the same random backbone
    fresh = create_backbone("vit_tiny_patch16_224", 4, pretrained=False, **TINY_VIT)
    model = vpeft.load_adapter(fresh, tmp_path / "run")
    assert vpeft.count_trainable(model, include_head=False) == record["trainable_params"]


def test_stage_never_opens_test_files(vtab_task, tmp_path) -> None:
    """Tune mode with every test image gone and test.txt naming a missing file: stage and training run."""
    task = tmp_path / "task"
    shutil.copytree(vtab_task, task)
    shutil.rmtree(task / "images/test")
    (task / "test.txt").write_text("images/test/missing.png 0\n")
    for method in ("gps", "sct"):
        record = run(_spec(f"vtab1k:{task}", method, mode="tune"), tmp_path / method, progress=False)
        assert record["status"] == "ok" and record["stage_split"] == "train" and record["eval_split"] == "val"


def test_search_stage_needs_tune_mode(vtab_task, tmp_path) -> None:
    spec = _spec(f"vtab1k:{vtab_task}", "noah", options={"stage": "search", "supernet": str(tmp_path)})
    with pytest.raises(vpeft.ConfigError, match="validation split.*--mode tune"):
        run(spec, tmp_path / "search", progress=False)


def test_runner_imports_no_method_module() -> None:
    source = Path(importlib.import_module("vpeft.train.run").__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    methods = {m for m in imported if m.startswith("vpeft.methods")}
    assert methods <= {"vpeft.methods.base"}, methods  # the interface only
