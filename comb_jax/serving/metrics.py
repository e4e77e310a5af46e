"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TIERS = ("device", "host", "disk")


class ServerMetrics:
    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("comb_time_to_first_token_seconds", "Time from arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("comb_request_latency_seconds", "End-to-end latency of a generation request",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("comb_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("comb_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("comb_generated_tokens", "Tokens generated", registry=r)
        self.document_tokens = Counter("comb_document_tokens", "Document tokens read by requests", registry=r)
        self.cached_document_tokens = Counter("comb_cached_document_tokens",
                                              "Document tokens served from a PICache tier", registry=r)
        self.picache_hits = Counter("comb_picache_hits", "PICache lookups served, by tier", ["tier"], registry=r)
        self.picache_misses = Counter("comb_picache_misses", "PICache lookups that had to encode", registry=r)
        # mode prefix: whole prompt pages read from the prefix cache / prefilled, and the prompt tokens behind them
        self.prefix_page_hits = Counter("comb_prefix_page_hits", "Prompt pages read from the prefix cache",
                                        registry=r)
        self.prefix_page_misses = Counter("comb_prefix_page_misses", "Whole prompt pages prefilled (prefix mode)",
                                          registry=r)
        self.prefix_prompt_tokens = Counter("comb_prefix_prompt_tokens", "Prompt tokens of prefix-mode requests",
                                            registry=r)
        self.prefix_cached_tokens = Counter("comb_prefix_cached_tokens",
                                            "Prompt tokens whose KV came from the prefix cache", registry=r)
        self.prefix_hit_rate = Gauge("comb_prefix_token_hit_rate",
                                     "Prompt tokens read from the prefix cache / prompt tokens, since the start",
                                     registry=r)
        self.prefix_hit_rate.set_function(self._prefix_rate)
        self.pool_pages_in_use = Gauge("comb_pool_pages_in_use", "Device pool pages holding entries", registry=r)
        self.pool_pages = Gauge("comb_pool_pages", "Device pool pages in all", registry=r)
        self.host_entries = Gauge("comb_host_tier_entries", "PICache entries in host memory", registry=r)
        self.queue_depth = Gauge("comb_queue_depth", "Requests waiting for a decode slot", registry=r)
        self.in_flight = Gauge("comb_requests_in_flight", "Generation requests queued or decoding", registry=r)
        self.active_slots = Gauge("comb_active_slots", "Decode slots in use", registry=r)
        self.tokens_per_second = Gauge("comb_generated_tokens_per_second",
                                       f"Tokens generated per second over the last {window_s:g} s", registry=r)
        for tier in TIERS:  # export zeros from the start
            self.picache_hits.labels(tier=tier)
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._prefix_tokens = [0, 0]  # prompt, cached (for the hit rate gauge)
        self.tokens_per_second.set_function(self._rate)

    def tokens(self, n: int):
        """Count generated tokens (called by the scheduler per decode step)."""
        if n <= 0:
            return
        self.generated_tokens.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def prefix_prompt(self, tokens: int, cached_tokens: int, page_hits: int, page_misses: int):
        """Count one prefix-mode prompt (called by the scheduler when it is admitted)."""
        self.prefix_page_hits.inc(page_hits)
        self.prefix_page_misses.inc(page_misses)
        self.prefix_prompt_tokens.inc(tokens)
        self.prefix_cached_tokens.inc(cached_tokens)
        with self._lock:
            self._prefix_tokens[0] += tokens
            self._prefix_tokens[1] += cached_tokens

    def _prefix_rate(self) -> float:
        with self._lock:
            prompt, cached = self._prefix_tokens
        return cached / prompt if prompt else 0.0

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s
