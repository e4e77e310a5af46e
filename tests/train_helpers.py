"""Small hand-made examples and configs shared by the training, data and checkpoint tests."""

from comb_jax.config import apply_overrides
from comb_jax.training.data import Example

FACTS = [("red", "apple"), ("blue", "sky"), ("green", "leaf"), ("gold", "sun"), ("grey", "rock"), ("pink", "rose"),
         ("white", "snow"), ("black", "coal"), ("brown", "bear"), ("teal", "lake"), ("plum", "jam"), ("tan", "sand"),
         ("jade", "gem"), ("navy", "sea"), ("rust", "nail"), ("lime", "fruit")]


def toy_examples(n: int = 16) -> list[Example]:
    """n examples: two short chunks each (the fact and a distractor), a question and a one-word answer."""
    out = []
    for i in range(n):
        color, thing = FACTS[i % len(FACTS)]
        other_color, other_thing = FACTS[(i + 5) % len(FACTS)]
        out.append(Example(id=f"toy:{i}", chunks=(f"The {thing} is {color}.", f"The {other_thing} is {other_color}."),
                           question=f"{thing} color?", answer=color, golds=(color,)))
    return out


def toy_cfg(tiny_cfg, *overrides):
    """tiny_comb with shapes that fit the toy examples (byte-level tokens)."""
    return apply_overrides(tiny_cfg, ["train.max_chunk_tokens=32", "train.chunk_buckets=(32,)", "max_decoder_tokens=48",
                                      "decoder_buckets=(48,)", "eval_every=0", "warmup_steps=2", *overrides])


def checkpointed_run_cfg(tiny_cfg, run_dir, steps: int, keep: int):
    """toy_cfg for short checkpointed runs (batch 4 on one device, a checkpoint every 2 steps)."""
    return toy_cfg(tiny_cfg, "batch_size=4", "mesh.data=1", f"steps={steps}", "checkpoint_every=2",
                   f"keep_checkpoints={keep}", "learning_rate=1e-2", f"run_dir={run_dir}")
