"""Export to the Hugging Face layout, checked against an independent PyTorch Comb and transformers' Llama."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch_comb import TorchComb

from comb_jax.cli.export import main
from comb_jax.config import RopeScaling
from comb_jax.model.layout import flatten_names, init_params, model_layout
from comb_jax.model.transformer import concat_picaches, encode, forward, lm_logits
from comb_jax.weights.release import export_comb, export_llama, import_comb, import_llama, parse_size
from comb_jax.weights.resolve import load_backbone

PROMPT_LEN = 12
# per batch row, the lengths of its chunks: two chunks, one short chunk (padded in JAX), no chunk at all
CHUNK_LENGTHS = [(7, 10), (5,), ()]


def variant_cfg(cfg):
    """Untied head, Llama-3 RoPE scaling with a short original context (so the prompt crosses its bands), MQA."""
    return dataclasses.replace(cfg.model, tie_embeddings=False, num_kv_heads=1, rope_theta=500000.0,
                               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8))


def variant_params(model_cfg):
    """Every norm perturbed and a distinct gate per layer, so a swapped norm, gate or layer cannot pass."""
    params = init_params(model_layout(model_cfg), jax.random.key(7))
    rng = np.random.default_rng(0)

    def perturb(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "norm" in name:
            return x + jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)
        if "gate_attn" in name or "gate_mlp" in name:
            return x + jnp.asarray(rng.uniform(-1.0, 1.0, x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(perturb, params)


@pytest.fixture(scope="module")
def cases(tiny_cfg, tiny_params):
    model_cfg = variant_cfg(tiny_cfg)
    return {"tiny": (tiny_cfg.model, tiny_params), "untied_llama3_mqa": (model_cfg, variant_params(model_cfg))}


@pytest.fixture(scope="module")
def exported(cases, tmp_path_factory):
    """Each case exported once in float32: name -> directory."""
    dirs = {}
    for name, (model_cfg, params) in cases.items():
        dirs[name] = tmp_path_factory.mktemp(f"export_{name}")
        export_comb(model_cfg, params, dirs[name])
    return dirs


def jax_logits(model_cfg, params, tokens, chunks_per_row):
    """Logits [B, T, V]: chunk slot j of every row encoded together (right-padded, masked), slots concatenated."""
    picache = None
    slots = max(len(c) for c in chunks_per_row)
    if slots:
        caches = []
        width = max(len(chunk) for chunks in chunks_per_row for chunk in chunks)  # one width: one compile
        for j in range(slots):
            ids = np.zeros((len(chunks_per_row), width), np.int32)
            mask = np.zeros((len(chunks_per_row), width), bool)
            for b, chunks in enumerate(chunks_per_row):
                if len(chunks) > j:
                    ids[b, : len(chunks[j])] = chunks[j]
                    mask[b, : len(chunks[j])] = True
            caches.append(encode(params, jnp.asarray(ids), jnp.asarray(mask), model_cfg))
        picache = concat_picaches(caches)
    hidden, _ = forward(params, jnp.asarray(tokens), model_cfg, picache=picache)
    return np.asarray(lm_logits(params, hidden))


@pytest.mark.parametrize("case", ["tiny", "untied_llama3_mqa"])
@pytest.mark.parametrize("with_chunks", [False, True], ids=["no_chunks", "chunks"])
def test_torch_comb_matches_jax(cases, exported, case, with_chunks):
    model_cfg, params = cases[case]
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, model_cfg.vocab_size, size=(len(CHUNK_LENGTHS), PROMPT_LEN))
    chunks = [[rng.integers(0, model_cfg.vocab_size, size=n) for n in lengths] if with_chunks else []
              for lengths in CHUNK_LENGTHS]
    assert np.abs(np.asarray(params["comb"]["cross"]["gate_attn"])).min() > 0.1  # the cross blocks really act
    want = jax_logits(model_cfg, params, tokens, chunks)
    reference = TorchComb(exported[case])
    got = np.stack([reference.logits(tokens[b], chunks[b]).numpy() for b in range(len(tokens))])
    diff = np.abs(got - want).max()
    print(f"{case} chunks={with_chunks}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    if with_chunks:  # the chunks changed the answer, so the comparison above covered the cross blocks
        assert np.abs(want[0] - reference.logits(tokens[0]).numpy()).max() > 1e-3


def test_comb_config_json(tiny_cfg, exported):
    config = json.loads((exported["tiny"] / "config.json").read_text())
    n, e = tiny_cfg.model.num_layers, tiny_cfg.model.num_cross_layers
    assert config["model_type"] == "combllama"
    assert config["cross_attention_layers"] == [1, 3]  # stride 4 / 2 = 2: c_k = (k + 1) * 2 - 1
    assert config["num_hidden_layers"] == config["text_config"]["num_hidden_layers"] == n + e
    assert (config["num_self_attention_layers"], config["num_cross_attention_layers"]) == (n, e)
    assert config["text_config"]["hidden_size"] == tiny_cfg.model.hidden


@pytest.mark.parametrize("case", ["tiny", "untied_llama3_mqa"])
def test_export_import_round_trip_is_exact(cases, exported, case):
    model_cfg, params = cases[case]
    cfg, back = import_comb(exported[case])
    assert cfg == model_cfg
    want, got = flatten_names(params), flatten_names(back)
    assert sorted(want) == sorted(got)
    for name in want:
        assert got[name].dtype == np.float32 and np.array_equal(got[name], np.asarray(want[name])), name


def test_tied_export_writes_embedding_under_three_names(tiny_params, exported):
    tensors = load_file(str(exported["tiny"] / "model.safetensors"))
    embed = np.asarray(tiny_params["backbone"]["embed"])
    for name in ("language_model.model.embed_tokens.weight", "chunk_model.embed_tokens.weight",
                 "language_model.lm_head.weight"):
        assert np.array_equal(tensors[name], embed), name
    assert tensors["language_model.model.cross_layers.1.cross_attn_attn_gate"].shape == (1,)
    assert tensors["chunk_model.k_proj.0.weight"].shape == (2 * 16, 64)  # [kv_heads * head_dim, hidden]


@pytest.mark.parametrize("case", ["tiny", "untied_llama3_mqa"])
def test_decoder_only_export_loads_in_transformers(cases, case, tmp_path):
    from transformers import LlamaForCausalLM

    model_cfg, params = cases[case]
    export_llama(model_cfg, params, tmp_path)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(4).integers(0, model_cfg.vocab_size, size=(2, 20))
    with torch.no_grad():
        got = model(torch.tensor(tokens)).logits.numpy()
    hidden, _ = forward(params, jnp.asarray(tokens), model_cfg)
    diff = np.abs(got - np.asarray(lm_logits(params, hidden))).max()
    print(f"{case} decoder-only vs transformers: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    cfg, back = import_llama(tmp_path, num_cross_layers=model_cfg.num_cross_layers)
    assert cfg == model_cfg
    for name, leaf in flatten_names(params["backbone"]).items():
        assert np.array_equal(flatten_names(back["backbone"])[name], np.asarray(leaf)), name


def test_bfloat16_export_round_trips_within_rounding(tiny_cfg, tiny_params, tmp_path):
    export_comb(tiny_cfg.model, tiny_params, tmp_path, dtype="bfloat16")
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        assert f.get_tensor("language_model.model.layers.0.self_attn.q_proj.weight").dtype == jnp.bfloat16
    _, back = import_comb(tmp_path)
    got = flatten_names(back)
    for name, leaf in flatten_names(tiny_params).items():
        x = np.asarray(leaf, np.float32)
        assert np.array_equal(got[name], x.astype(jnp.bfloat16).astype(np.float32)), name  # exactly bf16(x)
        assert np.all(np.abs(got[name] - x) <= 2.0**-8 * np.abs(x)), name  # bf16 keeps 8 significant bits


def test_sharded_export_writes_index_and_round_trips(tiny_cfg, tiny_params, tmp_path):
    limit = parse_size("40KB")
    files = export_comb(tiny_cfg.model, tiny_params, tmp_path, max_shard_size="40KB")
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    total = 0
    for f in files:
        shard = load_file(str(tmp_path / f))
        size = sum(t.nbytes for t in shard.values())
        assert size <= limit or len(shard) == 1, f  # only a single oversized tensor may exceed the limit
        assert all(index["weight_map"][name] == f for name in shard)
        total += size
    assert index["metadata"]["total_size"] == total
    _, back = import_comb(tmp_path)
    got = flatten_names(back)
    for name, leaf in flatten_names(tiny_params).items():
        assert np.array_equal(got[name], np.asarray(leaf)), name
    # a later unsharded export replacing the same directory leaves no stale shards
    export_comb(tiny_cfg.model, tiny_params, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_import_names_a_missing_tensor(tiny_cfg, tiny_params, tmp_path):
    export_comb(tiny_cfg.model, tiny_params, tmp_path)
    name = "language_model.model.cross_layers.1.cross_attn.k_norm.weight"
    _rewrite(tmp_path, lambda t: t.pop(name))
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        import_comb(tmp_path)


def test_import_names_a_shape_mismatch(tiny_cfg, tiny_params, tmp_path):
    export_comb(tiny_cfg.model, tiny_params, tmp_path)
    name = "chunk_model.k_proj.0.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, np.zeros((31, 64), np.float32)))
    with pytest.raises(ValueError, match=rf"{name.replace('.', r'[.]')} has shape \(31, 64\), expected \(32, 64\)"):
        import_comb(tmp_path)


def test_import_rejects_a_tied_head_that_differs(tiny_cfg, tiny_params, tmp_path):
    export_comb(tiny_cfg.model, tiny_params, tmp_path)
    name = "language_model.lm_head.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, t[name] + 1))
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*ties them"):
        import_comb(tmp_path)


def test_cli_exports_loaded_weights(tiny_cfg, tmp_path, caplog):
    out = tmp_path / "comb"
    summary = main(["--config", "tiny_comb", "--out", str(out), "--max-shard-size", "100KB", "weights.seed=5"])
    assert "freshly initialised" in caplog.text
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(summary["files"]) > 1 and sorted(set(index["weight_map"].values())) == summary["files"]
    cfg, params = import_comb(out)
    assert cfg == tiny_cfg.model
    backbone = load_backbone(dataclasses.replace(tiny_cfg, weights=dataclasses.replace(tiny_cfg.weights, seed=5)))
    for name, leaf in flatten_names(backbone).items():
        assert np.array_equal(flatten_names(params["backbone"])[name], np.asarray(leaf)), name
    assert not np.any(params["comb"]["cross"]["gate_attn"]) and not np.any(params["comb"]["cross"]["gate_mlp"])
    with pytest.raises(SystemExit):
        main(["--config", "tiny_comb", "--out", str(out), "--dtype", "float16"])
    with pytest.raises(ValueError, match="cannot parse size"):
        main(["--config", "tiny_comb", "--out", str(out), "--max-shard-size", "lots"])


def test_cli_exports_an_orbax_checkpoint(tiny_cfg, tiny_params, tmp_path):
    """A checkpoint written the way train.py writes it: the export carries its comb params bit for bit."""
    from comb_jax.training import checkpoint

    comb = jax.tree.map(np.asarray, tiny_params["comb"])
    manager = checkpoint.make_manager(checkpoint.checkpoint_root(tmp_path / "run"), keep=2)
    checkpoint.save(manager, 3, comb, {"count": np.zeros((), np.int32)}, {}, tiny_cfg)
    manager.wait_until_finished()
    manager.close()
    out = tmp_path / "comb"
    main(["--config", "tiny_comb", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--dtype", "float32"])
    _, params = import_comb(out)
    for name, leaf in flatten_names(comb).items():
        assert np.array_equal(flatten_names(params["comb"])[name], leaf), name
    backbone = load_backbone(tiny_cfg)
    for name, leaf in flatten_names(backbone).items():
        assert np.array_equal(flatten_names(params["backbone"])[name], np.asarray(leaf)), name


def test_export_refuses_a_model_with_a_context_path(tiny_cfg, tiny_params, tmp_path):
    """The release's chunk model has no context path: a model with context_layer > 0 is refused by name, before
    anything is written."""
    cfg = dataclasses.replace(tiny_cfg.model, context_layer=1)
    with pytest.raises(ValueError, match="context_layer"):
        export_comb(cfg, tiny_params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
