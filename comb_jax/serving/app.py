"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of the scheduler.

    python serve.py --http --config smollm2_comb --port 8000 [--store-dir DIR] [--when-full reject|wait]

Endpoints: POST /v1/chat/completions and /v1/completions (OpenAI shapes, plus `documents`; `stream: true` sends
server-sent events), POST/GET /v1/documents and DELETE /v1/documents/{id}, GET /v1/models, /health, /metrics.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 names the bad field, 404 an unknown
model or document, 413 a body over --max-body-mb or documents the pool can never hold, 429 a pool full of pinned
pages or a full queue (--max-queue; with Retry-After), 503 while warming up or when a store write fails.
A 200 from POST /v1/documents means every entry is on disk (written, fsynced, renamed) when a store dir is set.
A client that disconnects has its request cancelled: its slot and pages are freed at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from comb_jax.paths import CACHE_DIR
from comb_jax.serving import api_schema
from comb_jax.serving.engine import Engine
from comb_jax.serving.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, BodyLimit
from comb_jax.serving.metrics import ServerMetrics
from comb_jax.serving.protocol import (
    APIError,
    ParseContext,
    parse_chat,
    parse_completion,
    parse_document_upload,
)
from comb_jax.serving.scheduler import Job, Scheduler
from comb_jax.serving.store import PICacheStore, check_store_dir, pool_layout, store_fingerprint
from comb_jax.text.codec import make_codec
from comb_jax.weights.resolve import load_model

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25
DEFAULT_STORE_DIR = CACHE_DIR / "picache"


def create_app(scheduler: Scheduler, model_name: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app; its lifespan starts the scheduler thread (warm-up runs there: 503 until it is done) and stops it."""
    metrics: ServerMetrics = scheduler.metrics
    engine = scheduler.engine
    parse_ctx = ParseContext(scheduler.codec, model_name, engine.serve.max_new_tokens, engine.mode,
                             scheduler.find_document)

    @asynccontextmanager
    async def lifespan(_app):
        if scheduler.thread is None:
            scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="comb-jax", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=getattr(e, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                     else None).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(endpoint=getattr(route, "path", "other"), status=str(response.status_code)).inc()
        return response

    def ensure_ready():
        if scheduler.failed is not None:
            raise APIError(503, f"the server failed to start: {type(scheduler.failed).__name__}: {scheduler.failed}",
                           code="unavailable")
        if not scheduler.ready.is_set():
            raise APIError(503, "the server is warming up (compiling); retry shortly", code="warming_up")

    async def read_json(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    @app.get("/health")
    async def health():
        if scheduler.failed is not None:
            return JSONResponse({"status": "failed", "error": str(scheduler.failed)}, status_code=503)
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return {"status": "ok", "model": model_name, "mode": engine.mode, "slots": scheduler.slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "comb-jax"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def generate(request: Request, chat: bool):
        ensure_ready()
        body = await read_json(request)
        gen = (parse_chat if chat else parse_completion)(body, parse_ctx)
        scheduler.check(gen, "messages" if chat else "prompt")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, payload):  # scheduler thread -> this request's event loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is gone (server stopping)
                pass

        job = Job(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", gen, on_event)
        created = int(time.time())
        scheduler.submit(job)
        finished = False
        try:
            first = await next_event(request, events, job)
            if first is None:
                return Response(status_code=499)  # the client is gone
            if first[0] == "error":
                raise first[1]
            if gen.stream:
                finished = True  # the stream owns the job from here
                return StreamingResponse(stream(job, chat, created, first, events), media_type="text/event-stream")
            event = first
            while event[0] == "delta":
                event = await next_event(request, events, job)
                if event is None:
                    return Response(status_code=499)
            if event[0] == "error":
                raise event[1]
            finished = True
            return completion_body(job, chat, created, event[1])
        finally:
            if not finished:
                job.cancel()

    async def next_event(request: Request, events: asyncio.Queue, job: Job):
        """The job's next event, or None when the client disconnected (the job is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None

    def completion_body(job: Job, chat: bool, created: int, outcome: dict) -> dict:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome["text"]},
                      "finish_reason": outcome["finish_reason"], "logprobs": None}
        else:
            choice = {"index": 0, "text": outcome["text"], "finish_reason": outcome["finish_reason"],
                      "logprobs": None}
        return {"id": job.id, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": outcome["usage"],
                "documents": outcome["documents"]}

    async def stream(job: Job, chat: bool, created: int, first, events: asyncio.Queue):
        def chunk(text: str | None, finish_reason=None, usage=None, role=False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            else:
                choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
            body = {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model_name, "choices": [] if usage else choices}
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        done = False
        try:
            if chat:
                yield chunk(None, role=True)
            event = first
            while True:
                kind, payload = event
                if kind == "delta":
                    yield chunk(payload)
                elif kind == "error":
                    yield f"data: {json.dumps(payload.body())}\n\n"
                    break
                else:
                    yield chunk(None, finish_reason=payload["finish_reason"])
                    if job.gen.include_usage:
                        yield chunk(None, usage=payload["usage"])
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away mid-stream
                job.cancel()

    @app.post("/v1/chat/completions", openapi_extra=api_schema.chat_body(engine.serve.max_new_tokens))
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions", openapi_extra=api_schema.completion_body(engine.serve.max_new_tokens))
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/documents", openapi_extra=api_schema.documents_body())
    async def add_documents(request: Request):
        ensure_ready()
        docs, pin, ttl_s = parse_document_upload(await read_json(request), parse_ctx)
        for i, d in enumerate(docs):
            length = len(scheduler.entry_ids(d.ids))
            if length > engine.max_entry_tokens:
                raise APIError(400, f"'documents[{i}]' has {length} tokens; a document may have at most "
                                    f"{engine.max_entry_tokens}", param=f"documents[{i}]",
                               code="document_too_long")
        scheduler.check_upload(docs)
        data, durable = await asyncio.wrap_future(scheduler.call(scheduler.encode_documents_durably, docs, pin,
                                                                 ttl_s))
        try:  # acknowledged means durable: answer only once every entry is on disk (when there is a store dir)
            for write in durable:
                await asyncio.wrap_future(write)
        except Exception as e:
            raise APIError(503, f"the documents were encoded but could not be written to the store: {e}",
                           param="documents", code="store_write_failed") from None
        return {"object": "list", "data": data}

    @app.get("/v1/documents")
    async def list_documents():
        ensure_ready()
        return {"object": "list", "data": await asyncio.wrap_future(scheduler.call(scheduler.list_documents))}

    @app.delete("/v1/documents/{doc_id}")
    async def unpin_document(doc_id: str):
        ensure_ready()
        found = await asyncio.wrap_future(scheduler.call(scheduler.unpin, doc_id))
        if found is None:
            raise APIError(404, f"no document {doc_id!r} is known", param="id", code="document_not_found")
        return found

    return app


# ---------------------------------------------------------------------------------------------------------
# Building and running a server


def build_server(cfg, params, codec, *, mode: str = "comb", store_dir: str | Path | None = None,
                 host_cache_bytes: int = 1 << 30, when_full: str = "reject", full_wait_s: float = 30.0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE):
    """(app, scheduler) for a model. store_dir None: host-memory tier only (nothing outlives the process)."""
    engine = Engine.for_codec(cfg, params, codec, mode)
    store = None
    if store_dir is not None and str(store_dir).strip().lower() in ("", "none"):
        store_dir = None
    if mode == "comb":
        fp = store_fingerprint(engine.pool.fingerprint, pool_layout(engine.pool))
        store = PICacheStore(fp, store_dir, host_cache_bytes)
    scheduler = Scheduler(engine, codec, store, when_full=when_full, full_wait_s=full_wait_s, max_queue=max_queue)
    return create_app(scheduler, cfg.name, max_body_bytes), scheduler


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread, on a free port (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn  # the server's own dependency: not needed to build the app

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout_s: float = 30.0):
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


def wait_ready(url: str, timeout_s: float = 600.0):
    """Poll GET /health until 200 (warm-up done); raises on timeout or a failed start."""
    import httpx  # a test / client dependency (the dev extra)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise RuntimeError(f"server failed to start: {r.json().get('error')}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def run_server(cfg, checkpoint: str | None, *, mode: str = "comb", host: str = "127.0.0.1", port: int = 8000,
               store_dir: str | None = None, host_cache_mb: float = 1024, when_full: str = "reject",
               full_wait_s: float = 30.0, max_body_mb: float = DEFAULT_MAX_BODY_BYTES / (1 << 20),
               max_queue: int = DEFAULT_MAX_QUEUE) -> int:
    """`serve.py --http`: load the model, build the server, serve until interrupted."""
    import uvicorn  # the server's own dependency: not needed to build the app in tests

    check_store_dir(store_dir)  # before the model loads: a bad directory fails in a second, in one line
    cfg, params = load_model(cfg, checkpoint)
    codec = make_codec(cfg)
    app, _ = build_server(cfg, params, codec, mode=mode, store_dir=store_dir,
                          host_cache_bytes=int(host_cache_mb * (1 << 20)), when_full=when_full,
                          full_wait_s=full_wait_s, max_body_bytes=int(max_body_mb * (1 << 20)), max_queue=max_queue)
    log.warning("serving %s (%s) on http://%s:%d (warming up: /health says when ready)", cfg.name, mode, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
