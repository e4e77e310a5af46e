"""Answer-quality metrics: QA F1 with LongBench normalisation, answer containment and Rouge-L (spec section 6)."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the words a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, golds: list[str] | str) -> float:
    """Token-multiset F1 after normalisation, max over gold answers."""
    golds = [golds] if isinstance(golds, str) else golds
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(g).split()) for g in golds), default=0.0)


def contains_answer(prediction: str, golds: list[str] | str) -> float:
    """1.0 if a normalised gold answer occurs in the normalised prediction as a contiguous run of whole tokens
    (so "1976" is not in "19765"), else 0.0; max over golds. A gold that normalises to nothing never counts."""
    golds = [golds] if isinstance(golds, str) else golds
    pred = normalize_answer(prediction).split()
    for gold in golds:
        g = normalize_answer(gold).split()
        if g and any(pred[i:i + len(g)] == g for i in range(len(pred) - len(g) + 1)):
            return 1.0
    return 0.0


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure over lowercased word tokens (punctuation dropped)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
