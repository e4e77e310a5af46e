"""Acknowledged means durable: a 200 from POST /v1/documents and encode_corpus's progress count only entries that
are on disk, so `kill -9` right after loses none; a damaged entry is dropped, logged once, and written again."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from server_helpers import SERVER_OVERRIDES, RunningServer

from comb_jax.serving.store import DiskTier, PICacheStore

REPO = Path(__file__).resolve().parents[1]
WRITE_DELAY_S = 0.1  # each disk write is slowed down, so "acknowledged before durable" cannot hide
# A child process with slow disk writes, then the CLI given in argv[1:] (serve.py or encode_corpus).
SLOW_WRITES = f"""
import sys, time
from comb_jax.serving import store
write = store.DiskTier.write
store.DiskTier.write = lambda self, *a: (time.sleep({WRITE_DELAY_S}), write(self, *a))[1]
from comb_jax.errors import run
if sys.argv[1] == "serve":
    from comb_jax.cli import serve
    sys.exit(run(serve.main, "serve.py", sys.argv[2:]))
from comb_jax.serving import encode_corpus
sys.exit(run(encode_corpus.main, "encode_corpus", sys.argv[2:]))
"""


def entries_on_disk(root: Path) -> int:
    """Complete entries that read back whole (ids, arrays and checksum), under any fingerprint."""
    count = 0
    for fp_dir in (p for p in root.iterdir() if p.is_dir()):
        for entry in (p for p in fp_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            meta = json.loads((entry / "meta.json").read_text())
            count += DiskTier(root, meta["fingerprint"]).read(entry.name, meta["ids"]) is not None
    return count


def child(kind: str, args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-c", SLOW_WRITES, kind, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=open(tmp_path / f"{kind}.err", "w"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_200_upload_is_on_disk_at_once(tiny_params, tmp_path):
    """Case 3, in process: right after the 200 (no waiting, no flush) every acknowledged entry is on disk."""
    server = RunningServer(tiny_params, store_dir=tmp_path)
    try:
        docs = [f"Durable document number {i:02d}." for i in range(6)]
        r = httpx.post(server.url + "/v1/documents", json={"documents": docs}, timeout=60)
        assert r.status_code == 200, r.text
        assert entries_on_disk(tmp_path) == len(docs)
    finally:
        server.stop()


def test_kill_9_right_after_a_200_upload_loses_nothing(tmp_path):
    """Case 3: a server process is killed with SIGKILL the moment POST /v1/documents answers 200."""
    port, store = free_port(), tmp_path / "store"
    proc = child("serve", ["--http", "--config", "tiny_comb", "--checkpoint", "none", "--port", str(port),
                           "--store-dir", str(store), *SERVER_OVERRIDES], tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900  # a loaded 2-core machine can take minutes to start a child
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.err").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        docs = [f"Acknowledged document {i:02d}." for i in range(15)]
        r = httpx.post(url + "/v1/documents", json={"documents": docs}, timeout=120)
        proc.send_signal(signal.SIGKILL)
        assert r.status_code == 200, r.text
    finally:
        proc.kill()
        proc.wait()
    assert entries_on_disk(store) == len(docs)


def test_kill_9_during_encode_corpus_loses_no_counted_entry(tmp_path):
    """Case 3: encode_corpus's progress bar counts durable entries; kill -9 once it shows some (and not all):
    at least that many entries are on disk, whole."""
    n = 60
    corpus, store = tmp_path / "docs.jsonl", tmp_path / "store"
    corpus.write_text("\n".join(json.dumps({"id": f"corpus-{i}", "text": f"Corpus text {i:03d}."})
                                for i in range(n)) + "\n")
    proc = child("encode", ["--config", "tiny_comb", "--input", str(corpus), "--checkpoint", "none",
                            "--store-dir", str(store), *SERVER_OVERRIDES], tmp_path)
    shown = 0
    try:
        deadline = time.monotonic() + 900  # a loaded 2-core machine can take minutes to start a child
        while time.monotonic() < deadline and proc.poll() is None:
            counts = [int(a) for a, b in re.findall(r"(\d+)/(\d+)", (tmp_path / "encode.err").read_text())
                      if int(b) == n]
            shown = max(counts, default=0)
            if shown >= 10:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert entries_on_disk(store) >= shown >= 10
    assert shown < n, f"the run was killed only after it counted all {n}: the middle was not tested"


def _arrays(length: int = 5) -> dict:
    rng = np.random.default_rng(0)
    return {"k": rng.standard_normal((2, length, 2, 4)).astype(np.float32),
            "v": rng.standard_normal((2, length, 2, 4)).astype(np.float32)}


def test_a_damaged_meta_json_is_dropped_logged_once_and_rewritten(tmp_path, caplog):
    """Case 8: a damaged meta.json used to make `has` say yes and `read` say no, forever (a silent miss after every
    restart); now the entry is dropped with one warning and the next write puts it back."""
    ids = [5, 6, 7, 8, 9]
    store = PICacheStore("fp-meta", tmp_path)
    store.persist(ids, _arrays()).result()
    store.close()
    meta = tmp_path / "fp-meta"[:24] / store.key(ids) / "meta.json"
    meta.write_text('{"format": 1, "fingerpr')  # torn
    caplog.set_level(logging.WARNING, logger="comb_jax.serving.store")
    again = PICacheStore("fp-meta", tmp_path)
    assert again.get(ids) is None and again.get(ids) is None  # a miss...
    assert sum("dropping damaged entry" in r.message for r in caplog.records) == 1  # ...said once
    assert again.durable(ids) is None  # not on disk: the next use writes it
    again.persist(ids, _arrays()).result()
    got = PICacheStore("fp-meta", tmp_path).get(ids)
    assert got is not None and got[1] == "disk" and np.array_equal(got[0]["k"], _arrays()["k"])


def test_a_failed_write_fails_the_upload_not_the_server(tiny_params, tmp_path, monkeypatch):
    """A 200 is a promise: when the entry cannot be written (disk full, read-only), the upload gets 503 naming the
    store, and the documents still serve from memory."""
    server = RunningServer(tiny_params, store_dir=tmp_path)
    try:
        def full(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(DiskTier, "write", full)
        r = httpx.post(server.url + "/v1/documents", json={"documents": ["A document the disk cannot take."]},
                       timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_write_failed", r.text
        assert "No space left" in r.json()["error"]["message"]
        usage = server.chat("Disk?", ["A document the disk cannot take."], max_tokens=2).usage.model_dump()
        assert usage["document_misses"] == 0  # it is in the pool
        monkeypatch.undo()  # space again: the same upload is written and acknowledged
        r = httpx.post(server.url + "/v1/documents", json={"documents": ["A document the disk cannot take."]},
                       timeout=60)
        assert r.status_code == 200 and entries_on_disk(tmp_path) == 1, r.text
    finally:
        server.stop()
