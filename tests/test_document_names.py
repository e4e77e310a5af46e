"""Document names and pins (comb_jax/serving/names.py): a namespace apart from content ids, one document per name,
kept in SQLite beside the entries so a restart (or encode_corpus before it) brings names, pins and TTLs back;
and text that is not valid UTF-8 refused with 400 before anything stores it."""

import json
import time

import httpx
import pytest
from server_helpers import MODEL, SERVER_OVERRIDES, RunningServer

from comb_jax.serving.names import DocumentIndex, is_content_id

A, B, C = "Mira keeps her bike in a shed.", "The library closes at six pm.", "Owls hunt at night in the wood."


def post(url: str, path: str, body: dict) -> httpx.Response:
    """json.dumps escapes lone surrogates as \\ud800, as a client's JSON encoder would (httpx's own would refuse)."""
    return httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)


def listed(srv) -> dict:
    r = httpx.get(srv.url + "/v1/documents", timeout=60)
    assert r.status_code == 200, r.text
    return {d["id"]: d for d in r.json()["data"]}


@pytest.fixture(scope="module")
def server(tiny_params, tmp_path_factory):
    srv = RunningServer(tiny_params, store_dir=tmp_path_factory.mktemp("store"))
    yield srv
    srv.stop()


def test_a_name_cannot_take_a_content_id(server):
    """Case 4: a document named `doc-<A's id>` was then served for A's id, and DELETE of A's id unpinned it."""
    a = post(server.url, "/v1/documents", {"documents": [A]}).json()["data"][0]
    r = post(server.url, "/v1/documents", {"documents": [{"id": a["id"], "text": B}], "pin": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents[0].id", r.text
    assert "content id" in r.json()["error"]["message"]
    b = post(server.url, "/v1/documents", {"documents": [{"id": "bee", "text": B}], "pin": True}).json()["data"][0]
    by_id = server.chat("Bike?", [{"id": a["id"]}], max_tokens=6).choices[0].message.content
    assert by_id == server.chat("Bike?", [A], max_tokens=6).choices[0].message.content  # A's id is A
    assert httpx.delete(f"{server.url}/v1/documents/{a['id']}").status_code == 200
    assert listed(server)[b["id"]]["pinned"]  # DELETE of A's id leaves B alone
    assert httpx.delete(f"{server.url}/v1/documents/bee").json()["pinned"] is False
    assert is_content_id(a["id"]) and not is_content_id("bee") and not is_content_id(a["id"] + "0")


def test_a_name_maps_to_one_document_and_a_reupload_says_what_it_replaced(server):
    """Case 4: many uploads under one name all kept the name."""
    first = post(server.url, "/v1/documents", {"documents": [{"id": "manual", "text": A}]}).json()["data"][0]
    assert first["names"] == ["manual"] and first["replaced"] is None
    second = post(server.url, "/v1/documents", {"documents": [{"id": "manual", "text": C}]}).json()["data"][0]
    assert second["names"] == ["manual"] and second["replaced"] == first["id"]
    docs = listed(server)
    assert "manual" not in docs[first["id"]]["names"] and docs[second["id"]]["names"] == ["manual"]
    same = post(server.url, "/v1/documents", {"documents": [{"id": "manual", "text": C}]}).json()["data"][0]
    assert same["replaced"] is None  # the same text again replaces nothing
    usage = server.chat("Owls?", [{"id": "manual"}], max_tokens=2).usage.model_dump()
    assert usage["document_misses"] == 0 and usage["document_tokens"] == second["tokens"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/documents", {"documents": [{"id": "s\ud800", "text": A}]}, "documents[0].id"),
    ("/v1/documents", {"documents": ["text \udc00"]}, "documents[0]"),
    ("/v1/completions", {"model": MODEL, "prompt": "p\ud800", "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 1,
                              "documents": [{"id": "d", "text": "\ud800x"}]}, "documents[0].text"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}],
                              "max_tokens": 1}, "messages[0].content"),
])
def test_text_that_is_not_utf8_is_400_naming_the_field(server, path, body, param):
    """Case 6: a lone surrogate got 500 (and, as a document name, was registered: GET /v1/documents was 500 for
    everyone from then on)."""
    r = post(server.url, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "not valid UTF-8" in error["message"] and error["code"] == "invalid_text"
    listed(server)  # the listing still answers


def test_names_pins_and_ttls_survive_a_restart(tiny_params, tmp_path):
    """Case 5: a pinned, named upload was 404 and unpinned after a restart."""
    first = RunningServer(tiny_params, store_dir=tmp_path)
    try:
        r = post(first.url, "/v1/documents", {"documents": [{"id": "kept", "text": A}], "pin": True})
        kept = r.json()["data"][0]
        ttl = post(first.url, "/v1/documents", {"documents": [{"id": "brief", "text": B}], "ttl_s": 3600})
        ttl = ttl.json()["data"][0]
    finally:
        first.stop()
    second = RunningServer(tiny_params, store_dir=tmp_path)
    try:
        docs = listed(second)
        assert docs[kept["id"]]["names"] == ["kept"] and docs[kept["id"]]["pinned"]
        assert docs[kept["id"]]["tier"] == "device"  # the pin brought it back into the pool
        assert docs[ttl["id"]]["pinned_until"] == pytest.approx(ttl["pinned_until"])
        usage = second.chat("Bike?", [{"id": "kept"}], max_tokens=2).usage.model_dump()
        assert usage["document_hits"]["device"] == 1
        r = httpx.delete(f"{second.url}/v1/documents/kept")
        assert r.status_code == 200 and r.json()["pinned"] is False
    finally:
        second.stop()
    third = RunningServer(tiny_params, store_dir=tmp_path)
    try:
        assert not listed(third)[kept["id"]]["pinned"]  # the unpin is durable too
    finally:
        third.stop()


def test_encode_corpus_names_are_served(tmp_path, capsys):
    """Case 5: names given to encode_corpus (`corpus-5`) were 404 on the server."""
    from server_helpers import server_config

    from comb_jax.serving import encode_corpus
    from comb_jax.weights.resolve import load_model

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"corpus-{i}", "text": t}) for i, t in enumerate([A, B, C])))
    store = tmp_path / "store"
    assert encode_corpus.main(["--config", "tiny_comb", "--input", str(corpus), "--checkpoint", "none",
                               "--store-dir", str(store), *SERVER_OVERRIDES]) == 0
    capsys.readouterr()
    _, params = load_model(server_config(), "none")
    server = RunningServer(params, store_dir=store)
    try:
        usage = server.chat("Owls?", [{"id": "corpus-2"}], max_tokens=2).usage.model_dump()
        assert usage["document_hits"]["disk"] == 1 and usage["document_misses"] == 0
        assert sorted(n for d in listed(server).values() for n in d["names"]) == ["corpus-0", "corpus-1", "corpus-2"]
    finally:
        server.stop()


def test_the_index_is_durable_and_transactional(tmp_path):
    index = DocumentIndex(tmp_path / "index.sqlite")
    index.set_name("n", "doc-" + "a" * 32)
    index.set_name("n", "doc-" + "b" * 32)
    index.set_pin("doc-" + "b" * 32, float("inf"))
    index.set_pin("doc-" + "c" * 32, time.time() + 60)
    index.clear_pin("doc-" + "c" * 32)
    index.close()
    again = DocumentIndex(tmp_path / "index.sqlite")
    assert again.names() == {"n": "doc-" + "b" * 32}
    assert again.pins() == {"doc-" + "b" * 32: float("inf")}
