"""serve.py --dry-run: the memory plan of llama8b_comb on one 80 GB GPU, from abstract shapes, on CPU."""

import json

import jax

from comb_jax.cli import serve

LLAMA_8B_PARAMS = 8_030_261_248  # Llama-3.1-8B: embedding + 32 layers + norm + untied head


def dry_run(capsys, *args):
    before = len(jax.live_arrays())
    assert serve.main(["--dry-run", "--config", "llama8b_comb", *args]) == 0
    assert len(jax.live_arrays()) == before  # abstract shapes: nothing allocated
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_dry_run_prints_the_memory_plan_for_one_80gb_gpu(capsys):
    plan, text = dry_run(capsys)
    lines = {line["name"]: line for line in plan["lines"]}
    assert lines["backbone"]["bytes"] == 2 * LLAMA_8B_PARAMS  # bfloat16
    # pool: 2^20 tokens x 8 cross layers x 8 KV heads x 128 x (K, V) x 2 bytes; a 1K document is 8 pages of 128
    assert lines["PICache pool"]["bytes"] == (1 << 20) * 8 * 8 * 128 * 2 * 2
    assert lines["PICache pool"]["documents_1k"] == 1024
    assert lines["PICache pool"]["documents_1k_int8"] == 2016  # 128 / 65 as many pages, in whole documents
    # 32 requests x (512 + 256) slots x 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes, + int32 lengths
    assert lines["decode slots (KV cache)"]["bytes"] == 32 * 768 * 32 * 8 * 128 * 2 * 2 + 32 * 4
    assert lines["encoder"]["bytes"] > 0 and lines["cross blocks"]["bytes"] > 0
    assert plan["total_bytes"] == sum(line["bytes"] for line in plan["lines"])
    assert plan["device_bytes"] == 80e9 and plan["fits"] and plan["free_bytes"] > 0
    assert "PICache pool" in text and "documents of 1024 tokens" in text and "fits" in text


def test_dry_run_sizes_the_pool_by_device_fraction_and_int8_doubles_it(capsys):
    bf16, _ = dry_run(capsys, "serve.pool_fraction=0.25")
    int8, _ = dry_run(capsys, "serve.pool_fraction=0.25", "serve.pic_dtype=int8")
    pool = {p["pic_dtype"]: next(x for x in p["lines"] if x["name"] == "PICache pool") for p in (bf16, int8)}
    assert pool["auto"]["bytes"] <= 0.25 * 80e9 and pool["int8"]["bytes"] <= 0.25 * 80e9
    assert pool["auto"]["bytes"] > 0.24 * 80e9
    assert pool["int8"]["documents_1k"] == pool["auto"]["documents_1k_int8"]
    assert pool["int8"]["documents_1k"] >= 1.9 * pool["auto"]["documents_1k"]
