"""Offline corpus encoding into the persistent PICache store (`python -m comb_jax.serving.encode_corpus`).

Input: JSONL, one document per line, either a JSON string or {"id": name, "text": ...}. Each document is encoded
once (documents already in the store are skipped) by the same code the server runs (`Scheduler.encode_documents`),
so a server started later with the same model, tokenizer and store directory serves them from disk. The progress
bar counts documents whose entry is durable on disk, and the run returns only when all are.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import wait
from pathlib import Path

from tqdm import tqdm

from comb_jax.serving.protocol import Document

MAX_UNWRITTEN = 256  # encoded documents waiting for their disk write, at most


class CorpusError(ValueError):
    pass


def read_corpus(path: str | Path) -> list[tuple[str | None, str]]:
    """(name, text) per non-blank line; a bad line raises CorpusError naming it."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"--input {path} cannot be read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise CorpusError(f"{path} line {n}: invalid JSON: {e}") from None
        if isinstance(obj, str):
            name, text = None, obj
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            name, text = obj.get("id"), obj["text"]
            if name is not None and not isinstance(name, str):
                name = str(name)
        else:
            raise CorpusError(f"{path} line {n}: expected a JSON string or an object with 'text'")
        if not text:
            raise CorpusError(f"{path} line {n}: empty document")
        out.append((name, text))
    return out


def encode_corpus(scheduler, documents: list[tuple[str | None, str]], batch: int | None = None,
                  progress: bool = True) -> dict:
    """Encode every document into the scheduler's store (the scheduler thread must not be running).

    Returns {"documents": n, "encoded": newly encoded, "found": already cached, "ids": [document id per input]}.
    """
    if scheduler.thread is not None:
        raise RuntimeError("encode_corpus drives the scheduler directly: do not start its thread")
    limit = scheduler.engine.max_entry_tokens
    batch = batch or scheduler.engine.serve.encode_batch
    docs = []
    for i, (name, text) in enumerate(documents):
        doc = Document(scheduler.codec.encode(text), text, name)
        if len(scheduler.entry_ids(doc.ids)) > limit:
            raise CorpusError(f"document {i} ({name or 'unnamed'}) has {len(doc.ids)} tokens; at most {limit} "
                              "(serve.max_chunk_tokens)")
        docs.append(doc)
    ids, encoded, writes = [], 0, []
    with tqdm(total=len(docs), desc="encode corpus (on disk)", unit="doc", file=sys.stderr,
              disable=not progress) as bar:
        count_durable = _durable_counter(bar)
        for start in range(0, len(docs), batch):
            rows, durable = scheduler.encode_documents_durably(docs[start:start + batch], pin=False, ttl_s=None)
            for row, write in zip(rows, durable):
                ids.append(row["id"])
                encoded += row["found_in"] == "encoded"
                write.add_done_callback(count_durable)
            writes += durable
            wait(writes[:-MAX_UNWRITTEN])  # encoding outruns disk writes: bound what waits in memory
        wait(writes)  # the bar reaches the total only when every entry is on disk
    failed = [w.exception() for w in writes if w.exception() is not None]
    if failed:
        raise CorpusError(f"{len(failed)} of {len(docs)} documents could not be written to the store: {failed[0]}")
    return {"documents": len(docs), "encoded": encoded, "found": len(docs) - encoded, "ids": ids}


def _durable_counter(bar):
    """A done-callback (run on the store's writer thread) that advances the bar by one durable document."""
    lock = threading.Lock()

    def count(write):
        if write.exception() is None:
            with lock:
                bar.update(1)
    return count
