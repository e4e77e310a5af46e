"""A needle set that only reading can answer: invented facts inside real paragraphs, among distractors.

    python -m comb_jax.training.needles --source dev --count 300 --out runs/needles_dev.jsonl    # held-out (eval)
    python -m comb_jax.training.needles --source train --count 4000 --out runs/needles_train.jsonl
    python -m comb_jax.training.needles --task copy --source train --count 2000 --out runs/copy_train.jsonl  # copy
    python -m comb_jax.training.needles --task squad --source train --count 4000 --out runs/squad_train.jsonl  # real QA
    python -m comb_jax.training.needles --task mix --source train --count 6000 --out runs/mix_train.jsonl  # both

Each example takes a real SQuAD paragraph, inserts one invented fact (a made-up name, year, code or place that no
model can know) at a sentence boundary, adds `distractors` paragraphs from other articles as separate chunks, and
asks about the fact. The chunks are shuffled (seeded). `--source dev` reads the held-out SQuAD 2.0 dev half, `train`
SQuAD 1.1 train: the two never share an article, so a model trained on train needles is evaluated on new text and
new facts. Lines are `{"chunks", "question", "answer", "kind"}`, ready for `--dataset jsonl:PATH`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from comb_jax.paths import DEFAULT_DATA_DIR

SOURCES = {"dev": "squad_v2_dev_cs224n/dev-v2.0.json", "train": "squad_train/train-v1.1-explorer-reconstructed.json"}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk"]
_GROUPS = ["Guild", "Society", "Brotherhood", "Company", "Assembly", "Circle", "Institute", "League"]
_OBJECTS = ["bell", "lantern", "compass", "harp", "clock", "banner", "chalice", "telescope"]
_COLORS = ["green", "purple", "orange", "silver", "crimson", "yellow", "grey", "turquoise"]


def invented_word(rng: np.random.Generator, syllables: int) -> str:
    """A pronounceable made-up word, capitalised (e.g. "Drouvenk")."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def invented_fact(rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(fact sentence, question, answer, kind) about invented entities."""
    person = f"{invented_word(rng, 2)} {invented_word(rng, 3)}"
    group = f"{invented_word(rng, 2)} {rng.choice(_GROUPS)}"
    place = invented_word(rng, 3)
    year = str(int(rng.integers(1520, 1990)))
    code = f"{''.join(rng.choice(list('ABCDEFGHJKLMNPRSTUVWXYZ'), 2))}-{int(rng.integers(100, 1000))}"
    thing = rng.choice(_OBJECTS)
    color = rng.choice(_COLORS)
    kinds = [
        (f"The {group} was founded in {year} by {person}.", f"Who founded the {group}?", person, "founder"),
        (f"The {group} was founded in {year} by {person}.", f"In what year was the {group} founded?", year, "year"),
        (f"{person} was born in the village of {place}.", f"In which village was {person} born?", place, "place"),
        (f"The archive lists {person} under the registration code {code}.",
         f"What is the registration code of {person}?", code, "code"),
        (f"The {thing} of {place} is painted {color}.", f"What color is the {thing} of {place}?", color, "color"),
    ]
    return kinds[int(rng.integers(len(kinds)))]


def insert_sentence(paragraph: str, sentence: str, rng: np.random.Generator) -> str:
    """`sentence` placed at a random sentence boundary of `paragraph` (start, middle or end)."""
    parts = re.split(r"(?<=[.!?])\s+", paragraph.strip())
    at = int(rng.integers(len(parts) + 1))
    return " ".join(parts[:at] + [sentence] + parts[at:])


def load_paragraphs(data_dir: str | Path, source: str) -> list[tuple[int, str]]:
    """(article index, paragraph text) for every paragraph of the source file."""
    if source not in SOURCES:
        raise ValueError(f"unknown needle source {source!r}; valid: {', '.join(SOURCES)}")
    path = Path(data_dir) / SOURCES[source]
    if not path.is_file():
        raise FileNotFoundError(f"needle source {path} does not exist (expected ../shared/data beside the checkout)")
    articles = json.loads(path.read_text())["data"]
    return [(a, p["context"]) for a, article in enumerate(articles) for p in article["paragraphs"]]


def needle_examples(data_dir: str | Path, source: str, count: int, seed: int = 0, distractors: int = 2,
                    max_chars: int = 700) -> list[dict]:
    """`count` seeded needle examples (see the module docstring). Paragraphs over `max_chars` are skipped, so that
    every chunk fits the training chunk bucket."""
    paragraphs = [(a, p) for a, p in load_paragraphs(data_dir, source) if len(p) <= max_chars]
    rng = np.random.default_rng([seed, 7])
    picks = rng.choice(len(paragraphs), size=min(count, len(paragraphs)), replace=False)
    out = []
    for i in picks:
        article, text = paragraphs[int(i)]
        sentence, question, answer, kind = invented_fact(rng)
        others = []
        while len(others) < distractors:  # distinct paragraphs from other articles
            j = int(rng.integers(len(paragraphs)))
            if paragraphs[j][0] != article and j not in others:
                others.append(j)
        chunks = [insert_sentence(text, sentence, rng)] + [paragraphs[j][1] for j in others]
        order = rng.permutation(len(chunks))
        out.append({"chunks": [chunks[k] for k in order], "question": question, "answer": answer, "kind": kind})
    return out


COPY_QUESTION = "Repeat the text above word for word."


def copy_examples(data_dir: str | Path, source: str, count: int, seed: int = 0, words: int = 35) -> list[dict]:
    """The verbatim-copy proxy: one chunk of the first ~`words` words of a real paragraph, to be repeated exactly.
    Every answer token depends on the chunk, so its loss falls far below the no-context loss only if Comb reads."""
    paragraphs = [p for _, p in load_paragraphs(data_dir, source) if len(p.split()) >= words]
    rng = np.random.default_rng([seed, 11])
    picks = rng.choice(len(paragraphs), size=min(count, len(paragraphs)), replace=False)
    rows = []
    for i in picks:
        passage = " ".join(paragraphs[int(i)].split()[:words])
        rows.append({"chunks": [passage], "question": COPY_QUESTION, "answer": passage, "kind": "copy"})
    return rows


def squad_qa_examples(data_dir: str | Path, source: str, count: int, seed: int = 0, distractors: int = 2,
                      max_chars: int = 700) -> list[dict]:
    """Real SQuAD questions with their gold span: the gold paragraph plus `distractors` paragraphs from other
    articles, shuffled, one chunk each (answerable questions only; paragraphs over `max_chars` skipped)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    path = Path(data_dir) / SOURCES[source]
    articles = json.loads(path.read_text())["data"]
    paragraphs = [(a, p) for a, article in enumerate(articles) for p in article["paragraphs"]
                  if len(p["context"]) <= max_chars]
    questions = [(i, qa) for i, (_, p) in enumerate(paragraphs) for qa in p["qas"]
                 if qa.get("answers") and not qa.get("is_impossible")]
    rng = np.random.default_rng([seed, 13])
    picks = rng.choice(len(questions), size=min(count, len(questions)), replace=False)
    rows = []
    for q in picks:
        i, qa = questions[int(q)]
        article, paragraph = paragraphs[i]
        others = []
        while len(others) < distractors:
            j = int(rng.integers(len(paragraphs)))
            if paragraphs[j][0] != article and j not in others:
                others.append(j)
        chunks = [paragraph["context"]] + [paragraphs[j][1]["context"] for j in others]
        order = rng.permutation(len(chunks))
        rows.append({"chunks": [chunks[k] for k in order], "question": qa["question"],
                     "answer": qa["answers"][0]["text"], "kind": "squad"})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comb_jax.training.needles", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="dev", choices=sorted(SOURCES))
    ap.add_argument("--task", default="needle", choices=["needle", "copy", "squad", "mix"],
                    help="needle QA, the copy proxy, real SQuAD QA with distractor chunks, or needle + squad "
                         "(--count of each, shuffled together)")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--distractors", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.count < 1:
        ap.error(f"--count must be >= 1, got {args.count}")
    if args.task == "copy":
        rows = copy_examples(args.data_dir, args.source, args.count, args.seed)
    elif args.task == "squad":
        rows = squad_qa_examples(args.data_dir, args.source, args.count, args.seed, args.distractors)
    elif args.task == "mix":
        rows = (needle_examples(args.data_dir, args.source, args.count, args.seed, args.distractors)
                + squad_qa_examples(args.data_dir, args.source, args.count, args.seed, args.distractors))
        rows = [rows[i] for i in np.random.default_rng([args.seed, 17]).permutation(len(rows))]
    else:
        rows = needle_examples(args.data_dir, args.source, args.count, args.seed, args.distractors)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    print(f"wrote {len(rows)} {args.task} examples to {out}")


if __name__ == "__main__":
    main()
