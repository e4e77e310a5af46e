"""The eval entry point end to end on tiny_comb (every mode), and the request segmentation it relies on."""

import json

import pytest

from comb_jax.data import Codec
from comb_jax.eval import build_segments, main, shuffled_order
from comb_jax.metrics import normalize_answer
from comb_jax.pic_modes import MODES

CHUNKS = ["Mira keeps her bicycle in the blue shed.", "The red shed holds garden tools.",
          "Bakeries open early.", "Tom's cat sleeps on the piano."]


def test_segments_join_into_the_whole_prompt_bytes():
    codec = Codec(None)
    seg = build_segments(codec, CHUNKS[:3], "Where is the bicycle?", max_chunk_tokens=64)
    assert list(seg.full) == codec.teacher_prompt_ids(CHUNKS[:3], "Where is the bicycle?")
    assert list(seg.comb_prompt) == codec.prompt_ids("Where is the bicycle?")
    assert seg.chunks[1] == tuple(codec.encode("\n" + CHUNKS[1] + "\n"))
    # Comb's chunks are tokenized as training and serving tokenize them, and move with the decoder-side ones
    assert seg.comb_chunks == tuple(tuple(codec.encode(c)) for c in CHUNKS[:3])
    moved = seg.reordered([2, 0, 1])
    assert moved.comb_chunks == tuple(tuple(codec.encode(CHUNKS[i])) for i in (2, 0, 1))
    assert moved.chunks == tuple(seg.chunks[i] for i in (2, 0, 1))


def test_segments_join_into_the_whole_prompt_smollm2(smol_tokenizer):
    """BPE merges across piece boundaries would change the prompt; the split points avoid them."""
    codec = Codec(smol_tokenizer)
    for order in ([0, 1, 2], [2, 0, 1, 3]):
        chunks = [CHUNKS[i] for i in order]
        seg = build_segments(codec, chunks, "Where does Mira keep her bicycle?", max_chunk_tokens=512)
        assert list(seg.full) == codec.teacher_prompt_ids(chunks, "Where does Mira keep her bicycle?")
        # a chunk's ids do not depend on where it sits
        assert seg.chunks[order.index(0)] == tuple(codec.encode("\n" + CHUNKS[0] + "\n"))


def test_shuffled_order_is_a_real_permutation():
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        for _ in range(20):
            order = shuffled_order(n, rng)
            assert sorted(order) == list(range(n)) and order != list(range(n))
    assert shuffled_order(1, rng) == [0]


def test_every_mode_end_to_end_on_tiny(tmp_path):
    data = tmp_path / "requests.jsonl"
    rows = [{"chunks": [CHUNKS[i], CHUNKS[(i + 1) % 4], CHUNKS[(i + 2) % 4]], "question": f"Question {i}?",
             "answer": "blue shed"} for i in range(2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    results = main(["--config", "tiny_comb", "--dataset", f"jsonl:{data}", "--modes", ",".join(MODES),
                    "--limit", "2", "--out", str(out), "--max-new-tokens", "3", "--epic-k", "4", "--no-progress"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["modes"] == results["modes"] and saved["requests"] == 2 and saved["metric"] == "f1"
    s = saved["modes"]
    assert list(s) == list(MODES)
    assert s["full"]["attn_sim"] == pytest.approx(1.0) and s["full"]["same_answer"] == 1.0
    assert s["prefix"]["attn_sim"] == pytest.approx(1.0, abs=1e-5)
    assert s["comb"]["attn_sim"] is None  # the context is not in the decoder's attention
    assert s["full"]["hit_rate_shuffled"] == 0.0
    for mode in ("naive", "rerotate", "epic", "comb"):  # every chunk was seen in the original pass
        assert s[mode]["hit_rate_shuffled"] == 1.0
    assert s["prefix"]["hit_rate_shuffled"] < 1.0  # the shuffled orders share no full prefix
    assert s["naive"]["cache_bytes_per_token"] == 2 * s["comb"]["cache_bytes_per_token"]  # 4 layers vs 2 cross
    assert s["comb"]["decoder_kv_bytes_per_context_token"] == 0
    requests = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(requests) == len(MODES) * 2 * 2  # two passes over two requests
    for r in requests:  # F1 against the full prompt's own answer: 1 for full itself (0 if it normalises to nothing)
        if r["mode"] in ("full", "prefix"):
            assert r["score_vs_full"] == (1.0 if normalize_answer(r["answer"]) else 0.0)
        assert 0.0 <= r["score_vs_full"] <= 1.0
    table = (out / "results.md").read_text()
    assert all(f"| {mode} |" in table for mode in MODES)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_mode_is_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown mode"):
        main(["--config", "tiny_comb", "--dataset", "jsonl:x", "--modes", "full,turbo", "--out", str(tmp_path)])
