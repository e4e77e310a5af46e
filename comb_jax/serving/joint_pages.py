"""Joint encoding of KV blocks (arXiv 2601.03067): pages whose K and V are close share one physical page.

A cache stored in pages of `page_tokens` tokens keeps its standard layout (a page table maps each chunk's logical
pages to physical pages); at store time every new page is compared with the pages already stored, and when its
distance to the closest one is within `threshold` the chunk's page table points at that page instead and the new
page is freed. Physical pages are reference counted, so one is freed only when no chunk maps to it any more.

Distance of a new page n to a stored page s, over the n page's valid tokens t (a chunk's last page is partly
filled; s must hold at least as many valid tokens) and every layer, head and channel:

    d(n, s) = max(||K_n - K_s|| / ||K_n||, ||V_n - V_s|| / ||V_n||)        (Frobenius norms over the valid tokens)

threshold < 0 turns joint encoding off; 0 fuses exact duplicates only (e.g. the causal backbone KV of a common
prefix page, or re-encodings of the same chunk); larger values trade accuracy for memory (the eval measures both).

`PageSharing` is the store-time option of `pool.PagePool`, whatever its pages hold: the serving engine's Comb PICaches
(`serve.joint_page_threshold`) and the chunk caches of every mode of `pic_modes.PicRunner` (backbone KV of naive /
rerotate / epic, KV packets, Comb PICaches: the eval's `--joint-threshold`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.serving import quant


def relative_distances(new_k, new_v, pages_k, pages_v, valid: int):
    """d(new, s) for every stored page s. new_k, new_v [E, T, K, D]; pages_k, pages_v [E, S, T, K, D]; only the
    first `valid` tokens count -> [S] float32. Works on numpy or jax arrays (`xp` is picked from the input)."""
    xp = jnp if isinstance(pages_k, jax.Array) else np
    token = (xp.arange(new_k.shape[1]) < valid)[None, :, None, None]

    def rel(new, pages):
        new = xp.where(token, new.astype(xp.float32), 0)
        diff = xp.where(token[:, None], pages.astype(xp.float32) - new[:, None], 0)
        return xp.sqrt((diff ** 2).sum(axis=(0, 2, 3, 4))) / xp.maximum(xp.sqrt((new ** 2).sum()), 1e-30)

    return xp.maximum(rel(new_k, pages_k), rel(new_v, pages_v))


def closest_page(distances, eligible) -> tuple[int, float]:
    """(index, distance) of the closest eligible page; (-1, inf) when none is eligible."""
    distances = np.where(eligible, np.asarray(distances, np.float64), np.inf)
    if not len(distances) or not np.isfinite(distances.min()):
        return -1, float("inf")
    i = int(np.argmin(distances))
    return i, float(distances[i])


@partial(jax.jit, static_argnames=("valid",))
def _pool_distances(pool_k, pool_v, page, *, valid: int):
    """d(pool page `page`, every pool page) -> [P]; int8 pools are compared dequantised."""
    dense = lambda pool: quant.load(pool, jnp.float32) if isinstance(pool, quant.Int8Pages) else pool  # noqa: E731
    k, v = dense(pool_k), dense(pool_v)
    return relative_distances(k[:, page], v[:, page], k, v, valid)


class PageSharing:
    """Reference counts and valid-token counts of a PagePool's physical pages, and the store-time fusion.

    With threshold < 0 nothing is fused and every page has refcount 1 while in use: the pool behaves as without it.
    """

    def __init__(self, num_pages: int, page_tokens: int, threshold: float = -1.0):
        self.threshold, self.page_tokens = threshold, page_tokens
        self.refs = np.zeros(num_pages, np.int32)
        self.valid = np.zeros(num_pages, np.int32)  # tokens the page holds (its owner chunk's tail page: fewer)
        self.written = np.zeros(num_pages, bool)
        self.fused_pages = 0  # logical pages served from another chunk's physical page, since the start

    def allocate(self, pages: list[int], length: int):
        """Fresh pages for a chunk of `length` tokens."""
        for i, p in enumerate(pages):
            self.refs[p] = 1
            self.valid[p] = min(self.page_tokens, length - i * self.page_tokens)
            self.written[p] = False

    def release(self, pages: list[int]) -> list[int]:
        """Drop one reference to each page; returns the pages no chunk maps to any more (free them)."""
        freed = []
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.written[p] = False
                freed.append(p)
        return freed

    def fuse(self, pool, entries) -> list[int]:
        """After `entries` were written: remap each of their pages to the closest other written page within the
        threshold (entry.pages is updated in place). Returns the physical pages this freed."""
        freed = []
        for entry in entries:
            for i, page in enumerate(entry.pages):
                self.written[page] = True
                if self.threshold < 0:
                    continue
                valid = int(self.valid[page])
                eligible = self.written & (self.refs > 0) & (self.valid >= valid)
                eligible[page] = False
                if not eligible.any():
                    continue
                distances = np.asarray(_pool_distances(pool.k, pool.v, jnp.int32(page), valid=valid))
                target, distance = closest_page(distances, eligible)
                if target >= 0 and distance <= self.threshold:
                    entry.pages[i] = target
                    self.refs[target] += 1
                    freed += self.release([page])
                    self.fused_pages += 1
        return freed

    def compression(self, entries) -> float:
        """Logical pages of `entries` / distinct physical pages they use (1.0 without sharing)."""
        logical = [p for e in entries for p in e.pages]
        return len(logical) / max(1, len(set(logical)))
