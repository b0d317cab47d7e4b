"""The data-dependent stages of GLoRA (supernet + evolutionary search on val) and E2VPT (prompt pruning on train).

Each stage runs on tiny random ViTs with random stage data, is deterministic under a seed, writes a
decision into the config that reloads exactly without data, and never reads the test split.
"""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch

import vpeft
from datagen import make_vtab_task
from vpeft.cli import main
from vpeft.methods import e2vpt, glora
from vpeft.methods.base import StageData, random_stage_data
from vpeft.methods.evolution import evolve
from vpeft.train import RunSpec, TrainConfig, run

from conftest import NUM_CLASSES, make_backbone, make_input

D, DEPTH = 48, 2
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}
SEARCH = dict(population=4, generations=2, parents=2)  # a tiny search budget


def _perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _data(seed: int, shift: float = 0.0, n: int = 10) -> StageData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, 3, 32, 32, generator=g) + shift * y.view(-1, 1, 1, 1)
    return StageData(torch.utils.data.TensorDataset(x, y), batch_size=5, seed=seed)


# ---------------------------------------------------------------- the shared evolutionary search


def test_evolve_finds_the_best_feasible_candidate_and_is_seeded() -> None:
    """Score = number of units choosing 2, cost = sum of choices: the budget binds, the search still finds its best."""
    choices = {"k": [0, 1, 2]}

    def go(seed: int) -> dict:
        return evolve(choices, 4, lambda c: sum(u["k"] == 2 for u in c), lambda c: sum(u["k"] for u in c), 6,
                      population=8, generations=6, mutation_prob=0.3, rng=random.Random(seed), what="test")  # fmt: skip

    found = go(0)
    assert found["params"] <= 6 and found["score"] == 3  # three 2s fit a budget of 6, four do not
    assert go(0) == found


# ---------------------------------------------------------------- GLoRA


def _supernet(seed: int = 0, backbone: str = "vit", **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = make_backbone(backbone)
    torch.manual_seed(seed)
    model = vpeft.apply(copy.deepcopy(base), "glora", stage="supernet", **options)
    _perturb(model)
    return base, model


def test_glora_supernet_draws_per_layer_in_training_and_uses_a_to_e_in_evaluation() -> None:
    def drawn(seed: int) -> list[list[dict]]:
        _, model = _supernet(seed)
        model.train()
        seen = []
        for _ in range(3):
            model(make_input())
            seen.append([dict(m.kinds) for m in glora._layers(model).values()])
        return seen

    a = drawn(0)
    assert drawn(0) == a  # seeded
    assert drawn(1) != a
    assert len({json.dumps(k, sort_keys=True) for step in a for k in step}) > 4  # layers and steps differ
    _, model = _supernet(0)
    model.train()(make_input())
    model.eval()(make_input())
    assert all(m.kinds == vpeft.get_state(model).config.kinds() for m in glora._layers(model).values())


@pytest.mark.parametrize(
    "kinds",
    [dict(a="vector", b="constant", c="vector", d="constant", e="vector"),
     dict(a="constant", b="lora", c="lora", d="vector", e="constant"),
     dict(a="lora", b="vector", c="none", d="none", e="none")],
)  # fmt: skip
def test_glora_supernet_slices_as_the_official_layer(kinds: dict) -> None:
    """A vector is X_d[:, 0], a constant X_d[0, 0] (D, E: D[0]), LoRA X_d X_u, as SuperScalableLinear.prepare_path."""
    _, model = _supernet()
    layer = model.blocks[1].mlp.fc2
    layer.kinds = dict(kinds)
    w, b = layer.base_layer.weight, layer.base_layer.bias

    def support(key: str) -> torch.Tensor:
        kind = kinds[key]
        if key in "de":
            return {"vector": getattr(layer, key), "constant": getattr(layer, key)[0], "none": torch.zeros(())}[kind]
        down, up = getattr(layer, f"{key}_down"), getattr(layer, f"{key}_up")
        zero = torch.zeros(down.shape[0], up.shape[1])
        return {"lora": down @ up, "vector": down[:, :1], "constant": down[0, 0], "none": zero}[kind]

    x = torch.randn(3, 4, layer.base_layer.in_features)
    with torch.no_grad():
        a, bb, c, d, e = (support(k) for k in "abcde")
        expected = torch.nn.functional.linear(x, w + w * a + bb, b + b * d + e + (w @ c)[:, 0])
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_glora_search_is_seeded_within_budget_and_the_subnet_inherits_exactly(backbone, tmp_path, monkeypatch) -> None:
    base, model = _supernet(backbone=backbone)
    data = random_stage_data(model, NUM_CLASSES, n=10)
    config = vpeft.make_config("glora", stage="supernet", budget=4000, **SEARCH)
    found = glora.search(model, data, config, seed=0)
    assert glora.search(model, data, config, seed=0) == found
    assert found["params"] <= 4000 and found["evaluated"] > 1 and len(found["layers"]) == 4 * DEPTH
    subnet = glora.inherit(model, found["layers"], copy.deepcopy(base)).eval()
    assert vpeft.count_trainable(subnet, include_head=False) == found["params"]  # the closed form
    x = make_input(3)
    glora.set_layers(model, found["layers"])
    with torch.no_grad():
        assert torch.equal(subnet(x), model(x))  # the subnet is the supernet at the found choices
    assert 100 * glora.top1(subnet, data.batches()) == found["val_top1"]
    # the search's decision is in the config: reload without data or search, then merge
    vpeft.save_adapter(subnet, tmp_path)
    monkeypatch.setattr(glora, "search", lambda *a, **k: pytest.fail("load_adapter searched"))
    fresh = vpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert glora.load_layers(vpeft.get_state(fresh).config.layers) == found["layers"]
    with torch.no_grad():
        expected = subnet(x)
        assert torch.equal(fresh(x), expected)
        reloaded = copy.deepcopy(base)
        reloaded.load_state_dict(vpeft.merge(fresh).state_dict(), strict=True)
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["glora", "noah"])
def test_a_set_subnet_is_evaluated_as_itself_after_training(method: str) -> None:
    """After a training forward, evaluation uses the subnet a search set (not the supernet's evaluation subnet)."""
    torch.manual_seed(0)
    model = vpeft.apply(make_backbone("vit"), method, stage="supernet")
    _perturb(model, 0.5)
    x = make_input()
    if method == "glora":
        names = list(glora._layers(model))
        small = {name: dict(a="none", b="none", c="none", d="none", e="constant") for name in names}

        def set_small() -> None:
            glora.set_layers(model, small)
    else:
        from vpeft.methods import noah

        def set_small() -> None:
            noah.set_architecture(model, [{"adapter": 0, "lora": 0, "prompt": 0}] * DEPTH)

    with torch.no_grad():
        model.train()(x)
        default = model.eval()(x)  # the first evaluation after training: the evaluation subnet
        model.train()(x)
        set_small()
        small_out = model.eval()(x)
        assert not torch.allclose(small_out, default)
        assert torch.equal(model(x), small_out)


def test_glora_subnet_count_and_bad_layers() -> None:
    base, model = _supernet()
    names = list(glora._layers(model))
    layers = {n: dict(a="lora", b="vector", c="none", d="constant", e="none") for n in names}
    subnet = vpeft.apply(copy.deepcopy(base), "glora", stage="subnet", layers=json.dumps(layers))
    r, hidden = 4, int(D * 2.0)
    per_block = sum(r * (o + i) + o + 1 for i, o in ((D, 3 * D), (D, D), (D, hidden), (hidden, D)))
    assert vpeft.count_trainable(subnet, include_head=False) == DEPTH * per_block
    with pytest.raises(vpeft.ConfigError, match="needs layers="):
        vpeft.make_config("glora", stage="subnet")
    with pytest.raises(vpeft.ConfigError, match="another backbone"):
        vpeft.apply(copy.deepcopy(base), "glora", stage="subnet", layers=json.dumps(dict(list(layers.items())[:3])))
    with pytest.raises(vpeft.ConfigError, match="c must be one of"):
        glora.load_layers(json.dumps({names[0]: dict(a="lora", b="lora", c="constant", d="none", e="none")}))
    with pytest.raises(vpeft.ConfigError, match="needs supernet="):
        vpeft.make_config("glora", stage="search")


# ---------------------------------------------------------------- E2VPT


PRUNE = dict(prune_tokens=0.4, prune_segments=0.5, prune_epochs=2)


def _pruned(data, seed: int = 5, backbone: str = "vit", **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vpeft.apply(make_backbone(backbone), "e2vpt", data=data, **{**PRUNE, **options})


def test_e2vpt_selection_depends_on_the_data_and_is_deterministic() -> None:
    sel = vpeft.get_state(_pruned(_data(0))).config.selection
    assert vpeft.get_state(_pruned(_data(0))).config.selection == sel
    assert vpeft.get_state(_pruned(_data(1, shift=1.5))).config.selection != sel
    assert len(sel["tokens"]) == 3 and all(len(s) == 8 for s in sel["segments"])  # 5 - int(2.0), 16 - 8


@pytest.mark.parametrize(("tokens", "segments"), [(0.0, 0.5), (0.4, 0.0), (0.4, 0.5), (0.8, 0.9), (0.99, 0.0)])
def test_e2vpt_pruned_count_is_the_closed_form(tokens: float, segments: float) -> None:
    model = _pruned(_data(0), prune_tokens=tokens, prune_segments=segments, prune_epochs=0)
    k = 5 - min(int(5 * tokens), 4)
    s = 16 - min(int(16 * segments), 15)
    assert vpeft.count_trainable(model, include_head=False) == DEPTH * (k * s * D // 16) + DEPTH * 5 * D


def test_e2vpt_rewinds_the_kept_prompts_to_their_initial_values() -> None:
    """The pruned model's prompts are the unpruned model's initial prompts (same seed) at the kept entries."""
    model = _pruned(_data(0))
    torch.manual_seed(5)
    unpruned = vpeft.apply(make_backbone("vit"), "e2vpt")
    sel = vpeft.get_state(model).config.selection
    for block, ref in zip(model.blocks, unpruned.blocks, strict=True):
        kept = block.tokens()[0]
        full = ref.prompt[0, sel["tokens"]]
        owner = torch.arange(D) % 16
        for row, (t, segs) in enumerate(zip(sel["tokens"], sel["segments"], strict=True)):
            on = torch.isin(owner, torch.tensor(segs))
            assert torch.equal(kept[row, on], full[row, on]), t
            assert not kept[row, ~on].any()
    for a, b in zip(model.vpeft_e2vpt.keys, unpruned.vpeft_e2vpt.keys, strict=True):
        assert torch.equal(a, b)


def test_e2vpt_stage_leaves_the_model_and_the_random_state() -> None:
    base = make_backbone("vit").train()
    model = copy.deepcopy(base)
    config = vpeft.make_config("e2vpt", **PRUNE)
    rng = torch.get_rng_state()
    out = vpeft.get_method("e2vpt").prepare(model, vpeft.describe(model), config, _data(0))
    assert torch.equal(torch.get_rng_state(), rng)  # inject draws the prompts the first training started from
    assert out.selection and config.selection is None
    assert all(m.training for m in model.modules())
    for (name, a), b in zip(base.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_e2vpt_importance_is_the_token_mask_gradient(monkeypatch) -> None:
    """dL/dgamma_t at gamma = 1, by autograd through an explicit mask, equals the stage's sum of g * P."""
    torch.manual_seed(0)
    model = vpeft.apply(make_backbone("vit"), "e2vpt", visual_tokens=4)
    _perturb(model, 0.5)
    x, y = make_input(4), torch.arange(4) % NUM_CLASSES
    gamma = torch.ones(4, requires_grad=True)
    blocks = [b for b in model.blocks]
    originals = [b.prompt for b in blocks]
    for b, p in zip(blocks, originals, strict=True):
        del b.prompt
        b.prompt = p * gamma.view(1, -1, 1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (expected,) = torch.autograd.grad(loss, gamma)
    for b, p in zip(blocks, originals, strict=True):
        b.prompt = p
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), originals)
    got = sum((g * p.detach()) for g, p in zip(grads, originals, strict=True))[0].sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backbone", ["vit", "vit_reg_cls"])
def test_e2vpt_reload_needs_no_data(backbone: str, tmp_path, monkeypatch) -> None:
    model = _pruned(_data(0), backbone=backbone).eval()
    _perturb(model)
    vpeft.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["options"]["selection"] == vpeft.get_state(model).config.selection
    monkeypatch.setattr(e2vpt.E2VPT, "prepare", lambda *a, **k: pytest.fail("load_adapter ran the pruning stage"))
    fresh = vpeft.load_adapter(make_backbone(backbone), tmp_path).eval()
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_e2vpt_defaults_and_bad_input() -> None:
    assert not vpeft.make_config("e2vpt").pruning  # the default prunes nothing and reads no data
    with pytest.raises(vpeft.ConfigError, match="reads no data|already holds"):
        vpeft.apply(make_backbone("vit"), "e2vpt", data=_data(0))
    with pytest.raises(vpeft.ConfigError, match="training data"):
        vpeft.apply(make_backbone("vit"), "e2vpt", prune_tokens=0.5)
    with pytest.raises(vpeft.ConfigError, match="visual_tokens > 0"):
        vpeft.make_config("e2vpt", visual_tokens=0, prune_tokens=0.5)
    with pytest.raises(vpeft.ConfigError, match="fractions"):
        vpeft.make_config("e2vpt", prune_tokens=1.0)
    with pytest.raises(vpeft.ConfigError, match="distinct tokens"):
        vpeft.apply(make_backbone("vit"), "e2vpt", prune_tokens=0.4, selection={"tokens": [0, 0, 1], "segments": []})
    with pytest.raises(vpeft.ConfigError, match="does not divide"):
        vpeft.apply(make_backbone("vit"), "e2vpt", prune_segments=0.5, segments=5, data=_data(0))


# ---------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def vtab_task(tmp_path_factory):
    return make_vtab_task(tmp_path_factory.mktemp("vtab") / "stripes", num_classes=4, n_train=32, n_val=8, n_test=16)


def _no_test(vtab_task, tmp_path):
    """A copy of the task whose test split names a missing file: reading it fails the run."""
    task = tmp_path / "task"
    shutil.copytree(vtab_task, task)
    (task / "test.txt").write_text("images/test/missing.png 0\n")
    return task


def test_e2vpt_run_prunes_on_train_only(vtab_task, tmp_path) -> None:
    task = _no_test(vtab_task, tmp_path)
    train = TrainConfig(epochs=1, warmup_epochs=0, batch_size=8, lr=3e-3, drop_path=0.0, seed=0)
    spec = RunSpec(model="vit_tiny_patch16_224", model_args=TINY_VIT, data=f"vtab1k:{task}", method="e2vpt",
                   pretrained=False, train=train, mode="tune", options={**PRUNE, "prune_epochs": 1})  # fmt: skip
    record = run(spec, tmp_path / "run", progress=False)
    assert record["status"] == "ok" and record["stage"] == "pruning" and record["stage_split"] == "train"
    assert record["stage_seconds"] > 0 and record["eval_split"] == "val"
    assert record["trainable_params"] == DEPTH * (3 * 8 * D // 16) + DEPTH * 5 * D
    saved = json.loads((tmp_path / "run/adapter_config.json").read_text())
    assert len(saved["options"]["selection"]["tokens"]) == 3


def test_glora_supernet_search_subnet_from_the_cli(vtab_task, tmp_path, capsys) -> None:
    """Supernet and search read train and val only; the search writes its file and the subnet's adapter."""
    task = _no_test(vtab_task, tmp_path)
    model_args = [a for k, v in TINY_VIT.items() for a in ("--model-arg", f"{k}={v}")]
    common = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", f"vtab1k:{task}", "--method", "glora",
              "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--drop-path", "0", "--quiet", *model_args]  # fmt: skip
    assert main(["train", *common, "--mode", "tune", "--opt", "stage=supernet", "--out", str(tmp_path / "sup")]) == 0
    search = ["--opt", "stage=search", "--opt", f"supernet={tmp_path / 'sup'}", "--opt", "budget=6000",
              *[a for k, v in SEARCH.items() for a in ("--opt", f"{k}={v}")]]  # fmt: skip
    assert main(["train", *common, "--mode", "tune", *search, "--out", str(tmp_path / "search")]) == 0
    assert "glora search" in capsys.readouterr().out
    found = json.loads((tmp_path / "search/glora_search.json").read_text())
    record = json.loads((tmp_path / "search/result.json").read_text())
    assert record["eval_split"] == "val" and found["params"] <= 6000 and record["trainable_params"] == found["params"]
    saved = json.loads((tmp_path / "search/adapter_config.json").read_text())
    assert saved["options"]["stage"] == "subnet" and json.loads(saved["options"]["layers"]) == found["layers"]
    # the saved subnet scores on val what the search found
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--adapter", str(tmp_path / "search"),
                 "--data", f"vtab1k:{task}", "--split", "val", *model_args]) == 0  # fmt: skip
    assert f"top-1 {found['val_top1']:.2f}%" in capsys.readouterr().out
    shutil.copy(vtab_task / "test.txt", task / "test.txt")
    layers = str(tmp_path / "search/glora_search.json")
    assert main(["train", *common, "--opt", "stage=subnet", "--opt", f"layers={layers}",
                 "--out", str(tmp_path / "subnet")]) == 0  # fmt: skip
    retrained = json.loads((tmp_path / "subnet/result.json").read_text())
    assert retrained["trainable_params"] == found["params"]
