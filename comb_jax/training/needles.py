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


# ----------------------------------------------------------------------------------------------------------
# Reading by meaning (issue 20): many wordings, two disjoint template families, same-type distractor facts.
#
# A fact is (kind, entity, value). Each kind has statement and question templates in two FAMILIES that share no
# sentence or question pattern: "train" (what training sees) and "heldout" (what the reading eval asks). A statement
# is lead-in + core + tail, all drawn from its family, so each family has hundreds of wordings per kind. A request
# states several facts of the same kind about different entities, spread over the chunks: only the entity named in
# the question decides which value answers it.

_ANIMALS = ["otter", "heron", "badger", "lynx", "falcon", "beaver", "stag", "salamander", "pelican", "tortoise"]
_CLUBS = ["Rowing Club", "Chess Club", "Rovers", "Athletic Club", "Cycling Club", "Choir"]
_FIRMS = ["Trading Company", "Ironworks", "Mills", "Shipping Line", "Press", "Brewery"]

_FAMILIES = {
    "train": {
        "lead": ["", "", "", "According to local records, ", "As the town chronicle notes, ", "Notably, ",
                 "Historians agree that ", "In a little-known detail, ", "It is often forgotten that ",
                 "Old newspapers report that "],
        "tail": ["", "", "", " This is still remembered today.", " Few visitors know this.",
                 " The detail appears in several accounts.", " Locals mention it with pride."],
        "founder": (["the {e} was founded by {v}.", "{v} founded the {e}.", "the {e} was established by {v}.",
                     "it was {v} who set up the {e}.", "the founder of the {e} was {v}.",
                     "{v} started the {e} with a few friends."],
                    ["Who founded the {e}?", "Who was the founder of the {e}?", "Who set up the {e}?",
                     "Which person established the {e}?"]),
        "year": (["the {e} was founded in {v}.", "the {e} was established in the year {v}.",
                  "in {v}, the {e} was set up.", "the {e} dates from {v}, when it was founded."],
                 ["In what year was the {e} founded?", "When was the {e} established?",
                  "What year was the {e} set up in?"]),
        "birthplace": (["{e} was born in the village of {v}.", "the birthplace of {e} is the village of {v}.",
                        "{e} came into the world in {v}, a small village.", "{e} was born in {v}."],
                       ["In which village was {e} born?", "Where was {e} born?", "What is the birthplace of {e}?"]),
        "code": (["the archive lists {e} under the registration code {v}.", "the registration code of {e} is {v}.",
                  "{e} is registered under the code {v}.", "{e} holds the registration code {v}."],
                 ["What is the registration code of {e}?", "Under which code is {e} registered?",
                  "Which registration code does {e} hold?"]),
        "mascot": (["the mascot of the {e} is a {v}.", "the {e} has a {v} as its mascot.",
                    "a {v} serves as the mascot of the {e}."],
                   ["What is the mascot of the {e}?", "Which animal is the mascot of the {e}?"]),
        "river": (["the town of {e} lies on the river {v}.", "{e} is a town on the banks of the {v}.",
                   "the river {v} flows through the town of {e}."],
                  ["On which river does {e} lie?", "Which river flows through {e}?"]),
        "headquarters": (["the {e} has its headquarters in {v}.", "the {e} is headquartered in the city of {v}.",
                          "the head office of the {e} is in {v}."],
                         ["Where is the {e} headquartered?", "In which city is the head office of the {e}?"]),
        "color": (["the {e} is painted {v}.", "the colour of the {e} is {v}.", "the {e} was painted {v} long ago."],
                  ["What color is the {e}?", "What colour is the {e} painted?"]),
    },
    "heldout": {
        "lead": ["", "", "", "Curiously, ", "By most accounts, ", "Parish documents show that ",
                 "A plaque nearby explains that ", "Visitors learn that "],
        "tail": ["", "", " Guides like to repeat it.", " The story is told in the museum.",
                 " That much is certain."],
        "founder": (["the {e} owes its existence to {v}, who created it.", "{v} is credited with creating the {e}.",
                     "the {e} began under {v}, its first organiser.", "the {e} was the life's work of {v}, "
                     "who brought it into being."],
                    ["Whose initiative created the {e}?", "Name the person credited with creating the {e}.",
                     "The {e} was created by whom?"]),
        "year": (["the {e} opened its doors for the first time in {v}.", "the {e} has existed since {v}.",
                  "the story of the {e} begins in {v}."],
                 ["Since which year has the {e} existed?", "The {e} first opened in which year?"]),
        "birthplace": (["{e} hails from the small village of {v}.", "{e} is a native of the village of {v}.",
                        "the village of {v} is the home village of {e}."],
                       ["Which village is {e} a native of?", "Name the home village of {e}."]),
        "code": (["the access code for {e} is {v}.", "to reach {e}, staff use the access code {v}.",
                  "{e} can be reached with the access code {v}."],
                 ["Which access code is used for {e}?", "Tell me the access code for {e}."]),
        "mascot": (["supporters of the {e} cheer for their {v}, the club's mascot.",
                    "the {e} chose the {v} as its emblem animal and mascot."],
                   ["Which creature do supporters of the {e} have as a mascot?",
                    "Name the emblem animal of the {e}."]),
        "river": (["{e} sits where the {v} bends to the south.", "the {v} runs past the old walls of {e}."],
                  ["What river runs past {e}?", "Name the river that {e} sits on."]),
        "headquarters": (["{v} is home to the main office of the {e}.", "the {e} runs its business from {v}."],
                         ["From which city does the {e} run its business?", "Name the home city of the {e}."]),
        "color": (["anyone can see that the {e} is {v}.", "the {e} shines in {v}."],
                  ["Which colour does the {e} have?", "Name the colour of the {e}."]),
    },
}
KINDS = ["founder", "year", "birthplace", "code", "mascot", "river", "headquarters", "color"]


def _person(rng: np.random.Generator) -> str:
    return f"{invented_word(rng, 2)} {invented_word(rng, 3)}"


def fact_entity_value(kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """A fresh (entity, value) of `kind`; entities are invented so no model knows them."""
    if kind in ("founder", "year"):
        entity = f"{invented_word(rng, 2)} {rng.choice(_GROUPS)}"
        value = _person(rng) if kind == "founder" else str(int(rng.integers(1520, 1990)))
    elif kind in ("birthplace", "code"):
        entity = _person(rng)
        value = (invented_word(rng, 3) if kind == "birthplace"
                 else f"{''.join(rng.choice(list('ABCDEFGHJKLMNPRSTUVWXYZ'), 2))}-{int(rng.integers(100, 1000))}")
    elif kind == "mascot":
        entity, value = f"{invented_word(rng, 2)} {rng.choice(_CLUBS)}", str(rng.choice(_ANIMALS))
    elif kind == "river":
        entity, value = invented_word(rng, 3), invented_word(rng, 2)
    elif kind == "headquarters":
        entity, value = f"{invented_word(rng, 2)} {rng.choice(_FIRMS)}", invented_word(rng, 3)
    elif kind == "color":
        entity, value = f"{rng.choice(_OBJECTS)} of {invented_word(rng, 3)}", str(rng.choice(_COLORS))
    else:
        raise ValueError(f"unknown fact kind {kind!r}; valid: {', '.join(KINDS)}")
    return entity, value


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def fact_statement(kind: str, entity: str, value: str, family: str, rng: np.random.Generator) -> str:
    """One sentence stating the fact in a wording of `family` (lead-in + core + tail)."""
    fam = _FAMILIES[family]
    core = str(rng.choice(fam[kind][0])).format(e=entity, v=value)
    lead = str(rng.choice(fam["lead"]))
    return _capitalise(lead + core if lead else core) + str(rng.choice(fam["tail"]))


def fact_question(kind: str, entity: str, family: str, rng: np.random.Generator) -> str:
    return str(rng.choice(_FAMILIES[family][kind][1])).format(e=entity)


def family_wordings(family: str) -> dict[str, int]:
    """How many distinct statement wordings each kind has in `family` (lead-ins x cores x tails)."""
    fam = _FAMILIES[family]
    distinct = len(set(fam["lead"])) * len(set(fam["tail"]))
    return {kind: distinct * len(fam[kind][0]) for kind in KINDS}


def _xsum_passages(data_dir: str | Path, max_chars: int) -> list[tuple[int, str]]:
    """XSum articles cut at a sentence boundary under `max_chars`, as (article, passage)."""
    rows = [json.loads(line) for line in (Path(data_dir) / "xsum_test_1k/test.jsonl").read_text().splitlines()]
    out = []
    for i, r in enumerate(rows):
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(r["document"].split()))
        passage = ""
        for s in sentences:
            if len(passage) + len(s) + 1 > max_chars:
                break
            passage = f"{passage} {s}".strip()
        if len(passage) > 200:
            out.append((i, passage))
    return out


def reading_examples(data_dir: str | Path, source: str, count: int, *, family: str, seed: int = 0,
                     facts: tuple[int, int] = (1, 3), chunks: int = 3, lowercase: float = 0.0,
                     max_chars: int = 600, kinds: tuple[str, ...] = tuple(KINDS)) -> list[dict]:
    """`count` requests of `chunks` real passages (`source`: dev | train SQuAD paragraphs, or xsum articles).
    Each request states between facts[0] and facts[1] facts of ONE kind about different invented entities, in
    different chunks where there are enough, worded from `family`; the question asks about one entity. With
    probability `lowercase` the whole request (chunks and question) is lower-cased. Lines as `needle_examples`,
    plus "set" (family and number of same-kind facts) and "facts" ([entity, value] of each stated fact)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown template family {family!r}; valid: {', '.join(_FAMILIES)}")
    passages = (_xsum_passages(data_dir, max_chars) if source == "xsum"
                else [(a, p) for a, p in load_paragraphs(data_dir, source) if len(p) <= max_chars])
    rng = np.random.default_rng([seed, 23, len(family)])
    rows = []
    for _ in range(count):
        kind = str(rng.choice(list(kinds)))
        n_facts = int(rng.integers(facts[0], facts[1] + 1))
        picked: list[int] = []
        while len(picked) < chunks:  # passages from distinct articles
            j = int(rng.integers(len(passages)))
            if all(passages[j][0] != passages[k][0] for k in picked):
                picked.append(j)
        texts = [passages[j][1] for j in picked]
        entities: set[str] = set()
        stated = []
        for f in range(n_facts):
            entity, value = fact_entity_value(kind, rng)
            while entity in entities or value in {v for _, v in stated}:  # each fact tells its entity apart
                entity, value = fact_entity_value(kind, rng)
            entities.add(entity)
            stated.append((entity, value))
            at = f % chunks if n_facts <= chunks else int(rng.integers(chunks))
            texts[at] = insert_sentence(texts[at], fact_statement(kind, entity, value, family, rng), rng)
        asked_entity, answer = stated[int(rng.integers(n_facts))]
        question = fact_question(kind, asked_entity, family, rng)
        if rng.random() < lowercase:
            texts, question, answer = [t.lower() for t in texts], question.lower(), answer.lower()
        order = rng.permutation(chunks)
        if lowercase and question.islower():
            stated = [(e.lower(), v.lower()) for e, v in stated]
        rows.append({"chunks": [texts[k] for k in order], "question": question, "answer": answer, "kind": kind,
                     "set": f"{family}:{n_facts}facts", "facts": [list(f) for f in stated]})
    return rows


READING_SETS = {  # the held-out reading suite (issue 20): name -> reading_examples arguments
    "wording": dict(source="dev", family="heldout", facts=(1, 1)),
    "distractors": dict(source="dev", family="heldout", facts=(3, 3)),
    "style": dict(source="xsum", family="heldout", facts=(1, 3), lowercase=1.0),
}


def reading_set(name: str, data_dir: str | Path, count: int, seed: int = 0) -> list[dict]:
    """One held-out reading set by name (`READING_SETS`); SQuAD dev multi-doc is `data.load_examples`' `squad`."""
    if name not in READING_SETS:
        raise ValueError(f"unknown reading set {name!r}; valid: {', '.join(READING_SETS)}")
    return reading_examples(data_dir, count=count, seed=seed, **READING_SETS[name])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comb_jax.training.needles", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="dev", choices=sorted(SOURCES) + ["xsum"])
    ap.add_argument("--task", default="needle", choices=["needle", "copy", "squad", "mix", "reading", "reading-mix"]
                    + [f"heldout-{name}" for name in READING_SETS],
                    help="needle QA (5 fixed templates), the copy proxy, real SQuAD QA with distractor chunks, "
                         "needle + squad, reading (many wordings of --family, --facts same-kind facts per request), "
                         "reading-mix (reading + squad, --count of each), or one held-out reading set "
                         "(heldout-wording | heldout-distractors | heldout-style: never trained on)")
    ap.add_argument("--family", default="train", choices=sorted(_FAMILIES), help="reading: template family")
    ap.add_argument("--facts", default="1,3", help="reading: min,max same-kind facts per request")
    ap.add_argument("--lowercase", type=float, default=0.0, help="reading: fraction of requests lower-cased")
    ap.add_argument("--max-chars", type=int, default=600, help="reading: longest passage before its facts are added")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--distractors", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.count < 1:
        ap.error(f"--count must be >= 1, got {args.count}")
    try:
        low, high = (int(x) for x in args.facts.split(","))
        assert 1 <= low <= high
    except (ValueError, AssertionError):
        ap.error(f"--facts must be MIN,MAX with 1 <= MIN <= MAX, got {args.facts!r}")
    if args.source == "xsum" and args.task not in ("reading", "reading-mix"):
        ap.error("--source xsum is for --task reading only")

    def reading():
        return reading_examples(args.data_dir, args.source, args.count, family=args.family, seed=args.seed,
                                facts=(low, high), chunks=args.distractors + 1, lowercase=args.lowercase,
                                max_chars=args.max_chars)

    if args.task.startswith("heldout-"):
        rows = reading_set(args.task[len("heldout-"):], args.data_dir, args.count, args.seed)
    elif args.task == "reading":
        rows = reading()
    elif args.task == "reading-mix":
        rows = reading() + squad_qa_examples(args.data_dir, args.source, args.count, args.seed, args.distractors)
        rows = [rows[i] for i in np.random.default_rng([args.seed, 19]).permutation(len(rows))]
    elif args.task == "copy":
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
