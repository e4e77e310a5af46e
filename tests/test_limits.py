"""Limits on what one client can send (comb_jax/serving/limits.py) and the right status for what can never be
served: a body limit (413 naming it), a bounded queue (429 with Retry-After), 413 for an upload larger than the
pool, and a --store-dir that cannot be used refused in one line before the model loads."""

import threading
import time

import httpx
import pytest
from server_helpers import MODEL, RunningServer

from comb_jax.cli import serve
from comb_jax.errors import run
from comb_jax.serving import encode_corpus

LIMIT = 20_000
QUEUE = 2


@pytest.fixture(scope="module")
def server(tiny_params):
    srv = RunningServer(tiny_params, max_body_bytes=LIMIT, max_queue=QUEUE)
    yield srv
    srv.stop()


def chat_body(text: str = "Hi", max_tokens: int = 2) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    """Case 7: a 50 MB body used to be read whole (613 MB -> 1.49 GB) and block /health."""
    big = {"model": MODEL, "documents": ["x" * (LIMIT + 1)]}
    r = httpx.post(server.url + "/v1/documents", json=big, timeout=60)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(LIMIT // 1000 + 2):
            yield b" " * 1000

    r = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(LIMIT) in r.json()["error"]["message"], r.text
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    ok = httpx.post(server.url + "/v1/chat/completions", json=chat_body("x" * 30), timeout=60)
    assert ok.status_code == 200, ok.text  # under the limit: served


def test_a_full_queue_is_429_with_retry_after(server):
    """Case 7: every request used to wait, however many; now QUEUE wait and the next is told to come back."""
    gate = threading.Event()
    server.scheduler.call(gate.wait)  # the scheduler thread waits here: nothing is admitted meanwhile
    answers = []

    def ask():
        answers.append(httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=120).status_code)

    waiting = [threading.Thread(target=ask) for _ in range(QUEUE)]
    try:
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 30
        while len(server.scheduler.waiting) < QUEUE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(server.scheduler.waiting) == QUEUE
        r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        assert int(r.headers["retry-after"]) >= 1
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        gate.set()
        for t in waiting:
            t.join()
    assert answers == [200] * QUEUE  # the ones that waited are served


def test_an_upload_that_can_never_fit_the_pool_is_413(server):
    """Case 8: 40 distinct documents of 2 pages each need 80 pages; the pool has 32. That used to be 429 (retry),
    which can never succeed."""
    docs = [f"A never-fitting document {i:03d}." for i in range(40)]
    r = httpx.post(server.url + "/v1/documents", json={"documents": docs}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "documents_too_large", r.text
    assert "32" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/documents", json={"documents": docs[:4]}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("prog", ["serve", "encode_corpus"])
def test_a_store_dir_that_cannot_be_created_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, prog):
    """Case 8: it was a 34-line traceback after the model loaded."""
    from comb_jax.serving import app

    def never(*args):
        raise AssertionError("the model must not load")

    for module in (app, encode_corpus):  # each imports the resolver by name
        monkeypatch.setattr(module, "load_model", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = blocker / "store"
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('"one document"\n')
    if prog == "serve":
        main, argv = serve.main, ["--http", "--config", "tiny_comb", "--store-dir", str(store)]
    else:
        main, argv = encode_corpus.main, ["--config", "tiny_comb", "--input", str(corpus), "--store-dir", str(store)]
    with pytest.raises(SystemExit) as exit_info:
        run(main, prog, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--store-dir" in err and "Traceback" not in err
