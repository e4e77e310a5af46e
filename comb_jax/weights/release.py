"""Comb and Llama directories in the Hugging Face layout of the Comb release: export (write) and import (read).

    python -m comb_jax.export --config smollm2_comb --checkpoint runs/smollm2_comb/checkpoints --out export/comb
    python -m comb_jax.export --config smollm2_comb --decoder-only --out export/smollm2

A Comb directory holds `config.json` (model_type "combllama", the Llama config under `text_config`,
`cross_attention_layers` = c_k, `num_hidden_layers` = N + E like the release, plus `num_self_attention_layers` = N
and `num_cross_attention_layers` = E so nobody has to subtract), the tokenizer files when the config has a
tokenizer, and safetensors under the names of `weights.hf_names` (spec section 5), sharded with
`model.safetensors.index.json` above `--max-shard-size`.

Two names carry copies of the embedding, because the release's modules own them separately:
`chunk_model.embed_tokens.weight` (the encoder's frozen embedding; in JAX the encoder reads the backbone's unless
the model has its own `encoder_embed`) and, for tied models, `language_model.lm_head.weight` (the release's loader
expects a head under that name). Import accepts a tied directory without `lm_head.weight` (as `save_pretrained`
writes it) and an encoder embedding that differs from the decoder's, which it keeps as `backbone["encoder_embed"]`.

For the release's PyTorch code (transformers 4.x) config.json carries a top-level `use_cache`, the tokenizer is
named `PreTrainedTokenizerFast`, and head_dim must equal hidden / heads (the release derives it). How the model
reads its context (`context_encoding`, `context_bos`) is recorded in config.json and read back; a config.json
without them is the release's own: the whole context as one chunk, starting with BOS.

The output directory must be empty or new (`--overwrite` replaces it): everything is written to a temporary
directory beside it and renamed into place at the end, so a failed export leaves the old directory as it was.

`--decoder-only` writes a plain `LlamaForCausalLM` directory (plain HF names, no head tensor when tied, as
transformers saves it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from comb_jax.config import ModelConfig
from comb_jax.model.layout import check_shapes, model_layout
from comb_jax.weights.hf import SafetensorsDir, hf_names, model_config_from_hf, to_torch_layout, tree_from_tensors

log = logging.getLogger("comb_jax.weights.release")

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jax.numpy.bfloat16)}
COMB_PREFIX = "language_model."
INDEX_FILE = "model.safetensors.index.json"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 (KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2, like transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 2GB, 500MB, 64KiB or a number of bytes")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


# ----------------------------------------------------------------------------------------------------------
# config.json


def llama_config_dict(cfg: ModelConfig, tokenizer=None) -> dict:
    """Hugging Face LlamaConfig fields for the backbone (legacy rope_theta / rope_scaling: read by 4.x and 5.x)."""
    sc = cfg.rope_scaling
    out = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if sc is None else {
            "rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
            "high_freq_factor": sc.high_freq_factor, "original_max_position_embeddings": sc.original_max_position,
        },
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position,
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": True,
    }
    if tokenizer is not None:
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, field, None) is not None:
                out[field] = getattr(tokenizer, field)
    return out


def comb_config_dict(cfg: ModelConfig, tokenizer=None, name: str = "") -> dict:
    """The release's CombLlamaConfig fields, with the layer counts spelled out."""
    n, e = cfg.num_layers, cfg.num_cross_layers
    text = llama_config_dict(cfg, tokenizer)
    text["num_hidden_layers"] = n + e  # the release binds text_config.num_hidden_layers to N + E
    return {
        "model_type": "combllama",
        "architectures": ["CombLlamaForConditionalGeneration"],
        "text_config": text,
        "cross_attention_layers": list(cfg.cross_layers),
        "num_hidden_layers": n + e,
        "num_self_attention_layers": n,
        "num_cross_attention_layers": e,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": text.get("pad_token_id"),
        "use_cache": True,  # read at the top level by the release's generate() under transformers 4.x
        "context_encoding": cfg.context_encoding,
        "context_bos": cfg.context_bos,
        "separate_encoder_embed": cfg.separate_encoder_embed,
        "comb_jax_config": name,
    }


def check_release_compatible(cfg: ModelConfig):
    """Refuse what the release's CombLlama cannot load: it derives head_dim = hidden_size / num_attention_heads, and
    its chunk model reads token embeddings."""
    if cfg.context_layer:
        raise ValueError(f"cannot export a Comb model whose PICaches read the backbone's layer-{cfg.context_layer} "
                         "states (context_layer > 0): the release's chunk model has no such path, so it would compute "
                         "other PICaches; serve it with comb-jax, or export a model with context_layer=0")
    if cfg.head_dim * cfg.num_heads != cfg.hidden:
        raise ValueError(f"cannot export a Comb model with head_dim={cfg.head_dim} != hidden_size / num_heads = "
                         f"{cfg.hidden} / {cfg.num_heads}: the release's CombLlama derives head_dim from them, so it "
                         "would build the wrong shapes")


# ----------------------------------------------------------------------------------------------------------
# Tensors and safetensors files


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def torch_tensor_plan(cfg: ModelConfig, params, comb: bool):
    """[(HF name, number of elements, thunk -> PyTorch-layout array)] in export order.

    Lazy, so only one shard is materialised at a time (an 8B export does not need a second copy of the model).
    """
    prefix = COMB_PREFIX if comb else ""
    plan = []
    for path, name, n_in, index in hf_names(cfg, prefix, comb):
        leaf = _leaf(params, path)
        numel = leaf.size if index is None else leaf.size // leaf.shape[0]
        plan.append((name, numel, lambda leaf=leaf, n_in=n_in, index=index:
                     to_torch_layout(leaf if index is None else leaf[index], n_in)))
    embed = params["backbone"]["embed"]
    if comb:
        if not cfg.separate_encoder_embed:  # else hf_names lists the encoder's own embedding under this name
            plan.insert(1, ("chunk_model.embed_tokens.weight", embed.size, lambda: embed))
        if cfg.tie_embeddings:
            plan.append((f"{COMB_PREFIX}lm_head.weight", embed.size, lambda: embed))
    return plan


def write_safetensors(plan, out: Path, dtype: np.dtype, max_shard_bytes: int) -> list[str]:
    """Write the planned tensors as model.safetensors, or as shards plus an index above `max_shard_bytes`."""
    shards, current, current_bytes = [], [], 0
    for item in plan:
        nbytes = item[1] * dtype.itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += nbytes
    shards.append(current)

    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    with tqdm(total=len(plan), desc="export tensors", unit="tensor") as bar:
        for file, shard in zip(files, shards):
            tensors = {}
            for name, _, make in shard:
                tensors[name] = np.ascontiguousarray(np.asarray(make()).astype(dtype))
                weight_map[name] = file
                bar.update()
            save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(numel for _, numel, _ in plan) * dtype.itemsize
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    return files


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless `overwrite` (before any weights are loaded)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass --overwrite to replace it")


def save_tokenizer(tokenizer, out: Path) -> None:
    """The tokenizer files, loadable by transformers 4.x too: `PreTrainedTokenizerFast`, chat template inline."""
    tokenizer.save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    if config_file.is_file() and (out / "tokenizer.json").is_file():
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes TokenizersBackend, unknown to 4.x
        config.pop("backend", None)
        template = out / "chat_template.jinja"
        if "chat_template" not in config and template.is_file():
            config["chat_template"] = template.read_text()
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _export(cfg: ModelConfig, params, out_dir, config: dict, comb: bool, dtype: str, max_shard_size,
            tokenizer, overwrite: bool) -> list[str]:
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if comb:
        check_release_compatible(cfg)
    check_shapes(model_layout(cfg) if comb else {"backbone": model_layout(cfg)["backbone"]},
                 {k: params[k] for k in (("backbone", "comb") if comb else ("backbone",))}, "export params")
    out = Path(out_dir).absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        params = jax.tree.map(np.asarray, params)  # device -> host once, not once per layer slice
        config = dict(config, torch_dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        files = write_safetensors(torch_tensor_plan(cfg, params, comb), tmp, DTYPES[dtype],
                                  parse_size(max_shard_size))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        check_output_dir(out, overwrite)  # still true after the (long) write
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            try:
                tmp.rename(out)
            except BaseException:
                (old / out.name).rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def export_comb(cfg: ModelConfig, params, out_dir, dtype: str = "float32", max_shard_size="2GB", tokenizer=None,
                name: str = "", overwrite: bool = False) -> list[str]:
    """Write a Comb directory (config.json, safetensors, tokenizer) from {"backbone", "comb"} params.

    `out_dir` must be new or empty unless `overwrite`; it is replaced only once the whole export is written.
    """
    return _export(cfg, params, out_dir, comb_config_dict(cfg, tokenizer, name), True, dtype, max_shard_size,
                   tokenizer, overwrite)


def export_llama(cfg: ModelConfig, params, out_dir, dtype: str = "float32", max_shard_size="2GB",
                 tokenizer=None, overwrite: bool = False) -> list[str]:
    """Write a plain LlamaForCausalLM directory from params["backbone"] (same rules for `out_dir`)."""
    return _export(cfg, params, out_dir, llama_config_dict(cfg, tokenizer), False, dtype, max_shard_size, tokenizer,
                   overwrite)


# ----------------------------------------------------------------------------------------------------------
# Import


def _read_config(path: Path, model_type: str) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    config = json.loads(file.read_text())
    if config.get("model_type") != model_type:
        raise ValueError(f"{file}: model_type is {config.get('model_type')!r}, expected {model_type!r}")
    return config


def _read_params(cfg: ModelConfig, path: Path, comb: bool, dtype, reader=None):
    """Every expected tensor (missing -> KeyError, wrong shape -> ValueError, both naming it); no unknown ones."""
    reader = reader or SafetensorsDir(path)
    prefix = COMB_PREFIX if comb else ""
    params = tree_from_tensors(cfg, reader, dtype, comb=comb, decoder_prefix=prefix)
    embed_name = f"{prefix}model.embed_tokens.weight"
    copies = ["chunk_model.embed_tokens.weight"] if comb and not cfg.separate_encoder_embed else []
    head_name = f"{prefix}lm_head.weight"
    if cfg.tie_embeddings and head_name in reader:  # save_pretrained leaves a tied head out
        copies.append(head_name)
    for name in copies:
        if not np.array_equal(reader(name), reader(embed_name)):
            raise ValueError(f"tensor {name} in {path} differs from {embed_name}, but the model ties them")
    known = {n for _, n, _, _ in hf_names(cfg, prefix, comb)} | set(copies)
    unknown = sorted(set(reader.weight_map) - known)
    if unknown:
        raise ValueError(f"{path} holds {len(unknown)} tensors this config does not have, e.g. {unknown[:5]}")
    return params


# A config.json without these keys is the release's: the whole context encoded as one chunk that starts with BOS.
RELEASE_CONTEXT = {"context_encoding": "whole_context", "context_bos": True}
OURS_BEFORE_CONTEXT_FIELDS = {"context_encoding": "per_chunk", "context_bos": False}


def import_comb(path, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """A Comb directory (`export_comb`'s, or the release's as `save_pretrained` writes it) -> (ModelConfig,
    {"backbone", "comb"} numpy params). An encoder embedding that differs from the decoder's becomes
    `backbone["encoder_embed"]` (`separate_encoder_embed`); the context encoding comes from config.json."""
    path = Path(path)
    config = _read_config(path, "combllama")
    cross = list(config["cross_attention_layers"])
    text = dict(config["text_config"])
    n = config.get("num_self_attention_layers", text["num_hidden_layers"] - len(cross))
    if config.get("num_hidden_layers", n + len(cross)) != n + len(cross):
        raise ValueError(f"{path}/config.json: num_hidden_layers={config['num_hidden_layers']} but "
                         f"{n} self-attention + {len(cross)} cross layers")
    cfg = model_config_from_hf(dict(text, num_hidden_layers=n), len(cross))
    if list(cfg.cross_layers) != cross:
        raise ValueError(f"{path}/config.json: cross_attention_layers={cross}, but comb-jax places {len(cross)} "
                         f"cross blocks over {n} layers at {list(cfg.cross_layers)}")
    defaults = OURS_BEFORE_CONTEXT_FIELDS if "comb_jax_config" in config else RELEASE_CONTEXT
    encoding = config.get("context_encoding", defaults["context_encoding"])
    bos = config.get("context_bos", defaults["context_bos"])
    if encoding not in ("per_chunk", "whole_context") or not isinstance(bos, bool):
        raise ValueError(f"{path}/config.json: context_encoding={encoding!r} (per_chunk | whole_context) and "
                         f"context_bos={bos!r} (true | false)")
    reader = SafetensorsDir(path)
    separate = bool(config.get("separate_encoder_embed", False))
    encoder_embed, embed = "chunk_model.embed_tokens.weight", f"{COMB_PREFIX}model.embed_tokens.weight"
    if not separate and encoder_embed in reader and embed in reader:
        separate = not np.array_equal(reader(encoder_embed), reader(embed))
        if separate:
            log.info("%s: the encoder's embedding differs from the decoder's; keeping it as its own array", path)
    cfg = dataclasses.replace(cfg, context_encoding=encoding, context_bos=bos, separate_encoder_embed=separate)
    return cfg, _read_params(cfg, path, True, dtype, reader)


def import_llama(path, dtype=np.float32, num_cross_layers: int = 1) -> tuple[ModelConfig, dict]:
    """A plain LlamaForCausalLM directory -> (ModelConfig, {"backbone"} numpy params)."""
    path = Path(path)
    cfg = model_config_from_hf(_read_config(path, "llama"), num_cross_layers)
    return cfg, _read_params(cfg, path, False, dtype)
