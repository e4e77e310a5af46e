"""The persistent PICache store: tiers, atomic writes, fingerprints, a restarted server and a killed writer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_helpers import SERVER_OVERRIDES, RunningServer, server_config

from comb_jax.serving.store import TMP_PREFIX, PICacheStore

REPO = Path(__file__).resolve().parents[1]
DOCS = ["Mira keeps her bike in a shed.", "The library closes at six pm.", "Owls hunt at night in the wood."]


def arrays_for(seed: int, length: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    return {"k": rng.standard_normal((2, length, 2, 4)).astype(np.float32),
            "v": rng.standard_normal((2, length, 2, 4)).astype(np.float32),
            "k.scale": rng.standard_normal((2, length, 2)).astype(np.float16)}  # any named arrays


def test_disk_roundtrip_fingerprint_ids_and_corruption(tmp_path):
    store = PICacheStore("fingerprint-a", tmp_path)
    ids, arrays = [5, 6, 7, 8, 9], arrays_for(0)
    store.persist(ids, arrays)
    store.close()

    fresh = PICacheStore("fingerprint-a", tmp_path)  # a new process: only the disk tier knows the entry
    got, tier = fresh.get(ids)
    assert tier == "disk" and set(got) == set(arrays)
    assert all(np.array_equal(got[n], arrays[n]) and got[n].dtype == arrays[n].dtype for n in arrays)
    assert fresh.get([5, 6, 7, 8]) is None
    assert PICacheStore("fingerprint-b", tmp_path).get(ids) is None  # another model or dtype: never served

    # the ids are compared, not only the hash: an entry filed under another chunk's key is not served
    other = [1, 2, 3, 4, 5]
    os.rename(fresh.disk.path(fresh.key(ids)), fresh.disk.path(fresh.key(other)))
    assert fresh.get(other) is None and fresh.get(ids) is None

    # a damaged entry is detected by its checksum, dropped, and never served
    fresh.persist(ids, arrays)
    fresh.flush()
    chunk = next(p for p in (fresh.disk.path(fresh.key(ids)) / "v").iterdir() if not p.name.startswith("."))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert fresh.get(ids) is None and not fresh.disk.has(fresh.key(ids))


def test_host_tier_overflow_moves_entries_down_to_disk(tmp_path):
    size = sum(a.nbytes for a in arrays_for(0).values())
    store = PICacheStore("fp", tmp_path, host_bytes=2 * size)
    for i in range(3):
        store.spill([i, i + 1], arrays_for(i))  # what the device pool does on eviction
    store.flush()
    assert [store.tier([i, i + 1]) for i in range(3)] == ["disk", "host", "host"]
    got, tier = store.get([0, 1])
    assert tier == "disk" and np.array_equal(got["k"], arrays_for(0)["k"])
    got, tier = store.get([2, 3])  # a host hit is promoted: it leaves the host tier
    assert tier == "host" and store.tier([2, 3]) is None
    assert PICacheStore("fp", None, host_bytes=0).get([0, 1]) is None  # memory only: nothing persisted


WRITER = r"""
import sys
import numpy as np
from comb_jax.serving.store import PICacheStore

store = PICacheStore("fingerprint-kill", sys.argv[1])
for i in range(1000):
    ids = list(range(i, i + 8))
    arrays = {"k": np.full((2, 8, 4), i, np.float32),
              "v": np.random.default_rng(i).standard_normal((8, 500_000)).astype(np.float32)}  # 16 MB: not instant
    print("writing", i, flush=True)
    store.disk.write(store.key(ids), ids, arrays)
    print("committed", i, flush=True)
"""


def test_killed_writer_leaves_no_corrupt_entry(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    committed, writing = [], None
    for line in proc.stdout:
        kind, i = line.split()
        if kind == "committed":
            committed.append(int(i))
        elif len(committed) >= 2:
            writing = int(i)
            break
    fp_dir = next(tmp_path.iterdir())
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(TMP_PREFIX) for p in fp_dir.iterdir()) and time.monotonic() < deadline:
        pass  # until the entry's temp directory exists: then its arrays are being written
    os.kill(proc.pid, signal.SIGKILL)  # mid-write of entry `writing`
    proc.wait()
    assert any(p.name.startswith(TMP_PREFIX) for p in fp_dir.iterdir()), "the kill did not land mid-write"

    store = PICacheStore("fingerprint-kill", tmp_path)  # the restarted process
    assert not any(p.name.startswith(TMP_PREFIX) for p in fp_dir.iterdir())  # the dead writer's temp is gone
    for i in committed:
        got, tier = store.get(list(range(i, i + 8)))
        assert tier == "disk" and np.all(got["k"] == i)
        assert np.array_equal(got["v"][:, :5], np.random.default_rng(i).standard_normal((8, 500_000))
                              .astype(np.float32)[:, :5])
    assert store.get(list(range(writing, writing + 8))) is None
    assert len(store.disk_entries()) == len(committed)


def test_restarted_server_serves_documents_from_disk(tiny_params, tmp_path):
    first = RunningServer(tiny_params, store_dir=tmp_path)
    try:
        r = httpx.post(first.url + "/v1/documents", json={"documents": DOCS}, timeout=60)
        ids = [d["id"] for d in r.json()["data"]]
        assert [d["found_in"] for d in r.json()["data"]] == ["encoded"] * 3
        answer = first.chat("Where is the bike?", DOCS, max_tokens=10).choices[0].message.content
    finally:
        first.stop()

    second = RunningServer(tiny_params, store_dir=tmp_path)
    try:
        listed = {d["id"]: d for d in httpx.get(second.url + "/v1/documents").json()["data"]}
        assert set(ids) <= set(listed) and all(listed[i]["tier"] == "disk" for i in ids)
        again = second.chat("Where is the bike?", [DOCS[2], DOCS[0], DOCS[1]], max_tokens=10)
        usage = again.usage.model_dump()
        assert usage["document_hits"]["disk"] == 3 and usage["document_misses"] == 0
        assert again.choices[0].message.content == answer
        by_id = second.chat("Where is the bike?", [{"id": i} for i in ids], max_tokens=10)  # ids survive too
        assert by_id.choices[0].message.content == answer
        assert by_id.usage.model_dump()["document_hits"]["device"] == 3
    finally:
        second.stop()


def test_encode_corpus_cli_then_serve(tmp_path, capsys):
    from comb_jax.serving import encode_corpus
    from comb_jax.weights.resolve import load_model

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [DOCS[0], {"id": "lib", "text": DOCS[1]}]) + "\n")
    store = tmp_path / "store"
    argv = ["--config", "tiny_comb", "--input", str(corpus), "--checkpoint", "none", "--store-dir", str(store),
            *SERVER_OVERRIDES]
    assert encode_corpus.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["documents"] == 2 and summary["encoded"] == 2
    assert encode_corpus.main(argv) == 0  # a second run finds them stored
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["found"] == 2

    _, params = load_model(server_config(), "none")
    server = RunningServer(params, store_dir=store)
    try:
        usage = server.chat("Library?", DOCS[:2], max_tokens=4).usage.model_dump()
        assert usage["document_hits"]["disk"] == 2 and usage["document_misses"] == 0
    finally:
        server.stop()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n')
    with pytest.raises(SystemExit):
        from comb_jax.errors import run
        run(encode_corpus.main, "encode_corpus", ["--config", "tiny_comb", "--input", str(bad)])


def test_int8_pool_entries_move_between_pool_and_store(tmp_path):
    """An int8 PICache pool keeps values and scales per page: both travel as named arrays, bit for bit."""
    from comb_jax.serving.engine import serving_mesh
    from comb_jax.serving.pool import PagePool
    from comb_jax.serving.store import pool_layout, read_entry, store_fingerprint, write_entry

    cfg = server_config(["serve.pic_dtype=int8"])
    pool = PagePool(cfg.model, cfg.serve, "encoder-fp", serving_mesh(cfg))
    layout = pool_layout(pool)
    assert set(layout) == {"k.values", "k.scale", "v.values", "v.scale"} and layout["k.values"][0] == "int8"
    assert store_fingerprint("encoder-fp", layout) != store_fingerprint("encoder-fp", {"k": ("float32", (16,)),
                                                                                       "v": ("float32", (16,))})
    ids = list(range(1, 21))  # 20 tokens: two pages, the second partly filled
    entry, _ = pool.acquire(ids)
    rng = np.random.default_rng(0)
    e, k, d = cfg.model.num_cross_layers, cfg.model.num_kv_heads, cfg.model.head_dim
    arrays = {name: (rng.integers(-127, 128, (e, len(ids), k, d)).astype(np.int8) if name.endswith("values")
                     else rng.random((e, len(ids), k)).astype(np.float16)) for name in layout}
    write_entry(pool, entry, arrays)
    back = read_entry(pool, entry)
    assert all(np.array_equal(back[n], arrays[n]) and back[n].dtype == arrays[n].dtype for n in arrays)

    store = PICacheStore(store_fingerprint("encoder-fp", layout), tmp_path)
    store.persist(ids, back)
    store.close()
    got, tier = PICacheStore(store.fingerprint, tmp_path).get(ids)
    assert tier == "disk" and all(np.array_equal(got[n], arrays[n]) for n in arrays)
