"""Export and import faults and release compatibility: no directory overwritten unasked or half-written, a
`save_pretrained`-style release directory (tied, no lm_head, its own encoder embedding, whole-context encoding)
imports and round-trips, and what the release's code cannot load is refused clearly."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from torch_comb import TorchComb

from comb_jax.cli import export as export_cli
from comb_jax.errors import run
from comb_jax.model.layout import flatten_names, init_params, model_layout
from comb_jax.model.transformer import concat_picaches, encode, forward, lm_logits
from comb_jax.weights import release as E
from comb_jax.weights.hf import tensors_from_tree
from comb_jax.weights.release import comb_config_dict, export_comb, import_comb
from comb_jax.weights.resolve import load_model


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_export_refuses_a_non_empty_directory_and_never_leaves_it_half_written(tiny_cfg, tiny_params, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "comb"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty; pass --overwrite"):
        export_comb(tiny_cfg.model, tiny_params, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    # a failure half way (after one shard): the old directory is untouched and no temporary directory is left
    real = E.write_safetensors

    def fail_after_writing(plan, where, dtype, max_bytes):
        real(plan[:3], where, dtype, max_bytes)
        raise OSError("disk full")

    monkeypatch.setattr(E, "write_safetensors", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        export_comb(tiny_cfg.model, tiny_params, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and _leftovers(tmp_path) == []
    monkeypatch.setattr(E, "write_safetensors", real)

    export_comb(tiny_cfg.model, tiny_params, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _leftovers(tmp_path) == []

    # the CLI says so in one line, before loading any weights
    def never(*args):
        raise AssertionError("weights must not load")

    monkeypatch.setattr("comb_jax.cli.export.load_model", never)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(export_cli.main, "python -m comb_jax.export", ["--config", "tiny_comb", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "is not empty; pass --overwrite" in err


def test_export_with_a_head_dim_the_release_cannot_derive_fails_clearly(tiny_cfg, tmp_path, capsys):
    model = dataclasses.replace(tiny_cfg.model, head_dim=32)  # hidden 64 / 4 heads = 16
    params = init_params(model_layout(model), jax.random.key(0))
    with pytest.raises(ValueError, match=r"head_dim=32 != hidden_size / num_heads = 64 / 4"):
        export_comb(model, params, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_info:
        run(export_cli.main, "python -m comb_jax.export", ["--config", "tiny_comb", "--out", str(tmp_path / "y"),
                                                  "head_dim=32"])
    assert exit_info.value.code == 2 and "head_dim=32" in capsys.readouterr().err


def release_params(model, tiny_params):
    """tiny_params plus an encoder embedding of its own (the release keeps chunk_model.embed_tokens apart)."""
    params = jax.tree.map(np.asarray, tiny_params)
    params["backbone"] = dict(params["backbone"])
    params["backbone"]["encoder_embed"] = np.asarray(
        0.02 * jax.random.normal(jax.random.key(9), params["backbone"]["embed"].shape), np.float32)
    return params


def write_like_save_pretrained(model, params, directory, shards: int = 2):
    """The release's layout as `save_pretrained` writes it: tied head left out, sharded safetensors with an index,
    and a config.json with only the release's fields."""
    directory.mkdir()
    tensors = tensors_from_tree(model, params, comb=True)
    assert "language_model.lm_head.weight" not in tensors and "chunk_model.embed_tokens.weight" in tensors
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, file in enumerate(files):
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.nbytes for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = comb_config_dict(model)
    for ours in ("context_encoding", "context_bos", "separate_encoder_embed", "comb_jax_config",
                 "num_self_attention_layers", "num_cross_attention_layers"):
        config.pop(ours)
    config.update(transformers_version="4.57.3", torch_dtype="float32")
    (directory / "config.json").write_text(json.dumps(config))


def jax_logits(model, params, tokens, chunks):
    caches = [encode(params, jnp.asarray([c]), jnp.ones((1, len(c)), bool), model) for c in chunks]
    hidden, _ = forward(params, jnp.asarray([tokens]), model, concat_picaches(caches) if caches else None)
    return np.asarray(lm_logits(params, hidden))[0]


def test_release_layout_imports_and_round_trips(tiny_cfg, tiny_params, tmp_path):
    model = dataclasses.replace(tiny_cfg.model, separate_encoder_embed=True)
    params = release_params(model, tiny_params)
    release = tmp_path / "release"
    write_like_save_pretrained(model, params, release)

    cfg, back = import_comb(release)
    assert cfg.tie_embeddings and cfg.separate_encoder_embed  # no lm_head.weight; its own encoder embedding
    assert (cfg.context_encoding, cfg.context_bos) == ("whole_context", True)  # the release's context encoding
    assert cfg == dataclasses.replace(model, context_encoding="whole_context", context_bos=True)
    want = flatten_names(params)
    assert sorted(flatten_names(back)) == sorted(want)
    for name, leaf in flatten_names(back).items():
        assert np.array_equal(leaf, want[name]), name

    # the encoder reads its own embedding: the same logits as the independent PyTorch Comb reading the files
    rng = np.random.default_rng(0)
    tokens, chunks = rng.integers(0, 256, 10), [rng.integers(0, 256, 7), rng.integers(0, 256, 5)]
    got = jax_logits(cfg, back, tokens, chunks)
    np.testing.assert_allclose(got, TorchComb(release).logits(tokens, chunks).numpy(), atol=1e-4)
    shared = dict(back, backbone={k: v for k, v in back["backbone"].items() if k != "encoder_embed"})
    assert np.abs(got - jax_logits(tiny_cfg.model, shared, tokens, chunks)).max() > 1e-3

    # export and import again: bit-exact, and the context encoding travels in config.json
    again = tmp_path / "again"
    export_comb(cfg, back, again)
    config = json.loads((again / "config.json").read_text())
    assert config["use_cache"] is True and config["text_config"]["use_cache"] is True
    assert (config["context_encoding"], config["context_bos"], config["separate_encoder_embed"]) == (
        "whole_context", True, True)
    cfg2, back2 = import_comb(again)
    assert cfg2 == cfg
    for name, leaf in flatten_names(back2).items():
        assert np.array_equal(leaf, want[name]), name

    # serve.py --checkpoint DIR takes the model config from the directory
    served_cfg, served = load_model(tiny_cfg, str(again))
    assert served_cfg.model == cfg and served_cfg.weights == tiny_cfg.weights  # no tokenizer files: the config's
    assert np.array_equal(served["backbone"]["encoder_embed"], params["backbone"]["encoder_embed"])


def test_our_exports_keep_per_chunk_encoding(tiny_cfg, tiny_params, tmp_path):
    export_comb(tiny_cfg.model, tiny_params, tmp_path / "ours")
    cfg, _ = import_comb(tmp_path / "ours")
    assert (cfg.context_encoding, cfg.context_bos, cfg.separate_encoder_embed) == ("per_chunk", False, False)


def test_tokenizer_is_saved_for_transformers_4(smol_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from comb_jax.text.tokenizer import chat_prompt_ids

    E.save_tokenizer(smol_tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in config
    assert config["chat_template"] == smol_tokenizer.chat_template
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    question = "Why is the sky blue?"
    assert chat_prompt_ids(loaded, question) == chat_prompt_ids(smol_tokenizer, question)


@pytest.mark.skipif(not os.environ.get("COMB_JAX_TRANSFORMERS4"),
                    reason="set COMB_JAX_TRANSFORMERS4 to a directory holding transformers 4.x (pip install --target)")
def test_tokenizer_loads_in_transformers_4(smol_tokenizer, tmp_path):
    """The release's stack: `pip install --target DIR --no-deps transformers==4.57.3 tokenizers==0.22.1
    huggingface-hub==0.36.0`, then COMB_JAX_TRANSFORMERS4=DIR."""
    from comb_jax.text.tokenizer import chat_prompt_ids

    E.save_tokenizer(smol_tokenizer, tmp_path)
    script = ("import json, sys, transformers; from transformers import AutoTokenizer; "
              "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
              "text = t.apply_chat_template([{'role': 'user', 'content': 'Why is the sky blue?'}], "
              "add_generation_prompt=True, tokenize=False); "
              "print(json.dumps([transformers.__version__, t(text, add_special_tokens=False)['input_ids']]))")
    env = dict(os.environ, PYTHONPATH=os.environ["COMB_JAX_TRANSFORMERS4"])
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120)
    version, ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert version.startswith("4.") and ids == chat_prompt_ids(smol_tokenizer, "Why is the sky blue?")
