"""Data: examples from real text, answer-only loss masks, deterministic grain batches, teacher-answer cache."""

import json

import numpy as np
import pytest
from train_helpers import toy_cfg, toy_examples

from comb_jax.config import apply_overrides
from comb_jax.training import data as D


def _batches(examples, tc, seed, n):
    it = D.train_iterator(examples, D.Codec(None), tc, seed=seed)
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_different(tiny_cfg):
    tc = toy_cfg(tiny_cfg, "batch_size=4").train
    examples = toy_examples(16)
    a, b, c = (_batches(examples, tc, seed, 6) for seed in (0, 0, 1))  # 6 batches = 1.5 epochs
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # one epoch (4 batches of 4) holds every example exactly once
    questions = sorted(bytes(r[r > 0].astype(np.uint8)).split(b"\nA:")[0] for x in a[:4] for r in x["tokens"])
    assert questions == sorted(f"Q: {e.question}".encode() for e in examples)


def test_iterator_state_resumes_the_same_stream(tiny_cfg):
    tc = toy_cfg(tiny_cfg, "batch_size=4").train
    examples = toy_examples(16)
    it = D.train_iterator(examples, D.Codec(None), tc)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the checkpoint stores it as JSON
    expected = [next(it) for _ in range(3)]
    fresh = D.train_iterator(examples, D.Codec(None), tc)
    fresh.set_state(state)
    for x in expected:
        np.testing.assert_array_equal(next(fresh)["targets"], x["targets"])


def test_loss_mask_covers_answer_tokens_only(tiny_cfg):
    tc = toy_cfg(tiny_cfg).train
    ex = toy_examples(1)[0]
    batch = D.collate([D.tokenize(ex, D.Codec(None), tc)], tc)
    prompt = f"Q: {ex.question}\nA: ".encode()
    seq = list(prompt) + list(ex.answer.encode()) + [0]
    n = len(seq) - 1
    np.testing.assert_array_equal(batch["tokens"][0, :n], seq[:-1])
    np.testing.assert_array_equal(batch["targets"][0, :n], seq[1:])
    mask = batch["loss_mask"][0]
    assert mask.sum() == len(ex.answer) + 1
    assert bytes(batch["targets"][0][mask > 0].astype(np.uint8)) == ex.answer.encode() + b"\0"
    assert mask[: len(prompt) - 1].sum() == 0 and mask[n:].sum() == 0
    for j, chunk in enumerate(ex.chunks):
        assert bytes(batch["chunk_tokens"][0, j][batch["chunk_mask"][0, j]].astype(np.uint8)) == chunk.encode()


def test_kl_teacher_index_points_at_the_same_answer_tokens(tiny_cfg):
    tc = toy_cfg(tiny_cfg, "kl_weight=1.0", "train.chunk_buckets=(32,64,128)").train
    examples = toy_examples(3)
    batch = D.collate([D.tokenize(e, D.Codec(None), tc) for e in examples], tc)
    teacher_targets = np.concatenate([batch["teacher_tokens"][:, 1:], np.zeros((3, 1), np.int32)], axis=1)
    for i, e in enumerate(examples):
        m = batch["loss_mask"][i] > 0
        idx = batch["teacher_index"][i][m]
        # the teacher position predicting answer token j sits right before it in the teacher sequence
        assert bytes(teacher_targets[i][idx[:-1]].astype(np.uint8)) == e.answer.encode()
        assert b"Context:\nThe" in bytes(batch["teacher_tokens"][i].astype(np.uint8))


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    good = json.dumps({"chunks": ["a b"], "question": "q?", "answer": "a"})
    path.write_text(good + "\n" + json.dumps({"chunks": [], "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(D.DataError, match=r"mine.jsonl:2: 'chunks'"):
        D.jsonl_examples(path)
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(D.DataError, match=r"mine.jsonl:3: not valid JSON"):
        D.jsonl_examples(path)
    path.write_text(good + "\n")
    (ex,) = D.jsonl_examples(path)
    assert ex.chunks == ("a b",) and ex.answer == "a"


def test_one_loader_for_training_and_eval(tmp_path, tiny_cfg, shared_data):
    """`load_examples` serves both: training's sample draws from [seed, 2], the eval's from its seed; squad_multidoc
    is squad; a held-out reading set is eval only."""
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"chunks": [f"c{i}"], "question": "q", "answer": str(i)}) + "\n"
                            for i in range(10)))
    load = lambda **kw: [e.answer for e in D.load_examples(f"jsonl:{path}", tmp_path, "eval", seed=3,
                                                           num_distractors=0, max_chunk_chars=100, **kw)]
    assert load() == [str(i) for i in range(10)]
    assert load(limit=4) == [str(i) for i in np.sort(np.random.default_rng(3).permutation(10)[:4])]
    tc = toy_cfg(tiny_cfg, f"dataset=jsonl:{path}", "train.seed=3", "train_examples=4").train
    trained = [e.answer for e in D.run_examples(tc, tmp_path, "train")]
    assert trained == load(limit=4, sample_seed=[3, 2])
    with pytest.raises(D.DataError, match="unknown dataset 'squat'.*jsonl:PATH, wording"):
        D.load_examples("squat", tmp_path, "eval", seed=0, num_distractors=0, max_chunk_chars=100)
    squad = lambda name, **kw: D.load_examples(name, shared_data, "eval", seed=0, num_distractors=2,
                                               max_chunk_chars=100, **kw)
    assert squad("squad_multidoc") == squad("squad") == D.squad_examples(shared_data, "eval", 2, 0)
    answerable = squad("squad", include_unanswerable=False)
    assert answerable and all(e.golds != (D.NO_ANSWER,) for e in answerable)


def test_squad_split_by_article(shared_data, tiny_cfg):
    articles = D.squad_articles(shared_data)
    train = D.squad_examples(shared_data, "train", num_distractors=2, seed=0)
    evals = D.squad_examples(shared_data, "eval", num_distractors=2, seed=0)
    article_of = {p["context"]: a["title"] for a in articles for p in a["paragraphs"]}
    train_articles = {article_of[c] for e in train for c in e.chunks}
    eval_articles = {article_of[c] for e in evals for c in e.chunks}
    assert train_articles and eval_articles and not train_articles & eval_articles
    assert len(train_articles) == len(articles) - 4 and len(eval_articles) == 4
    n_questions = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
    assert len(train) + len(evals) == n_questions
    for e in train[:200]:
        assert len(set(e.chunks)) == 3
        if e.answer == D.NO_ANSWER:
            assert e.golds == (D.NO_ANSWER,)
        else:  # distractors come from other articles than the gold paragraph's
            gold = next(c for c in e.chunks if e.answer in c)
            assert [article_of[c] for c in e.chunks].count(article_of[gold]) == 1
    # the gold chunk's position varies across examples
    answerable = [e for e in train[:200] if e.answer != D.NO_ANSWER]
    positions = {next(i for i, c in enumerate(e.chunks) if e.answer in c) for e in answerable}
    assert positions == {0, 1, 2}


def test_teacher_answers_are_cached_with_provenance(tiny_cfg, tiny_params, tmp_path, monkeypatch):
    cfg = apply_overrides(tiny_cfg, ["teacher_max_tokens=4", "batch_size=4"])
    examples = toy_examples(4)
    path = tmp_path / "teacher_train.jsonl"
    params = {"backbone": tiny_params["backbone"]}
    first = D.teacher_targets(examples, params, cfg, D.Codec(None), path, progress=False)
    header = json.loads(path.read_text().splitlines()[0])["provenance"]
    assert header["max_new_tokens"] == 4 and header["prompt_format"] == D.PROMPT_FORMAT
    assert [e.id for e in first] == [e.id for e in examples]

    def no_generate(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(D, "generate", no_generate)  # data.py calls it by this name
    again = D.teacher_targets(examples, params, cfg, D.Codec(None), path, progress=False)
    assert [e.answer for e in again] == [e.answer for e in first]
    other = {"backbone": dict(params["backbone"], final_norm=params["backbone"]["final_norm"] * 2)}
    with pytest.raises(AssertionError, match="cache should have been used"):  # new weights: regenerate
        D.teacher_targets(examples, other, cfg, D.Codec(None), path, progress=False)
