"""The OpenAI-compatible server end to end: uvicorn in a thread on the tiny model, driven by the official client."""

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import MODEL, RunningServer, server_config

from comb_jax.model.compiles import compile_count
from comb_jax.serving.app import ServerThread, build_server
from comb_jax.serving.engine import Engine, Request
from comb_jax.text.codec import make_codec

DOCS = [
    "Mira keeps her bike in a shed.",
    "The library closes at six pm.",
    "Jonas sells rye bread Tuesdays.",
    "The Alder floods in spring.",
    "Owls hunt at night in the wood.",
]


@pytest.fixture(scope="module")
def server(tiny_params, tmp_path_factory):
    srv = RunningServer(tiny_params, store_dir=tmp_path_factory.mktemp("store"))
    yield srv
    srv.stop()


def metrics(srv) -> dict:
    """name -> {labels tuple: value} of every sample on /metrics."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def engine_answer(srv, params, question, documents, max_tokens):
    """The batch engine's greedy answer to the same prompt and chunks (tested against step-by-step decoding)."""
    codec = srv.codec
    engine = Engine(srv.cfg, params, stop_ids=codec.stop_ids, tokenizer_id=codec.name)
    request = Request("r", codec.prompt_ids(question), [codec.encode(d) for d in documents], max_tokens)
    return codec.decode(engine.run([request])[0].tokens)


def test_chat_with_documents_hits_in_any_order(server, tiny_params):
    first = server.chat("Where is the bike?", DOCS[:3], max_tokens=12)
    answer = first.choices[0].message.content
    assert first.object == "chat.completion" and first.choices[0].finish_reason in ("stop", "length")
    assert answer == engine_answer(server, tiny_params, "Where is the bike?", DOCS[:3], 12)
    usage = first.usage.model_dump()
    doc_tokens = sum(len(d.encode()) for d in DOCS[:3])
    assert usage["document_tokens"] == doc_tokens and usage["document_misses"] == 3
    assert usage["cached_document_tokens"] == 0
    assert usage["prompt_tokens"] == len(server.codec.prompt_ids("Where is the bike?"))
    assert usage["completion_tokens"] <= 12

    again = server.chat("Where is the bike?", [DOCS[2], DOCS[0], DOCS[1]], max_tokens=12)
    assert again.choices[0].message.content == answer  # another order, same chunks: the same greedy answer
    usage = again.usage.model_dump()
    assert usage["cached_document_tokens"] == doc_tokens and usage["document_hits"]["device"] == 3
    plain = server.chat("Where is the bike?", [], max_tokens=12)
    assert plain.choices[0].message.content == engine_answer(server, tiny_params, "Where is the bike?", [], 12)
    assert plain.usage.model_dump()["document_tokens"] == 0


def test_streamed_chat_equals_plain(server):
    plain = server.chat("When does it close?", DOCS[1:4], max_tokens=10)
    stream = server.chat("When does it close?", DOCS[3:0:-1], max_tokens=10, stream=True,
                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    usage = chunks[-1].usage.model_dump()
    assert not chunks[-1].choices and usage["completion_tokens"] == plain.usage.completion_tokens
    assert usage["document_hits"]["device"] == 3


def test_completions_stop_strings_and_seed(server):
    full = server.client.completions.create(model=MODEL, prompt="Q: owls?\nA: ", max_tokens=24, temperature=0,
                                            extra_body={"documents": [DOCS[4]]})
    text = full.choices[0].text
    assert full.object == "text_completion" and full.usage.model_dump()["document_tokens"] == len(DOCS[4])
    stop = text[3:5]
    assert len(stop) == 2
    cut = server.client.completions.create(model=MODEL, prompt="Q: owls?\nA: ", max_tokens=24, temperature=0,
                                           stop=[stop], extra_body={"documents": [DOCS[4]]})
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(model=MODEL, prompt="Q: owls?\nA: ", max_tokens=24, temperature=0,
                                                stop=stop, stream=True, extra_body={"documents": [DOCS[4]]})
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    # sampling: the same seed gives the same answer, whatever else is running
    sampled = [server.chat("Any owls?", DOCS[3:], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
               .choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_match_alone(server):
    """More requests than slots at once: continuous batching gives each the answer it gets alone (greedy)."""
    rng = np.random.default_rng(0)
    jobs = [(f"Question {i}?", [DOCS[j] for j in rng.permutation(5)[:rng.integers(0, 4)]], int(rng.integers(3, 20)))
            for i in range(7)]
    alone = [server.chat(q, d, max_tokens=n).choices[0].message.content for q, d, n in jobs]
    together = [None] * len(jobs)

    def run(i):
        q, d, n = jobs[i]
        together[i] = server.chat(q, d, max_tokens=n).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_bad_requests_name_the_field(server):
    cases = [
        (dict(n=2), 400, "n"),
        (dict(temperature=3.5), 400, "temperature"),
        (dict(top_p=0), 400, "top_p"),
        (dict(max_tokens=0), 400, "max_tokens"),
        (dict(max_tokens=10_000), 400, "max_tokens"),
        (dict(extra_body={"documents": [""]}), 400, "documents[0]"),
        (dict(extra_body={"documents": ["ok", 3]}), 400, "documents[1]"),
        (dict(extra_body={"documents": [{"txt": "x"}]}), 400, "documents[0]"),
        (dict(extra_body={"documents": ["x" * 80]}), 400, "documents[0]"),  # longer than max_chunk_tokens
        (dict(extra_body={"documents": [{"id": "never-seen"}]}), 404, "documents[0].id"),
        (dict(extra_body={"documents": [d + " " * 20 for d in DOCS]}), 413, "documents"),  # context > 128
        (dict(extra_body={"bogus": 1}), 400, "bogus"),
        (dict(stop=["a"] * 5), 400, "stop"),
    ]
    for kwargs, status, param in cases:
        with pytest.raises(openai.APIStatusError) as err:
            server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  **{"max_tokens": 4, **kwargs})
        assert err.value.status_code == status, kwargs
        body = err.value.body
        assert body["param"] == param and body["type"] and body["message"], (kwargs, body)
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # a bad request fails alone: the next one is served
    assert server.chat("Still there?", DOCS[:1], max_tokens=3).choices[0].message.content is not None


def test_documents_endpoint_pinning_and_pool_full(server):
    c = httpx.Client(base_url=server.url, timeout=60)
    r = c.post("/v1/documents", json={"documents": [{"id": "owls", "text": DOCS[4]}, DOCS[0]], "pin": True})
    assert r.status_code == 200, r.text
    owls, bike = r.json()["data"]
    assert owls["names"] == ["owls"] and owls["pinned"] and owls["tier"] == "device"
    listed = {d["id"]: d for d in c.get("/v1/documents").json()["data"]}
    assert listed[owls["id"]]["pinned"] and listed[owls["id"]]["tokens"] == len(DOCS[4])
    assert listed[owls["id"]]["bytes"] > 0
    # referenced by name or id, without the text: a device hit
    by_name = server.chat("Owls?", [{"id": "owls"}, {"id": bike["id"]}], max_tokens=6)
    assert by_name.usage.model_dump()["document_hits"]["device"] == 2
    assert by_name.choices[0].message.content == server.chat("Owls?", [DOCS[4], DOCS[0]],
                                                             max_tokens=6).choices[0].message.content

    # fill the pool with pinned documents: a request needing new pages gets 429, earlier entries went to host
    filler = [f"Filler document number {i:02d}." for i in range(16)]
    r = c.post("/v1/documents", json={"documents": filler, "pin": True})
    assert r.status_code == 429 and r.json()["error"]["code"] == "pool_full"
    r = c.post("/v1/documents", json={"documents": filler[:14], "pin": True})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.RateLimitError):
        server.chat("Rivers?", ["A brand new document here."], max_tokens=3)
    for d in r.json()["data"] + [owls, bike]:
        assert c.delete(f"/v1/documents/{d['id']}").json()["pinned"] is False
    assert c.delete("/v1/documents/doc-unknown").status_code == 404
    # the documents pushed out of the device pool were kept one tier down and come back from there
    back = server.chat("Rivers?", DOCS[1:4], max_tokens=3).usage.model_dump()
    assert back["document_misses"] == 0 and back["document_hits"]["device"] < 3
    assert back["document_hits"]["host"] + back["document_hits"]["disk"] >= 1


def test_client_disconnect_frees_slot_and_pages(server, monkeypatch):
    # each decode step a few ms longer: 200 tokens outlast the time the server needs to see the disconnect (on an
    # idle machine tiny_comb decodes its whole budget before the closed connection is noticed otherwise)
    step = server.scheduler._step
    monkeypatch.setattr(server.scheduler, "_step", lambda: (time.sleep(0.005), step())[1])
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 200,
               "temperature": 0, "documents": ["A long story begins."]}
    assert httpx.post(server.url + "/v1/chat/completions", json=request, timeout=60).json()["choices"][0][
        "finish_reason"] == "length"  # left alone, this request runs its whole budget
    before = metrics(server)["comb_generated_tokens_total"][()]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={**request, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                break  # leave after the first token
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["comb_requests_in_flight"][()] == 0 and m["comb_active_slots"][()] == 0:
            break
        time.sleep(0.05)
    assert m["comb_requests_in_flight"][()] == 0 and m["comb_active_slots"][()] == 0
    assert m["comb_generated_tokens_total"][()] - before < 200  # stopped early, not run to its budget
    assert all(e.refcount == 0 for b in server.scheduler.pool.entries.values() for e in b)


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client.models.list()] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    server.chat("Metrics?", DOCS[:2], max_tokens=4)
    m = metrics(server)
    assert m["comb_time_to_first_token_seconds_count"][()] >= 1
    assert m["comb_request_latency_seconds_count"][()] >= 1
    assert m["comb_picache_hits_total"][(("tier", "device"),)] >= 2
    assert m["comb_picache_misses_total"][()] >= 1
    assert 0 < m["comb_pool_pages_in_use"][()] <= m["comb_pool_pages"][()]
    assert m["comb_queue_depth"][()] == 0 and m["comb_requests_in_flight"][()] == 0
    assert "comb_generated_tokens_per_second" in m
    assert m["comb_requests_total"][(("endpoint", "/v1/chat/completions"), ("status", "200"))] >= 1


def test_no_compilation_after_warmup(server):
    """A mix of requests (chat, completions, streamed, sampled, with and without documents, new and cached,
    tier moves, document uploads) compiles nothing once the server is warm."""
    server.chat("Warm?", DOCS[:2], max_tokens=2)  # anything a previous test left lazy
    before = compile_count()
    server.chat("One?", [], max_tokens=5)
    server.chat("Two?", [DOCS[0], "Something never seen before."], max_tokens=9, temperature=0.7, seed=3)
    list(server.chat("Three?", DOCS[2:5], max_tokens=4, stream=True))
    server.client.completions.create(model=MODEL, prompt="Four", max_tokens=3, extra_body={"documents": DOCS[:1]})
    httpx.post(server.url + "/v1/documents", json={"documents": ["Encoded ahead of time."]}, timeout=60)
    assert compile_count() == before


def test_warming_up_answers_503(tiny_params):
    cfg = server_config()
    app, scheduler = build_server(cfg, tiny_params, make_codec(cfg))
    release = threading.Event()
    scheduler.warmup = lambda: release.wait(60)  # hold the server in its warm-up
    thread = ServerThread(app).start()
    try:
        assert httpx.get(thread.url + "/health").status_code == 503
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "warming_up"
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(thread.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).choices[0].finish_reason in ("stop", "length")
    finally:
        release.set()
        thread.stop()



def test_waiting_requests_admitted_in_one_prefill(server):
    """Requests that arrive while the scheduler is busy are prefilled together (one call, their misses encoded
    together), answer as each does alone (greedy and seeded sampling), and compile nothing new."""
    jobs = [("Batch one?", DOCS[:2], 6, 0.0), ("Batch two?", [DOCS[4], "A page only this batch reads."], 9, 0.0),
            ("Batch three?", [], 4, 0.0), ("Batch four?", [DOCS[1], "A page only this batch reads."], 7, 1.0)]
    server.chat("Warm?", [DOCS[0], DOCS[1], DOCS[4]], max_tokens=2)  # only the new page is a miss below
    sched = server.scheduler
    hold, held = threading.Event(), threading.Event()
    sched.call(lambda: (held.set(), hold.wait(30)))  # keep the scheduler busy while the requests queue up
    assert held.wait(30)
    before, admitted = compile_count(), len(sched.admissions)
    together = [None] * len(jobs)

    def run(i):
        q, d, n, t = jobs[i]
        together[i] = server.chat(q, d, max_tokens=n, temperature=t, seed=5)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    deadline = time.monotonic() + 30
    for n, t in enumerate(threads, 1):  # one at a time: the first to arrive is charged a shared miss
        t.start()
        while len(sched.waiting) < n and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(sched.waiting) == len(jobs)
    hold.set()
    for t in threads:
        t.join()
    assert sched.admissions[admitted:] == [len(jobs)]  # one prefill call for all four
    assert compile_count() == before
    # the new document was encoded once, for both requests that read it
    assert together[1].usage.model_dump()["document_misses"] == 1
    assert together[3].usage.model_dump()["document_misses"] == 0
    alone = [server.chat(q, d, max_tokens=n, temperature=t, seed=5).choices[0].message.content
             for q, d, n, t in jobs]
    assert [r.choices[0].message.content for r in together] == alone
