"""The reading sets of issue 20: wordings from two disjoint template families, same-kind distractor facts, other
passage styles; and the eval's named held-out sets."""

import re

import numpy as np
import pytest

from comb_jax.training import needles as N


def _patterns(family: str) -> tuple[set[str], set[str]]:
    """A family's core statement and question templates with placeholders blanked, lower-cased."""
    cores, questions = set(), set()
    for kind in N.KINDS:
        statements, asks = N._FAMILIES[family][kind]
        cores |= {re.sub(r"\{\w+\}", "_", t).lower() for t in statements}
        questions |= {re.sub(r"\{\w+\}", "_", t).lower() for t in asks}
    return cores, questions


def test_held_out_family_shares_no_wording_with_training():
    train_cores, train_questions = _patterns("train")
    held_cores, held_questions = _patterns("heldout")
    assert not train_cores & held_cores and not train_questions & held_questions
    leads = lambda f: {x for x in N._FAMILIES[f]["lead"] + N._FAMILIES[f]["tail"] if x}  # noqa: E731
    assert not leads("train") & leads("heldout")
    # hundreds of statement wordings per kind in training (over a thousand in all), tens held out
    assert min(N.family_wordings("train").values()) >= 100 and sum(N.family_wordings("train").values()) >= 1000
    assert min(N.family_wordings("heldout").values()) >= 40


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_every_kind_states_and_asks(family):
    rng = np.random.default_rng(0)
    for kind in N.KINDS:
        entity, value = N.fact_entity_value(kind, rng)
        sentence = N.fact_statement(kind, entity, value, family, rng)
        question = N.fact_question(kind, entity, family, rng)
        assert entity in sentence and value in sentence and sentence[0].isupper(), sentence
        assert entity in question and value not in question, question


def test_same_kind_facts_about_other_entities_sit_in_other_chunks(shared_data):
    rows = N.reading_set("distractors", shared_data, 30, seed=2)
    assert rows == N.reading_set("distractors", shared_data, 30, seed=2) and len(rows) == 30
    for r in rows:
        assert len(r["chunks"]) == 3 and r["set"] == "heldout:3facts"
        # three facts of the asked kind about three entities, one per chunk; the question names one of them
        entities = [e for e, _ in r["facts"]]
        assert len(set(entities)) == 3 and sum(e in r["question"] for e in entities) == 1
        asked = next(v for e, v in r["facts"] if e in r["question"])
        assert asked == r["answer"] and len({v for _, v in r["facts"]}) == 3, r
        homes = {next(i for i, c in enumerate(r["chunks"]) if v in c) for _, v in r["facts"]}
        assert len(homes) == 3, r
    # every held-out question is asked with a held-out wording, never a training one
    _, train_questions = _patterns("train")
    for r in rows:
        assert not any(re.fullmatch(re.escape(q).replace("_", ".+"), r["question"].lower()) for q in train_questions)


def test_style_set_is_lower_cased_news_text(shared_data):
    rows = N.reading_set("style", shared_data, 20, seed=0)
    for r in rows:
        text = " ".join(r["chunks"]) + r["question"]
        assert text == text.lower() and r["answer"] == r["answer"].lower()
        assert sum(r["answer"] in c for c in r["chunks"]) >= 1
    squad = {p for _, p in N.load_paragraphs(shared_data, "dev")}
    assert not any(c in {p.lower() for p in squad} for r in rows for c in r["chunks"])


def test_eval_loads_the_named_reading_sets(shared_data):
    from comb_jax.eval.harness import metric_for
    from comb_jax.training.data import load_examples

    examples = load_examples("wording", shared_data, "eval", seed=0, limit=12, num_distractors=2, max_chunk_chars=2000,
                             include_unanswerable=False)
    assert metric_for("wording") == "f1" and len(examples) == 12 and all(e.tag == "heldout:1facts" for e in examples)
    assert all(sum(e.answer in c for c in e.chunks) == 1 for e in examples)
    with pytest.raises(ValueError, match="wording, distractors, style"):
        load_examples("wordings", shared_data, "eval", seed=0, limit=1, num_distractors=2, max_chunk_chars=2000)
    with pytest.raises(ValueError, match="eval only"):  # a held-out set is never trained on
        load_examples("wording", shared_data, "train", seed=0, limit=1, num_distractors=2, max_chunk_chars=2000)
