"""The eval entry point end to end on tiny_comb (every mode), and the request segmentation it relies on."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.eval.harness import answer_nlls, comb_reading, main, markdown_table, run_eval, shuffled_order
from comb_jax.eval.metrics import normalize_answer
from comb_jax.eval.pic_modes import MODES, Answer
from comb_jax.eval.reading import gap_closed, reading_nlls
from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import concat_picaches, encode, forward, lm_logits
from comb_jax.text.codec import Codec
from comb_jax.text.prompt import prompt_segments as build_segments
from comb_jax.training.data import Example

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
    for mode in MODES:
        assert 0.0 <= s[mode]["contain_original"] <= 1.0 and 0.0 <= s[mode]["contain_shuffled"] <= 1.0
        assert 0.0 <= s[mode]["same_answer_across_orders"] <= 1.0
    reading = saved["reading"]  # fresh Comb params: gates 0, so Comb reads nothing
    assert reading["requests"] == 2 and reading["gap_closed"] == 0.0
    assert reading["nll_comb"] == reading["nll_none"] and np.isfinite(reading["nll_full"])
    assert reading["per_example"]["id"] == ["jsonl:1", "jsonl:2"]
    requests = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(requests) == len(MODES) * 2 * 2  # two passes over two requests
    for r in requests:  # F1 against the full prompt's own answer: 1 for full itself (0 if it normalises to nothing)
        if r["mode"] in ("full", "prefix"):
            assert r["score_vs_full"] == (1.0 if normalize_answer(r["answer"]) else 0.0)
        assert 0.0 <= r["score_vs_full"] <= 1.0
    table = (out / "results.md").read_text()
    assert all(f"| {mode} |" in table for mode in MODES)
    assert "contain (shuffled)" in table and "same answer across orders" in table and "gap closed" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_mode_is_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown mode"):
        main(["--config", "tiny_comb", "--dataset", "jsonl:x", "--modes", "full,turbo", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------
# Reading: teacher-forced NLLs and gap closed

QUESTIONS = ["Where is the bicycle?", "What holds garden tools?", "Where does the cat sleep?"]
GOLDS = ["blue shed", "the red shed", "on the piano"]


def _examples():
    return [Example(id=f"x{i}", chunks=tuple(CHUNKS[(i + j) % 4] for j in range(1 + i % 3)), question=q, answer=g,
                    golds=(g, "unused")) for i, (q, g) in enumerate(zip(QUESTIONS, GOLDS))]


@partial(jax.jit, static_argnames="cfg")
def _direct_log_probs(params, tokens, chunks, cfg):
    picache = None
    if chunks:
        picache = concat_picaches([encode(params, c, jnp.ones(c.shape, bool), cfg) for c in chunks])
    hidden, _ = forward(params, tokens, cfg, picache)
    return jax.nn.log_softmax(lm_logits(params, hidden), axis=-1)[0]


def _direct_nll(params, cfg, prompt, answer, chunks=None):
    """Mean NLL of `answer` after `prompt` from one unpadded forward (each chunk encoded alone, unpadded)."""
    seq = list(prompt) + list(answer)
    chunks = [jnp.asarray([c], jnp.int32) for c in chunks or []]
    log_probs = np.asarray(_direct_log_probs(params, jnp.asarray([seq[:-1]], jnp.int32), chunks, cfg=cfg.model))
    positions = np.arange(len(prompt) - 1, len(seq) - 1)
    return float(-log_probs[positions, answer].mean())


def test_reading_nlls_gates_zero_is_no_context(tiny_cfg):
    params = init_params(model_layout(tiny_cfg.model), jax.random.key(3))  # release init: gates 0
    codec = Codec(None)
    examples = _examples()
    r = reading_nlls(examples, comb_reading(params, tiny_cfg.model, codec, 64, batch_size=2))  # 3: a padded batch
    per = r["per_example"]
    assert per["id"] == ["x0", "x1", "x2"] and r["requests"] == 3
    for key in ("nll_none", "nll_comb", "nll_full"):
        assert np.all(np.isfinite(per[key])) and r[key] == pytest.approx(np.mean(per[key]))
    assert per["nll_comb"] == per["nll_none"]  # bit for bit: closed gates read nothing
    assert per["nll_comb_other"] == per["nll_none"]  # another request's chunks: nothing either
    assert r["gap_closed"] == 0.0 and r["reading_gap_closed"] == 0.0
    # the full prompt scores the same answer tokens (golds[0] + end of turn) after the teacher's prompt
    e = examples[2]
    answer = codec.answer_ids(e.golds[0])
    assert answer == list(b"on the piano") + [0]
    full = _direct_nll(params, tiny_cfg, codec.teacher_prompt_ids(e.chunks, e.question), answer)
    assert per["nll_full"][2] == pytest.approx(full, rel=1e-5)
    none = _direct_nll(params, tiny_cfg, codec.prompt_ids(e.question), answer)
    assert per["nll_none"][2] == pytest.approx(none, rel=1e-5)
    assert per["nll_full"][2] != pytest.approx(per["nll_none"][2], rel=1e-3)


def test_answer_nlls_with_open_gates_match_a_direct_computation(tiny_cfg, tiny_params):
    """Padding (chunk length, missing chunks, decoder length, batch rows) does not change a request's NLL."""
    codec = Codec(None)
    examples = _examples()
    prompts = [codec.prompt_ids(e.question) for e in examples]
    answers = [codec.answer_ids(e.answer) for e in examples]
    chunks = [[codec.encode(c) for c in e.chunks] for e in examples]  # 1, 2 and 3 chunks
    comb = answer_nlls(tiny_params, tiny_cfg.model, prompts, answers, chunks, batch_size=2)
    none = answer_nlls(tiny_params, tiny_cfg.model, prompts, answers, None, batch_size=2)
    for i in range(3):
        assert comb[i] == pytest.approx(_direct_nll(tiny_params, tiny_cfg, prompts[i], answers[i], chunks[i]),
                                        rel=1e-5)
        assert abs(comb[i] - none[i]) > 1e-3  # open gates: the chunks change the prediction
    # an empty chunk list reads nothing: the backbone
    empty = answer_nlls(tiny_params, tiny_cfg.model, prompts[:1], answers[:1], [[]], batch_size=2)
    assert empty[0] == none[0]


def test_gap_closed():
    assert gap_closed(3.0, 2.0, 1.0) == pytest.approx(0.5)
    assert gap_closed(3.0, 1.0, 1.0) == pytest.approx(1.0)
    assert gap_closed(3.0, 3.0, 1.0) == 0.0
    assert gap_closed(3.0, 2.0, 3.0) is None  # the full prompt is no better than no context: undefined


# ----------------------------------------------------------------------------------------------------------
# Containment and order agreement on scripted answers


class ScriptedRunner:
    """A PicRunner stand-in whose answers are scripted by (mode, question, pass)."""

    def __init__(self, cfg, codec, script):
        self.cfg, self.codec, self.script = cfg, codec, script
        self.dtype, self.params = jnp.float32, None

    def reset(self):
        pass

    def reserve(self, segments):
        pass

    def cache_bytes_per_token(self, mode):
        return 0.0

    def page_compression(self, mode):
        return None

    def answer(self, mode, seg):
        question = next(q for q in QUESTIONS if q in self.codec.decode(seg.suffix))
        chunks = [list(c) for c in seg.comb_chunks]
        example = next(e for e in _examples() if e.question == question)
        original = chunks == [self.codec.encode(c) for c in example.chunks]
        text = self.script[mode, question, "original" if original else "shuffled"]
        return Answer(tokens=self.codec.encode(text), ttft_s=0.01, total_s=0.02, chunk_hits=0,
                      num_chunks=len(chunks), last_hidden=np.ones(4, np.float32))


def test_containment_and_order_agreement_columns(tiny_cfg):
    codec = Codec(None)
    examples = _examples()[1:]  # 2 and 3 chunks: the shuffled pass really moves them
    q1, q2 = QUESTIONS[1], QUESTIONS[2]  # golds "the red shed", "on the piano"
    script = {
        ("naive", q1, "original"): "It is the Red Shed.",  # contained (articles and case normalised away)
        ("naive", q1, "shuffled"): "red shed",  # contained, other tokens
        ("naive", q2, "original"): "on the pianos",  # not contained: token boundary
        ("naive", q2, "shuffled"): "on the pianos",
        ("comb", q1, "original"): "shed red",  # order matters
        ("comb", q1, "shuffled"): "shed red",
        ("comb", q2, "original"): "It sleeps on a piano",  # articles are dropped on both sides
        ("comb", q2, "shuffled"): "piano",
    }
    runner = ScriptedRunner(tiny_cfg.model, codec, script)
    results = run_eval(runner, codec, examples, ["naive", "comb"], metric="f1", max_chunk_tokens=64, seed=0,
                       progress=False, reading=False)
    s = results["modes"]
    assert "reading" not in results
    assert (s["naive"]["contain_original"], s["naive"]["contain_shuffled"]) == (0.5, 0.5)
    assert s["naive"]["same_answer_across_orders"] == 0.5
    assert (s["comb"]["contain_original"], s["comb"]["contain_shuffled"]) == (0.5, 0.0)
    assert s["comb"]["same_answer_across_orders"] == 0.5
    table = markdown_table(results)
    assert "| naive |" in table and "gap closed" not in table
