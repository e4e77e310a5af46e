"""A real server (uvicorn in a thread) on the tiny model, with small buckets so warm-up compiles little."""

from __future__ import annotations

from comb_jax.config import load_config
from comb_jax.serving.app import ServerThread, build_server, wait_ready
from comb_jax.text.codec import make_codec

# 16-token pages, a 32-page pool, one prompt bucket, one context bucket (8 pages): a request takes up to four
# 30-byte documents. max_new_tokens is large so a request can still be running when its client leaves.
SERVER_OVERRIDES = ["serve.page_tokens=16", "serve.pool_tokens=512", "serve.prompt_buckets=(64,)",
                    "serve.context_buckets=(128,)", "serve.chunk_buckets=(32, 64)", "serve.max_chunk_tokens=64",
                    "serve.max_context_tokens=128", "serve.max_batch=4", "serve.max_new_tokens=200",
                    "serve.encode_batch=4"]
MODEL = "tiny_comb"


def server_config(extra=()):
    return load_config("tiny_comb", [*SERVER_OVERRIDES, *extra])


class RunningServer:
    """A started, warmed-up server; `.url`, `.client` (openai), `.scheduler`; `stop()` ends it."""

    def __init__(self, params, store_dir=None, overrides=(), ready_timeout_s: float = 300, **kwargs):
        import openai

        self.cfg = server_config(overrides)
        self.codec = make_codec(self.cfg)
        app, self.scheduler = build_server(self.cfg, params, self.codec, store_dir=store_dir, **kwargs)
        self.thread = ServerThread(app).start()
        self.url = self.thread.url
        wait_ready(self.url, timeout_s=ready_timeout_s)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def chat(self, question: str, documents=(), max_tokens: int = 8, **kwargs):
        return self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=kwargs.pop("temperature", 0), extra_body={"documents": list(documents)}, **kwargs)

    def stop(self):
        self.thread.stop()
