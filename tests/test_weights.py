"""Weight loading: HF directories (single and sharded), GGUF un-permutation, errors that name the problem."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from comb_jax.config import load_config
from comb_jax.weights.gguf import unpermute_qk
from comb_jax.weights.hf import SafetensorsDir, load_hf_backbone, tensors_from_tree, tree_from_tensors


def _write_hf_dir(path, cfg, backbone, shards=1):
    tensors = tensors_from_tree(cfg, {"backbone": backbone}, comb=False, decoder_prefix="")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / file))
        weight_map.update({n: file for n in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.mlp_hidden,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_eps,
          "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings}
    (path / "config.json").write_text(json.dumps(hf))
    return tensors


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_directory_round_trip(tmp_path, tiny_cfg, tiny_params, shards):
    backbone = {k: np.asarray(v) for k, v in tiny_params["backbone"].items() if k != "layers"}
    backbone["layers"] = {k: np.asarray(v) for k, v in tiny_params["backbone"]["layers"].items()}
    _write_hf_dir(tmp_path, tiny_cfg.model, backbone, shards)
    loaded = load_hf_backbone(str(tmp_path), tiny_cfg.model)
    np.testing.assert_array_equal(loaded["embed"], backbone["embed"])
    for key, value in backbone["layers"].items():
        np.testing.assert_array_equal(loaded["layers"][key], value)


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path, tiny_cfg, tiny_params):
    tensors = _write_hf_dir(tmp_path, tiny_cfg.model, tiny_params["backbone"])
    reader = SafetensorsDir(tmp_path)
    broken = dict(tensors)
    del broken["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        tree_from_tensors(tiny_cfg.model, lambda n: broken[n] if n in broken else reader(n + ".gone"), comb=False)
    broken = dict(tensors)
    broken["model.layers.1.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight has shape \(3, 3\)"):
        tree_from_tensors(tiny_cfg.model, broken.__getitem__, comb=False)


def test_missing_files_are_named(tmp_path, tiny_cfg):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_hf_backbone(str(tmp_path), tiny_cfg.model)
    with pytest.raises(FileNotFoundError, match="needs a Hugging Face Llama directory: pass weights.path"):
        from comb_jax.weights.resolve import load_backbone

        load_backbone(load_config("llama8b_comb"))


def test_config_shape_mismatch_is_named(tmp_path, tiny_cfg, tiny_params):
    _write_hf_dir(tmp_path, tiny_cfg.model, tiny_params["backbone"])
    other = load_config("tiny_comb", ["model.hidden=32"]).model
    with pytest.raises(ValueError, match="hidden=64 but the config says 32"):
        load_hf_backbone(str(tmp_path), other)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    n_head, head_dim, hidden = 3, 8, 5
    w = rng.normal(size=(n_head * head_dim, hidden)).astype(np.float32)
    # llama.cpp's convert script: reshape(n_head, 2, d/2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
