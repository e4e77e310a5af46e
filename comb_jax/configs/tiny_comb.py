"""Random weights, 4 decoder layers, 2 cross blocks: the test and smoke-run config."""

from comb_jax.config import Config, ModelConfig, ServeConfig, TrainConfig, WeightsConfig


def config() -> Config:
    return Config(
        name="tiny_comb",
        model=ModelConfig(
            vocab_size=256, hidden=64, mlp_hidden=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
            rope_theta=10000.0, tie_embeddings=True, max_position=2048, num_cross_layers=2,
        ),
        weights=WeightsConfig(source="random", seed=0),
        train=TrainConfig(
            learning_rate=3e-3, warmup_steps=10, batch_size=8, steps=50, max_chunk_tokens=64, max_decoder_tokens=64,
            chunk_buckets=(16, 32, 64), decoder_buckets=(16, 32, 64), eval_every=25, eval_examples=8,
            checkpoint_every=25, run_dir="runs/tiny_comb",
        ),
        serve=ServeConfig(
            page_tokens=16, pool_tokens=1024, max_chunk_tokens=64, max_context_tokens=256, max_batch=4,
            max_new_tokens=16, prompt_buckets=(16, 32, 64), chunk_buckets=(16, 32, 64), context_buckets=(64, 256),
        ),
    )
