"""The shipped smollm2_pointer Comb: its fingerprint, and that it reads held-out needles from the right chunks."""

import jax
import numpy as np
import pytest

from comb_jax import shipped
from comb_jax.config import load_config
from comb_jax.eval import harness as ev
from comb_jax.training import data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pointer(smol_backbone):
    cfg = load_config("smollm2_pointer")
    comb = shipped.load_shipped(cfg)  # checks the sha256 fingerprint in card.json
    return cfg, {"backbone": jax.tree.map(np.asarray, smol_backbone), "comb": comb}


def test_card_matches_the_weights_and_the_backbone(pointer, smol_backbone):
    cfg, _ = pointer
    directory = shipped.shipped_dir("smollm2_pointer")
    card = shipped.read_card(directory)
    assert card["fingerprint"] == shipped.file_sha256(directory / "comb.safetensors")
    assert card["config"]["model"]["num_cross_layers"] == 1 and card["metrics"]["eval_reading_gap_closed"] > 0.5


def test_reads_held_out_needles_from_the_right_chunks_in_any_order(pointer, shared_data):
    from comb_jax.training.needles import needle_examples

    cfg, params = pointer
    rows = needle_examples(shared_data, "dev", 8, seed=0)
    examples = [data.Example(f"n{i}", tuple(r["chunks"]), r["question"], r["answer"], (r["answer"],))
                for i, r in enumerate(rows)]
    codec = data.make_codec(cfg)
    r = ev.reading_nlls(params, cfg.model, codec, examples, cfg.train.max_chunk_tokens)
    # the gold answer is far more likely with the right chunks than with another request's (style alone: 0)
    assert r["nll_comb"] < r["nll_comb_other"] - 1.0 and r["reading_gap_closed"] > 0.3
    # chunk order does not change what Comb reads
    shuffled = [data.Example(e.id, e.chunks[::-1], e.question, e.answer, e.golds) for e in examples]
    again = ev.reading_nlls(params, cfg.model, codec, shuffled, cfg.train.max_chunk_tokens)
    np.testing.assert_allclose(again["per_example"]["nll_comb"], r["per_example"]["nll_comb"], rtol=1e-4)


def test_training_can_start_from_the_shipped_weights(pointer):
    import dataclasses

    from comb_jax.training.warm_start import init_comb

    cfg, params = pointer
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_checkpoint="shipped"))
    comb = init_comb(cfg, params["backbone"], jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), comb, params["comb"])
