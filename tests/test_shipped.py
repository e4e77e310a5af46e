"""Shipped weights: bfloat16 round trip with fingerprint and card; damaged files refused; load_params uses them."""

import json

import jax
import numpy as np
import pytest

from comb_jax.model.layout import init_params, model_layout
from comb_jax.weights import shipped


def test_ship_and_load_round_trip_in_bfloat16(tmp_path, tiny_cfg):
    comb = jax.tree.map(np.asarray, init_params(model_layout(tiny_cfg.model), jax.random.key(0))["comb"])
    out = shipped.save_shipped(comb, tiny_cfg, tmp_path / "tiny_comb", command="python train.py --config tiny_comb",
                               backbone_fingerprint="b" * 64, metrics={"needle_contain": 0.5})
    card = json.loads((out / "card.json").read_text())
    assert card["fingerprint"] == shipped.file_sha256(out / "comb.safetensors")
    assert "python train.py --config tiny_comb" in (out / "README.md").read_text()
    back = shipped.load_shipped(tiny_cfg, out)
    as_bf16 = jax.tree.map(lambda a: np.asarray(a.astype(jax.numpy.bfloat16).astype(np.float32)), comb)
    jax.tree.map(np.testing.assert_array_equal, back, as_bf16)
    # a damaged file is refused, naming the problem
    data = bytearray((out / "comb.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "comb.safetensors").write_bytes(bytes(data))
    with pytest.raises(shipped.ShippedModelError, match="damaged or was replaced"):
        shipped.load_shipped(tiny_cfg, out)


def test_load_params_prefers_the_shipped_model_unless_told_none(tmp_path, tiny_cfg, monkeypatch):
    from comb_jax.weights.resolve import load_model

    comb = jax.tree.map(lambda a: np.asarray(a) + 1.0,
                        init_params(model_layout(tiny_cfg.model), jax.random.key(0))["comb"])
    shipped.save_shipped(comb, tiny_cfg, tmp_path / tiny_cfg.name, command="x", backbone_fingerprint="")
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", tmp_path)
    got = load_model(tiny_cfg, None)[1]["comb"]
    np.testing.assert_allclose(np.asarray(got["cross"]["gate_attn"]), 1.0)
    fresh = load_model(tiny_cfg, "none")[1]["comb"]
    np.testing.assert_array_equal(np.asarray(fresh["cross"]["gate_attn"]), 0.0)
