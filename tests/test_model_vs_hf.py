"""Decoder logits against Hugging Face LlamaForCausalLM in float32, on tiny random configs."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from comb_jax.model.transformer import forward, lm_logits
from comb_jax.weights.hf import model_config_from_hf, tree_from_tensors

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
CASES = {
    "gqa_tied_default": dict(num_key_value_heads=2, tie_word_embeddings=True, rope=None),
    "mha_untied_default": dict(num_key_value_heads=4, tie_word_embeddings=False, rope=None),
    "gqa_untied_llama3": dict(num_key_value_heads=1, tie_word_embeddings=False, rope=LLAMA3_ROPE),
    "mha_tied_llama3": dict(num_key_value_heads=4, tie_word_embeddings=True, rope=LLAMA3_ROPE),
}


def hf_model(case):
    torch.manual_seed(0)
    rope = case["rope"] or {"rope_type": "default", "rope_theta": 10000.0}
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=case["num_key_value_heads"], head_dim=16,
                         max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=rope,
                         tie_word_embeddings=case["tie_word_embeddings"], attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm weight cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_decoder_logits_match_transformers(name):
    model = hf_model(CASES[name])
    cfg = model_config_from_hf(model.config.to_dict(), num_cross_layers=2)
    assert (cfg.rope_scaling is not None) == (CASES[name]["rope"] is not None)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = tree_from_tensors(cfg, state.__getitem__, comb=False)
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 48))  # 48 > 32: crosses the llama3 bands
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    hidden, _ = forward(params, jnp.asarray(tokens), cfg)
    got = np.asarray(lm_logits(params, hidden))
    diff = np.abs(got - want).max()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_context_path_adds_projected_backbone_states_of_the_chunk():
    """`context_layer=m`: each PICache key and value gets a projection of transformers' hidden_states[m] of the chunk
    alone (positions 0..L-1, causal) on top of the encoder's; a padded chunk gives the same PICache for its tokens."""
    import dataclasses

    import jax

    from comb_jax.model.layout import init_params, model_layout
    from comb_jax.model.transformer import encode

    model = hf_model(CASES["gqa_tied_default"])
    plain = model_config_from_hf(model.config.to_dict(), num_cross_layers=2)
    cfg = dataclasses.replace(plain, context_layer=2)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    comb = init_params(model_layout(cfg), jax.random.key(0), std=0.1)["comb"]  # context projections nonzero
    comb["encoder"] = dict(comb["encoder"], context_k_proj=comb["encoder"]["k_proj"] + 0.05,
                           context_v_proj=comb["encoder"]["v_proj"] - 0.05)
    params = dict(tree_from_tensors(cfg, state.__getitem__, comb=False), comb=comb)
    tokens = np.random.default_rng(1).integers(0, 128, size=(1, 12))
    with torch.no_grad():
        states = model(torch.tensor(tokens), output_hidden_states=True).hidden_states[2].numpy()
    alone = encode(params, jnp.asarray(tokens), jnp.ones((1, 12), bool), plain)  # the encoder's part
    got = encode(params, jnp.asarray(tokens), jnp.ones((1, 12), bool), cfg)
    for name, proj in (("k", "context_k_proj"), ("v", "context_v_proj")):
        added = np.einsum("ble,nekd->nblkd", states, np.asarray(comb["encoder"][proj]))
        want = np.asarray(getattr(alone, name)) + added
        assert np.abs(np.asarray(getattr(got, name)) - want).max() <= 1e-4, name
    padded = encode(params, jnp.pad(jnp.asarray(tokens), ((0, 0), (0, 4))), jnp.arange(16)[None] < 12, cfg)
    np.testing.assert_allclose(np.asarray(padded.k[:, :, :12]), np.asarray(got.k), atol=1e-5)
