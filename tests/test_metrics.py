"""QA F1 and Rouge-L against hand-computed cases."""

import pytest

from comb_jax.eval.metrics import contains_answer, normalize_answer, qa_f1, rouge_l


def test_normalisation_lowercases_drops_punctuation_and_articles():
    assert normalize_answer("The Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("  An apple a   day ") == "apple day"
    assert normalize_answer("theory another") == "theory another"  # articles only as whole words
    assert normalize_answer("U.S.-based") == "usbased"


def test_f1_partial_overlap():
    # pred {cat, sat}, gold {cat, sat, down}: precision 1, recall 2/3 -> F1 0.8
    assert qa_f1("The cat sat.", "cat sat down") == pytest.approx(0.8)
    # multisets: pred x x y, gold x y y -> 2 common, precision = recall = 2/3
    assert qa_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert qa_f1("Denmark, Iceland and Norway", "denmark iceland and norway") == 1.0
    assert qa_f1("blue", "red") == 0.0


def test_f1_takes_the_best_gold():
    assert qa_f1("Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert qa_f1("Paris", ["London", "paris", "Paris, France"]) == 1.0


def test_f1_empty_strings():
    assert qa_f1("", ["anything"]) == 0.0
    assert qa_f1("anything", [""]) == 0.0
    assert qa_f1("the", "a") == 0.0  # both normalise to nothing
    assert qa_f1("answer", []) == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    # [cat sat on mat] vs [cat lay on mat]: LCS cat-on-mat = 3 -> P = R = 3/4
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(0.75)
    # non-contiguous: one-three-four
    assert rouge_l("one two three four", "one three four five") == pytest.approx(0.75)
    # order matters: a reversal keeps one word
    assert rouge_l("w x y z", "z y x w") == pytest.approx(0.25)
    # LCS 2, P = 1, R = 2/5 -> 2 * 0.4 / 1.4
    assert rouge_l("one two", "one x two y z") == pytest.approx(0.8 / 1.4)
    assert rouge_l("same words here", "Same words, here!") == 1.0


def test_rouge_l_empty_strings():
    assert rouge_l("", "reference") == 0.0
    assert rouge_l("prediction", "") == 0.0
    assert rouge_l("", "") == 0.0


def test_containment_needs_the_whole_gold_as_contiguous_tokens():
    assert contains_answer("He was born in 1976, in Oslo.", "1976") == 1.0
    assert contains_answer("The code is 19765.", "1976") == 0.0  # token boundary, not a substring
    assert contains_answer("It is the Blue Shed!", "blue shed") == 1.0  # SQuAD normalisation on both sides
    assert contains_answer("the shed is blue", "blue shed") == 0.0  # order matters
    assert contains_answer("blue old shed", "blue shed") == 0.0  # contiguous
    assert contains_answer("Answer: U.S.-based firms", "US-based") == 1.0  # both hold the token "usbased"
    assert contains_answer("U.S. based", "US-based") == 0.0  # "us based" is two tokens, the gold one
    assert contains_answer("Denmark", "Denmark") == 1.0


def test_containment_takes_the_best_gold_and_ignores_empty_golds():
    assert contains_answer("in Paris, France", ["London", "Paris"]) == 1.0
    assert contains_answer("in Paris", ["London", "Paris, France"]) == 0.0
    assert contains_answer("anything at all", [""]) == 0.0
    assert contains_answer("the answer", ["the", "a"]) == 0.0  # golds that normalise to nothing
    assert contains_answer("", ["x"]) == 0.0
    assert contains_answer("answer", []) == 0.0
