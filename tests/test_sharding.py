"""Sharding rules: specs follow logical axes, non-dividing axes replicate, a sharded forward equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from comb_jax.config import MeshConfig
from comb_jax.model.layout import model_layout
from comb_jax.model.sharding import make_mesh, param_shardings, partition_spec
from comb_jax.model.transformer import encode, forward, lm_logits


def test_mesh_shapes():
    assert dict(make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]).shape) == {
        "data": 1, "fsdp": 1, "tensor": 1}


def test_partition_specs_follow_rules():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert partition_spec((4, 64, 4, 16), ("layers", "embed", "heads", "head_dim"), mesh) == P(None, "fsdp", "tensor")
    # 3 KV heads do not divide a 2-way tensor axis: replicated, not an error
    assert partition_spec((4, 64, 3, 16), ("layers", "embed", "kv_heads", "head_dim"), mesh) == P(None, "fsdp")
    assert partition_spec((8, 10), ("batch", "seq"), mesh) == P(("data", "fsdp"))


def test_sharded_forward_matches_single_device(tiny_cfg, tiny_params):
    cfg = tiny_cfg.model
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(tiny_params, param_shardings(model_layout(cfg), mesh))
    assert sharded["backbone"]["layers"]["wq"].sharding.spec == P(None, "fsdp", "tensor")
    rng = np.random.default_rng(0)
    tokens, chunk = jnp.asarray(rng.integers(0, 256, (4, 8))), jnp.asarray(rng.integers(0, 256, (4, 6)))

    @jax.jit
    def run(params):
        picache = encode(params, chunk, jnp.ones(chunk.shape, bool), cfg)
        return lm_logits(params, forward(params, tokens, cfg, picache)[0])

    np.testing.assert_allclose(np.asarray(run(sharded)), np.asarray(run(tiny_params)), atol=1e-5, rtol=0)
