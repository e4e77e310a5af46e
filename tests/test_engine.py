"""Serving engine against step-by-step greedy decoding with model.forward (full recompute every step)."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.config import apply_overrides
from comb_jax.model.compiles import compile_count
from comb_jax.model.transformer import concat_picaches, encode, forward, lm_logits
from comb_jax.serving.engine import Engine, Request

# Small buckets keep the number of compiled shapes (and the test time) down; every test reuses them.
SERVE_OVERRIDES = ["serve.prompt_buckets=(16, 32)", "serve.context_buckets=(64, 128)", "serve.chunk_buckets=(16, 32)",
                   "serve.max_chunk_tokens=32", "max_context_tokens=128", "max_batch=4", "max_new_tokens=8",
                   "encode_batch=4"]


@partial(jax.jit, static_argnames=("cfg",))
def _next_token(params, seq, length, picache, cfg):
    """Greedy token after seq[:length]: the whole (right-padded, causal) sequence is re-run every step."""
    hidden, _ = forward(params, seq, cfg, picache)
    return jnp.argmax(lm_logits(params, hidden[:, length - 1][:, None])[0, 0])


def reference_greedy(params, cfg, prompt, chunks, max_tokens, stop_ids, width=192):
    """Greedy decoding with model.forward and no KV cache; each chunk encoded on its own by model.encode."""
    picache = None
    if chunks:
        picache = concat_picaches([encode(params, jnp.asarray([c]), jnp.ones((1, len(c)), bool), cfg)
                                   for c in chunks])
    seq, out = np.zeros((1, width), np.int32), []
    seq[0, :len(prompt)] = prompt
    length = len(prompt)
    for _ in range(max_tokens):
        nxt = int(_next_token(params, seq, length, picache, cfg))
        seq[0, length] = nxt
        length += 1
        if nxt in stop_ids:
            break
        out.append(nxt)
    return out


def ids(seed, n):
    return np.random.default_rng(seed).integers(1, 256, n).tolist()


CHUNKS = [ids(100 + i, n) for i, n in enumerate((7, 16, 30, 12, 25))]
REQUESTS = [  # (prompt, chunk indices, max_tokens): mixed prompt buckets, chunk counts, budgets
    (ids(1, 5), [0, 1], 8),
    (ids(2, 20), [], 6),
    (ids(3, 12), [2, 3, 4], 8),
    (ids(4, 9), [4], 3),
    (ids(5, 14), [], 8),
]


@pytest.fixture(scope="module")
def serve_cfg(tiny_cfg):
    return apply_overrides(tiny_cfg, SERVE_OVERRIDES)


@pytest.fixture(scope="module")
def references(serve_cfg, tiny_params):
    """Reference answers; the stop id is request 3's first free-running token, so that row stops at once."""
    free = reference_greedy(tiny_params, serve_cfg.model, REQUESTS[3][0], [CHUNKS[4]], 8, ())
    stops = (free[0],)
    return stops, [reference_greedy(tiny_params, serve_cfg.model, p, [CHUNKS[i] for i in c], m, stops)
                   for p, c, m in REQUESTS]


@pytest.fixture(scope="module")
def engine(serve_cfg, tiny_params, references):
    eng = Engine(serve_cfg, tiny_params, stop_ids=references[0])
    eng.warmup()
    return eng


def make_requests(tag, order_seed=None):
    rng = np.random.default_rng(order_seed)
    out = []
    for n, (prompt, chunk_idx, max_tokens) in enumerate(REQUESTS):
        idx = list(chunk_idx) if order_seed is None else list(rng.permutation(chunk_idx))
        out.append(Request(f"{tag}-{n}", prompt, [CHUNKS[i] for i in idx], max_tokens))
    return out


def test_greedy_matches_stepwise_forward_in_a_mixed_batch(engine, references):
    stops, want = references
    results = engine.run(make_requests("first"))  # 5 requests over batches of 4, with and without chunks
    for res, ref, (_, chunk_idx, _) in zip(results, want, REQUESTS):
        assert res.error is None
        assert res.tokens == ref, res.id
        assert res.chunk_hits + res.chunk_misses == len(chunk_idx)
        assert res.ttft_s > 0
    assert want[3] == [] and any(want)  # row 3 stopped on the stop id, not on its budget of 3


def test_shuffled_chunk_order_gives_same_answers_all_hits(engine, references):
    _, want = references
    engine.run(make_requests("warm"))  # make sure every chunk is in the pool
    hits_before, misses_before = engine.pool.stats.hits, engine.pool.stats.misses
    for seed in (1, 2):
        results = engine.run(make_requests(f"shuffled{seed}", order_seed=seed))
        for res, ref, (_, chunk_idx, _) in zip(results, want, REQUESTS):
            assert res.tokens == ref, res.id
            assert (res.chunk_hits, res.chunk_misses) == (len(chunk_idx), 0)
    assert engine.pool.stats.misses == misses_before
    assert engine.pool.stats.hits == hits_before + 2 * sum(len(c) for _, c, _ in REQUESTS)


def test_no_recompilation_after_warmup(engine):
    rng = np.random.default_rng(7)
    before = compile_count()
    for round_ in range(3):
        requests = []
        for n in range(int(rng.integers(1, 7))):
            chunks = [ids(int(rng.integers(1000)), int(rng.integers(1, 33))) for _ in range(int(rng.integers(0, 5)))]
            requests.append(Request(f"mix{round_}-{n}", ids(n, int(rng.integers(1, 33))), chunks,
                                    int(rng.integers(1, 9)), float(rng.choice([0.0, 0.8])), 0.9))
        results = engine.run(requests)
        assert all(r.error is None for r in results), [r.error for r in results]
    assert compile_count() == before


def test_request_errors_do_not_stop_the_batch(engine, references):
    _, want = references
    pool = engine.pool
    # other users hold every page but two: a request needing three pages cannot fit even after eviction,
    # a request needing two is served, and one needing two more waits for the next batch
    pool._evict_until(pool.num_pages)  # start from an empty pool: every earlier entry is idle
    filler = [pool.acquire(ids(5000 + i, 16))[0] for i in range(len(pool.free) - 2)]
    assert len(pool.free) == 2
    prompt, chunk_idx, max_tokens = REQUESTS[0]
    requests = [
        Request("too-big", prompt, [ids(7000, 30), ids(7001, 10)], 4),  # 3 pages
        Request("fits", prompt, [ids(7002, 20)], 4),  # 2 pages
        Request("deferred", prompt, [ids(7003, 30)], 4),  # 2 pages, free once "fits" is done
        Request("oversize", prompt, [ids(7004, 33)], 4),
        Request("bad-token", [300], [], 4),
        Request("plain", prompt, [], max_tokens),
    ]
    results = {r.id: r for r in engine.run(requests)}
    assert "pool full" in results["too-big"].error
    assert "max_chunk_tokens=32" in results["oversize"].error
    assert "vocabulary" in results["bad-token"].error
    for rid in ("fits", "deferred", "plain"):
        assert results[rid].error is None and results[rid].tokens, rid
    assert results["plain"].tokens == reference_greedy(engine.params, engine.cfg.model, prompt, [], max_tokens,
                                                       engine.stop_ids)
    for e in filler:
        pool.release(e)


def test_full_mode_prefills_the_inlined_prompt(serve_cfg, tiny_params, references):
    stops, _ = references
    prompt, chunk_idx, max_tokens = REQUESTS[2]
    inlined = [t for i in chunk_idx for t in CHUNKS[i]] + prompt
    full = Engine(serve_cfg, tiny_params, stop_ids=stops, mode="full")
    assert max(full.prompt_buckets) == 32 + 128
    results = full.run([Request("full", inlined, [], max_tokens), Request("chunks", prompt, [CHUNKS[0]], 4)])
    assert results[0].tokens == reference_greedy(tiny_params, serve_cfg.model, inlined, [], max_tokens, stops)
    assert results[1].error == "mode 'full' takes the chunks inlined in the prompt, not as chunk_ids"


def test_serve_cli_answers_jsonl_with_a_malformed_line(tmp_path, serve_cfg, capsys):
    from comb_jax.cli import serve

    lines = [
        json.dumps({"id": "a", "chunks": ["Mira: blue shed.", "Red shed: tools."], "question": "Bike?",
                    "max_tokens": 5}),
        "{not json",
        json.dumps({"id": "b", "chunks": "not a list", "question": "x"}),
        json.dumps({"id": "c", "chunks": ["Red shed: tools.", "Mira: blue shed."], "question": "Bike?",
                    "max_tokens": 5}),
        json.dumps({"id": "d", "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 3}),
    ]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert serve.main(["--config", "tiny_comb", "--input", str(src), "--output", str(out), *SERVE_OVERRIDES]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "line-2", "b", "c", "d"]
    assert "JSONDecodeError" in rows[1]["error"] and rows[1]["answer"] is None
    assert "'chunks' must be a list of strings" in rows[2]["error"]
    for r in (rows[0], rows[3], rows[4]):
        assert r["error"] is None and isinstance(r["answer"], str) and 1 <= r["output_tokens"] <= 5
        assert r["ttft_s"] > 0
    assert (rows[0]["chunk_hits"], rows[0]["chunk_misses"]) == (0, 2)
    assert (rows[3]["chunk_hits"], rows[3]["chunk_misses"]) == (2, 0)  # same chunks, other order
    assert rows[0]["answer"] == rows[3]["answer"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert summary["requests"] == 5 and summary["errors"] == 2 and summary["hit_rate"] == 0.5
