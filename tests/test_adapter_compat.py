"""Adapters saved before a default changed to follow the official code load with the value they were trained with."""

from __future__ import annotations

import json

import pytest
import torch

import vpeft

from conftest import make_backbone, make_input


@pytest.mark.parametrize(("method", "option", "old_value"),
                         [("fact_tk", "layout", "paper"), ("prefix", "reparameterization", "per_layer")])  # fmt: skip
def test_adapter_saved_before_an_option_existed_keeps_its_old_behaviour(tmp_path, method, option, old_value) -> None:
    trained = vpeft.apply(make_backbone("vit"), method, **{option: old_value})
    with torch.no_grad():
        for p in vpeft.trainable_parameters(trained).values():
            p.add_(torch.randn_like(p) * 0.1)  # a trained, non-identity adapter
    vpeft.save_adapter(trained, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["options"][option]  # as written by a vpeft that predates the option
    config_path.write_text(json.dumps(config))
    loaded = vpeft.load_adapter(make_backbone("vit"), tmp_path)
    assert getattr(vpeft.get_state(loaded).config, option) == old_value
    x = make_input()
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=1e-6)
