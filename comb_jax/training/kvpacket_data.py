"""KV Packet training batches: the prompt pieces the eval reads (`text.prompt.prompt_segments`), padded to buckets.

Training and eval see identical ids: a request is prefix + chunks + suffix exactly as the eval's decoder-side modes
build it. The arrays are those `methods.kvpacket.student_hidden` and `kvpacket_loss` read.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from comb_jax.errors import DataError
from comb_jax.model.buckets import bucket_for
from comb_jax.text.prompt import prompt_segments
from comb_jax.training.data import batch_indices


def tokenize(example, codec, tc) -> dict:
    """Example -> the request's pieces as ids (exactly what the eval's decoder-side modes see) and its answer ids."""
    seg = prompt_segments(codec, example.chunks, example.question, tc.max_chunk_tokens)
    answer = codec.answer_ids(example.answer)[: max(1, tc.max_decoder_tokens + 1 - len(seg.suffix))]
    return {"prefix": list(seg.prefix), "chunks": [list(c) for c in seg.chunks], "suffix": list(seg.suffix),
            "answer": answer}


def _bucket(n: int, buckets) -> int:
    return bucket_for(n, buckets, "kvpacket sequence", DataError)


def collate(features: list[dict], tc) -> dict[str, np.ndarray]:
    """Pad tokenized requests into bucketed shapes (see `student_hidden` and `kvpacket_loss` for the arrays)."""
    b = len(features)
    n = max(1, max(len(f["chunks"]) for f in features))  # no chunks at all: one empty (masked) chunk
    lp = -(-max(len(f["prefix"]) for f in features) // 16) * 16
    lc = _bucket(max([len(c) for f in features for c in f["chunks"]] or [1]), tc.chunk_buckets)
    td = _bucket(max(len(f["suffix"]) + len(f["answer"]) - 1 for f in features), tc.decoder_buckets)
    full = [f["prefix"] + sum(f["chunks"], []) + f["suffix"] for f in features]
    s = _bucket(max(len(x) + len(f["answer"]) - 1 for x, f in zip(full, features)), tc.teacher_buckets)
    out = {"prefix_tokens": np.zeros((b, lp), np.int32), "prefix_len": np.zeros((b,), np.int32),
           "chunk_tokens": np.zeros((b, n, lc), np.int32), "chunk_mask": np.zeros((b, n, lc), bool),
           "query_tokens": np.zeros((b, td), np.int32), "targets": np.zeros((b, td), np.int32),
           "loss_mask": np.zeros((b, td), np.float32), "teacher_tokens": np.zeros((b, s), np.int32),
           "teacher_index": np.zeros((b, td), np.int32)}
    for i, f in enumerate(features):
        out["prefix_tokens"][i, :len(f["prefix"])] = f["prefix"]
        out["prefix_len"][i] = len(f["prefix"])
        for j, c in enumerate(f["chunks"]):
            out["chunk_tokens"][i, j, :len(c)] = c
            out["chunk_mask"][i, j, :len(c)] = True
        seq = f["suffix"] + f["answer"]
        out["query_tokens"][i, :len(seq) - 1] = seq[:-1]
        out["targets"][i, :len(seq) - 1] = seq[1:]
        answer_at = len(f["suffix"]) - 1 + np.arange(len(f["answer"]))
        out["loss_mask"][i, answer_at] = 1.0
        teacher = full[i] + f["answer"]
        out["teacher_tokens"][i, :len(teacher) - 1] = teacher[:-1]
        out["teacher_index"][i, answer_at] = len(full[i]) - 1 + np.arange(len(f["answer"]))
    return out


def _collate_indices(indices, examples, codec, tc) -> dict[str, np.ndarray]:
    return collate([tokenize(examples[i], codec, tc) for i in indices], tc)


def train_iterator(examples, codec, tc, seed: int, rows: slice | None = None):
    """Shuffled, repeated, checkpointable batches over the same global order as `data.train_dataset` (`rows`: a
    process's rows of each global batch)."""
    return iter(batch_indices(len(examples), tc, seed, rows)
                .map(partial(_collate_indices, examples=examples, codec=codec, tc=tc)).to_iter_dataset())
