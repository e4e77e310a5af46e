"""The embedded SmolLM2-135M-Instruct: our GGUF reader + model against transformers reading the same file."""

import jax.numpy as jnp
import numpy as np
import torch

from comb_jax.model.decode import generate
from comb_jax.model.transformer import forward, lm_logits
from comb_jax.text.tokenizer import chat_prompt_ids, stop_ids


def test_logits_match_transformers_on_chat_prompt(smol_cfg, smol_backbone, smol_tokenizer, smol_hf_model):
    ids = chat_prompt_ids(smol_tokenizer, "Name three colours of the rainbow, and say why the sky is blue.")
    with torch.no_grad():
        want = smol_hf_model(torch.tensor([ids])).logits.numpy()
    hidden, _ = forward({"backbone": smol_backbone}, jnp.asarray([ids]), smol_cfg.model)
    got = np.asarray(lm_logits({"backbone": smol_backbone}, hidden))
    diff = np.abs(got - want).max()
    print(f"SmolLM2 {len(ids)} tokens: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_greedy_answers_from_context(smol_cfg, smol_backbone, smol_tokenizer):
    question = ("Context: Mira keeps her bicycle in the blue shed behind the bakery. The red shed holds only "
                "garden tools.\nQuestion: Where does Mira keep her bicycle? Answer in one sentence.")
    ids = chat_prompt_ids(smol_tokenizer, question)
    tokens, n = generate({"backbone": smol_backbone}, jnp.asarray([ids]), jnp.asarray([len(ids)]), None,
                         smol_cfg.model, max_new_tokens=24, stop_ids=stop_ids(smol_tokenizer))
    answer = smol_tokenizer.decode(np.asarray(tokens[0, : int(n[0])]), skip_special_tokens=True)
    print("answer:", answer)
    assert "blue shed" in answer.lower()
