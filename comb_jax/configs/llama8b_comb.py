"""Llama-3.1-8B-Instruct shape, 8 cross blocks before layers 3, 7, ..., 31.

Weights come from a Hugging Face directory: `weights.path=/path/to/Llama-3.1-8B-Instruct`.
"""

from comb_jax.config import Config, MeshConfig, ModelConfig, RopeScaling, ServeConfig, TrainConfig, WeightsConfig


def config() -> Config:
    return Config(
        name="llama8b_comb",
        model=ModelConfig(
            vocab_size=128256, hidden=4096, mlp_hidden=14336, num_layers=32, num_heads=32, num_kv_heads=8,
            head_dim=128, rms_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(), tie_embeddings=False,
            max_position=131072, num_cross_layers=8,
        ),
        weights=WeightsConfig(source="hf", path=""),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        train=TrainConfig(
            learning_rate=5e-5, weight_decay=0.01, warmup_steps=1000, batch_size=32, grad_accum_steps=4, steps=20000,
            max_chunk_tokens=4096, max_decoder_tokens=512, run_dir="runs/llama8b_comb",
        ),
        serve=ServeConfig(page_tokens=128, pool_tokens=1 << 20, max_chunk_tokens=4096, max_context_tokens=16384,
                          max_batch=32, max_new_tokens=256),
        param_dtype="float32",
        compute_dtype="bfloat16",
    )
