"""`--mode prefix` (serving/prefix.py): the backbone KV of the longest cached page prefix is reused, and answers
equal full prefill token for token: cold, again (a full hit but the last partial page), a shared first document
(a partial hit), the documents reordered (a miss after the shared head), and under eviction from a small pool."""

import threading
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.config import apply_overrides
from comb_jax.model.transformer import KVCache, forward, lm_logits
from comb_jax.serving.engine import Engine, Request
from comb_jax.serving.prefix import page_buckets
from comb_jax.serving.slots import prefill_rows

# prompts up to 32 + 64 = 96 tokens (the mode's buckets are full mode's: 32, 96), reused prefixes of 0, 2 or 6 pages
OVERRIDES = ["serve.page_tokens=16", "serve.prompt_buckets=(32,)", "serve.context_buckets=(64,)",
             "serve.chunk_buckets=(16, 32)", "serve.max_chunk_tokens=32", "serve.max_context_tokens=64",
             "serve.max_batch=2", "serve.max_new_tokens=6"]


def ids(seed, n):
    return np.random.default_rng(seed).integers(1, 256, n).tolist()


DOCS = [ids(10 + i, 40) for i in range(4)]
QUESTION = ids(99, 10)
# name -> (prompt, pages read from the cache when served in this order): 90 tokens = 5 whole pages + 10 tokens
SCENARIOS = [
    ("cold", DOCS[0] + DOCS[1] + QUESTION, 0),
    ("again", DOCS[0] + DOCS[1] + QUESTION, 5),  # all but the last, partial page
    ("shared first document", DOCS[0] + DOCS[2] + QUESTION, 2),  # pages 0-1 are DOCS[0]'s, page 2 mixes both
    ("reordered", DOCS[1] + DOCS[0] + QUESTION, 0),  # DOCS[1] was never first
]


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    return apply_overrides(tiny_cfg, OVERRIDES)


@pytest.fixture(scope="module")
def full_answers(cfg, tiny_params):
    full = Engine(cfg, tiny_params, mode="full")
    results = full.run([Request(name, prompt, max_tokens=6) for name, prompt, _ in SCENARIOS])
    return {name: r.tokens for (name, _, _), r in zip(SCENARIOS, results)}


@partial(jax.jit, static_argnames=("cfg",))
def _next_logits(params, cache: KVCache, token, cfg):
    """Logits of the token after `token` [B], read on top of a prefilled cache (what decoding sees next)."""
    hidden, _ = forward(params, token[:, None], cfg, None, cache, jnp.ones_like(token))
    return lm_logits(params, hidden)[:, 0]


def test_page_buckets():
    assert page_buckets((32, 96), 16) == (0, 2, 6)
    assert page_buckets((8, 64, 320), 16) == (0, 4, 20)


def test_answers_equal_full_prefill_and_count_the_reused_pages(cfg, tiny_params, full_answers):
    engine = Engine(cfg, tiny_params, mode="prefix")
    assert engine.prompt_buckets == (32, 96) and engine.prefix.page_buckets == (0, 2, 6)
    for name, prompt, hit_pages in SCENARIOS:  # one at a time: each sees what the earlier ones cached
        res = engine.run([Request(name, prompt, max_tokens=6)])[0]
        assert res.error is None, name
        assert res.tokens == full_answers[name], name
        assert (res.chunk_hits, res.chunk_misses, res.cached_tokens) == (hit_pages, 5 - hit_pages, 16 * hit_pages)
    stats = engine.prefix.stats
    assert stats.prompts == 4 and stats.prompt_tokens == 4 * 90 and stats.reused_tokens == 16 * 7
    assert (engine.pool.stats.hits, engine.pool.stats.misses) == (7, 13)
    # pages cached: DOCS[0]+[1]'s 5, the shared first document's 3 after page 1, the reordered prompt's 5
    assert len(engine.prefix) == engine.pool.used_pages == 13
    assert engine.run([Request("chunks", QUESTION, [DOCS[0]])])[0].error == (
        "mode 'prefix' takes the chunks inlined in the prompt, not as chunk_ids")


def test_reused_kv_and_next_logits_match_full_prefill(cfg, tiny_params):
    """float32: the cache a prefix prefill leaves (reused pages + the rest prefilled at its positions) and the
    logits read from it are those of a full prefill of the whole prompt."""
    engine = Engine(cfg, tiny_params, mode="prefix")
    slots, m = engine.kv_slots, cfg.model
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), 2)))
    temp, top = np.zeros((2,), np.float32), np.ones((2,), np.float32)
    for name, prompt, hit_pages in SCENARIOS:
        (cache, _, first, _), plans = engine.prefix.prefill(tiny_params, [prompt], keys, temp, top, slots=slots,
                                                            cfg=m)
        assert plans[0].hits == hit_pages, name
        tokens = np.zeros((2, 96), np.int32)
        tokens[0, :len(prompt)] = prompt
        ref, _, ref_first, _ = prefill_rows(tiny_params, None, None, None, None, tokens,
                                            np.array([len(prompt), 1], np.int32), keys, temp, top, cfg=m, slots=slots)
        n = len(prompt)
        assert int(cache.lengths[0]) == int(ref.lengths[0]) == n
        np.testing.assert_allclose(cache.k[:, 0, :n], ref.k[:, 0, :n], atol=1e-5, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(cache.v[:, 0, :n], ref.v[:, 0, :n], atol=1e-5, rtol=1e-5, err_msg=name)
        assert int(first[0]) == int(ref_first[0]), name
        got, want = (_next_logits(tiny_params, c, f, m)[0] for c, f in ((cache, first), (ref, ref_first)))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)


def test_eviction_under_a_small_pool_keeps_answers(cfg, tiny_params, full_answers):
    """Seven pages: a second prompt evicts most of the first (least recently used leaves first); the first
    again reuses what is left, and every answer still equals full prefill."""
    engine = Engine(apply_overrides(cfg, ["serve.pool_tokens=112"]), tiny_params, mode="prefix")
    assert engine.pool.num_pages == 7
    order = [SCENARIOS[0], SCENARIOS[3], SCENARIOS[0], SCENARIOS[2]]
    for name, prompt, _ in order:
        res = engine.run([Request(name, prompt, max_tokens=6)])[0]
        assert res.error is None and res.tokens == full_answers[name], name
    assert engine.prefix.stats.evictions > 0
    assert engine.pool.used_pages <= 7 and len(engine.prefix) == engine.pool.used_pages
    # a pool smaller than one prompt caches what fits and still answers
    tiny = Engine(apply_overrides(cfg, ["serve.pool_tokens=32"]), tiny_params, mode="prefix")
    for name, prompt, _ in SCENARIOS[:2]:
        res = tiny.run([Request(name, prompt, max_tokens=6)])[0]
        assert res.tokens == full_answers[name], name
    assert res.chunk_hits == 2  # the two pages that fitted


# -- the HTTP server (scheduler) in mode prefix ---------------------------------------------------------------

HTTP_DOCS = ["Mira keeps her bike in a shed.", "The library closes at six pm.", "Jonas sells rye bread Tuesdays."]
# one admission bucket of 2 and prompts up to 64 + 64 tokens keep the warm-up's compiles down (12 prefill shapes)
HTTP_OVERRIDES = ["serve.max_batch=2", "serve.context_buckets=(64,)", "serve.max_context_tokens=64"]
HTTP_CHATS = [  # (question, documents): cold, again, a shared first document, reordered
    ("Where is the bike?", HTTP_DOCS[:2]),
    ("Where is the bike?", HTTP_DOCS[:2]),
    ("Where is the bike?", [HTTP_DOCS[0], HTTP_DOCS[2]]),
    ("Where is the bike?", [HTTP_DOCS[1], HTTP_DOCS[0]]),
]


def test_http_prefix_mode_equals_full_batches_admission_and_compiles_nothing(tiny_params):
    from server_helpers import RunningServer
    from test_server import metrics

    from comb_jax.model.compiles import compile_count

    srv = RunningServer(tiny_params, overrides=HTTP_OVERRIDES, ready_timeout_s=1200, mode="prefix")
    try:
        codec = srv.codec
        full = Engine(srv.cfg, tiny_params, stop_ids=codec.stop_ids, tokenizer_id=codec.name, mode="full")
        prompts = [codec.messages_ids([{"role": "user", "content": q}], docs) for q, docs in HTTP_CHATS]
        want = [codec.decode(r.tokens) for r in full.run([Request(f"r{i}", p, max_tokens=8)
                                                          for i, p in enumerate(prompts)])]
        assert max(map(len, prompts)) <= 128
        pt, before = srv.cfg.serve.page_tokens, compile_count()
        cached = []
        for (q, docs), prompt, answer in zip(HTTP_CHATS, prompts, want):
            r = srv.chat(q, docs, max_tokens=8)
            assert r.choices[0].message.content == answer, (q, docs)
            usage = r.usage.model_dump()
            assert usage["prompt_tokens"] == len(prompt) and usage["document_tokens"] > 0
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        assert cached[0] == 0 and cached[1] == (len(prompts[1]) - 1) // pt * pt
        shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[2])) if a != b)
        assert cached[2] == shared // pt * pt > 0
        head = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[3])) if a != b)  # the template's head
        assert cached[3] == head // pt * pt < cached[2]

        # waiting requests are admitted in one prefill call, and answer as alone
        sched = srv.scheduler
        hold, held = threading.Event(), threading.Event()
        sched.call(lambda: (held.set(), hold.wait(30)))
        assert held.wait(30)
        admitted = len(sched.admissions)
        together = [None, None]
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, srv.chat(*HTTP_CHATS[i + 2],
                                                                                        max_tokens=8)))
                   for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(sched.waiting) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        hold.set()
        for t in threads:
            t.join()
        assert sched.admissions[admitted:] == [2]
        assert [r.choices[0].message.content for r in together] == want[2:]
        assert compile_count() == before

        m = metrics(srv)
        assert m["comb_prefix_cached_tokens_total"][()] == sum(cached) + sum(
            r.usage.model_dump()["prompt_tokens_details"]["cached_tokens"] for r in together)
        assert m["comb_prefix_prompt_tokens_total"][()] == sum(map(len, prompts)) + len(prompts[2]) + len(prompts[3])
        rate = m["comb_prefix_token_hit_rate"][()]
        assert rate == pytest.approx(m["comb_prefix_cached_tokens_total"][()]
                                     / m["comb_prefix_prompt_tokens_total"][()])
        assert m["comb_prefix_page_hits_total"][()] == m["comb_prefix_cached_tokens_total"][()] / pt
        assert m["comb_prefix_page_misses_total"][()] > 0 and m["comb_pool_pages_in_use"][()] > 0
    finally:
        srv.stop()

