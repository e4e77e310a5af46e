"""Training data: (chunks, question, answer) examples, self-distillation targets and a grain pipeline.

- `squad_examples`, `xsum_examples`, `jsonl_examples` read real text (through `datasets`) into `Example`s.
- text becomes ids through `text.codec.Codec`, the same way in training, serving and eval.
- `teacher_targets` asks the frozen backbone for its own greedy answer with the whole context inlined in the
  prompt, once, and caches the answers on disk with their provenance.
- `train_iterator` is the grain pipeline: seeded shuffle (reshuffled each epoch), tokenization, batching into
  fixed shapes padded to length buckets; its iterator has `get_state`/`set_state` for checkpoints.

Batch arrays (numpy): chunk_tokens/chunk_mask [batch, chunks, chunk_len]; tokens/targets/loss_mask
[batch, decoder_len] where targets are the tokens shifted left by one and loss_mask is 1 on answer targets only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from comb_jax import distributed
from comb_jax.errors import DataError
from comb_jax.model.buckets import bucket_for
from comb_jax.model.decode import generate
from comb_jax.text.codec import Codec
from comb_jax.text.prompt import PROMPT_FORMAT
from comb_jax.training.needles import READING_SETS, reading_set
from comb_jax.weights.fingerprint import tree_fingerprint

NO_ANSWER = "No information is provided in the context."
SUMMARY_INSTRUCTION = "Summarize the documents above in one sentence."
SQUAD_FILE = "squad_v2_dev_cs224n/dev-v2.0.json"
XSUM_FILE = "xsum_test_1k/test.jsonl"


@dataclass(frozen=True)
class Example:
    """One training/eval request. `answer` is the training target text; `golds` are the references for F1."""

    id: str
    chunks: tuple[str, ...]
    question: str
    answer: str
    golds: tuple[str, ...]
    tag: str = ""  # which set the example belongs to (a JSONL row's "set"): eval metrics are also given per tag


# ----------------------------------------------------------------------------------------------------------
# Sources


def _load_json_rows(path: Path, field: str | None = None):
    import datasets  # heavy: only when a data set is read

    datasets.disable_progress_bars()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return datasets.load_dataset("json", data_files=str(path), field=field, split="train")


def squad_articles(data_dir: str | Path) -> list[dict]:
    """[{title, paragraphs: [{context, qas}]}] from the SQuAD 2.0 JSON, in file order."""
    rows = _load_json_rows(Path(data_dir) / SQUAD_FILE, field="data")
    return [{"title": r["title"], "paragraphs": r["paragraphs"]} for r in rows]


def squad_examples(data_dir: str | Path, split: str, num_distractors: int, seed: int,
                   eval_articles: int = 4) -> list[Example]:
    """SQuAD 2.0 examples, split by article (the last `eval_articles` articles are "eval").

    Each example is the gold paragraph plus `num_distractors` paragraphs from other articles of the same
    split, in a seeded random order, one chunk each. Unanswerable questions answer `NO_ANSWER`.
    """
    articles = squad_articles(data_dir)
    if not 0 < eval_articles < len(articles):
        raise DataError(f"eval_articles={eval_articles} must be in 1..{len(articles) - 1}")
    chosen = {"train": articles[:-eval_articles], "eval": articles[-eval_articles:]}.get(split)
    if chosen is None:
        raise DataError(f"unknown split {split!r}; valid: train, eval")
    if num_distractors and len(chosen) < 2:
        raise DataError("distractors need at least two articles in the split")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    examples = []
    for a, article in enumerate(chosen):
        others = [p["context"] for b, other in enumerate(chosen) if b != a for p in other["paragraphs"]]
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                golds = tuple(dict.fromkeys(x["text"] for x in qa["answers"])) if not qa["is_impossible"] else ()
                picks = rng.choice(len(others), size=num_distractors, replace=False) if num_distractors else []
                chunks = [paragraph["context"]] + [others[i] for i in picks]
                order = rng.permutation(len(chunks))
                examples.append(Example(
                    id=f"squad:{qa['id']}", chunks=tuple(chunks[i] for i in order), question=qa["question"],
                    answer=golds[0] if golds else NO_ANSWER, golds=golds or (NO_ANSWER,),
                ))
    return examples


def split_text(text: str, max_chars: int) -> list[str]:
    """Split at line breaks into pieces of at most ~max_chars characters (a longer line stays whole)."""
    pieces, current = [], ""
    for line in (x.strip() for x in text.split("\n")):
        if not line:
            continue
        if current and len(current) + 1 + len(line) > max_chars:
            pieces.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    return pieces + [current] if current else pieces


def xsum_examples(data_dir: str | Path, split: str, max_chunk_chars: int, eval_fraction: float = 0.1) -> list[Example]:
    """XSum documents split into chunks, with a one-sentence summary instruction (last 10% is "eval")."""
    rows = list(_load_json_rows(Path(data_dir) / XSUM_FILE))
    cut = len(rows) - max(1, int(len(rows) * eval_fraction))
    chosen = {"train": rows[:cut], "eval": rows[cut:]}.get(split)
    if chosen is None:
        raise DataError(f"unknown split {split!r}; valid: train, eval")
    return [Example(id=f"xsum:{r['id']}", chunks=tuple(split_text(r["document"], max_chunk_chars)),
                    question=SUMMARY_INSTRUCTION, answer=r["summary"], golds=(r["summary"],))
            for r in chosen if r["document"].strip()]


def jsonl_examples(path: str | Path) -> list[Example]:
    """The user's own JSONL: one `{"chunks": [str, ...], "question": str, "answer": str}` per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL data file {path} does not exist")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with chunks, question, answer")
        missing = [k for k in ("chunks", "question", "answer") if k not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        chunks = row["chunks"]
        if not isinstance(chunks, list) or not chunks or not all(isinstance(c, str) and c for c in chunks):
            raise DataError(f"{where}: 'chunks' must be a non-empty list of non-empty strings")
        if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
            raise DataError(f"{where}: 'question' and 'answer' must be strings")
        examples.append(Example(id=f"jsonl:{number}", chunks=tuple(chunks), question=row["question"],
                                answer=row["answer"], golds=(row["answer"],), tag=str(row.get("set", ""))))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


DATASETS = ("squad", "xsum", "jsonl:PATH", *READING_SETS)  # what `load_examples` reads, for training and eval
DATASET_ALIASES = {"squad_multidoc": "squad"}  # the eval's former name, still in run dirs, docs and the shipped card


def load_examples(dataset: str, data_dir: str | Path, split: str, *, seed: int, num_distractors: int,
                  max_chunk_chars: int, limit: int = 0, sample_seed=None,
                  include_unanswerable: bool = True) -> list[Example]:
    """The one example loader of training and eval: `dataset` (one of `DATASETS`), its `split` ("train" | "eval").

    squad: SQuAD 2.0 dev split by article, the gold paragraph with `num_distractors` others (`squad_examples`),
    unanswerable questions (gold `NO_ANSWER`) only with `include_unanswerable`; xsum: documents cut into chunks of
    at most `max_chunk_chars` (`xsum_examples`); jsonl:PATH: the user's file, the same for both splits; a held-out
    reading set (`needles.READING_SETS`): `limit` (or 200) generated requests, eval only, never trained on.
    `limit` > 0 keeps a seeded sample of that many, in file order; `sample_seed` (default `seed`) seeds it, so a
    caller keeps its own sample stable (training draws from [seed, 2], the eval from its --seed).
    """
    dataset = DATASET_ALIASES.get(dataset, dataset)
    if dataset in READING_SETS:  # generated, seeded: the same requests for every model and mode
        if split != "eval":
            raise DataError(f"{dataset!r} is a held-out reading set: eval only, never trained on")
        rows = reading_set(dataset, data_dir, count=limit or 200, seed=seed)
        return [Example(id=f"{dataset}:{i}", chunks=tuple(r["chunks"]), question=r["question"], answer=r["answer"],
                        golds=(r["answer"],), tag=r["set"]) for i, r in enumerate(rows)]
    if dataset == "squad":
        examples = squad_examples(data_dir, split, num_distractors, seed)
        if not include_unanswerable:
            examples = [e for e in examples if e.golds != (NO_ANSWER,)]
    elif dataset == "xsum":
        examples = xsum_examples(data_dir, split, max_chunk_chars)
    elif dataset.startswith("jsonl:"):
        examples = jsonl_examples(dataset[len("jsonl:"):])  # the same file serves train and eval
    else:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if limit and limit < len(examples):  # a seeded sample, so that a small limit still spans articles
        rng = np.random.default_rng(seed if sample_seed is None else sample_seed)
        keep = np.sort(rng.permutation(len(examples))[:limit])
        examples = [examples[i] for i in keep]
    return examples


def run_examples(tc, data_dir: str | Path, split: str) -> list[Example]:
    """A training run's examples: `load_examples` with TrainConfig `tc`'s settings (`train_examples` /
    `eval_examples` > 0 subsample); the eval split comes from `tc.eval_dataset` when it is set (e.g. a held-out
    needle file next to a training one)."""
    dataset = tc.eval_dataset if split == "eval" and tc.eval_dataset else tc.dataset
    return load_examples(dataset, data_dir, split, seed=tc.seed, num_distractors=tc.num_distractors,
                         max_chunk_chars=tc.max_chunk_tokens * 4,
                         limit=tc.train_examples if split == "train" else tc.eval_examples, sample_seed=[tc.seed, 2])


# ----------------------------------------------------------------------------------------------------------
# Self-distillation targets


def teacher_provenance(cfg, codec: Codec, fingerprint: str, examples: list[Example]) -> dict:
    ids = hashlib.sha256("\n".join(e.id + "\t" + "\x1f".join(e.chunks) + "\t" + e.question
                                   for e in examples).encode()).hexdigest()
    # attention_impl is how attention runs, not what the model is: teacher caches stay valid across it
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "attention_impl"}
    return {"model": model, "weights": fingerprint, "tokenizer": codec.name,
            "prompt_format": PROMPT_FORMAT, "max_new_tokens": cfg.train.teacher_max_tokens,
            "compute_dtype": cfg.compute_dtype, "examples": ids}


def teacher_targets(examples: list[Example], params, cfg, codec: Codec, cache_path: str | Path,
                    fingerprint: str | None = None, progress: bool = True) -> list[Example]:
    """Examples whose `answer` is the backbone's greedy answer to the full-context prompt (cached on disk).

    The cache file's first line holds the provenance; a file with other provenance is regenerated.
    `fingerprint`: the backbone's `tree_fingerprint`, when the caller has it already (computed here otherwise).
    """
    cache_path = epath.Path(cache_path)  # local, or in the run dir's bucket (gs://...)
    fingerprint = fingerprint or tree_fingerprint(params["backbone"])
    provenance = teacher_provenance(cfg, codec, fingerprint, examples)
    if cache_path.is_file():
        lines = cache_path.read_text().splitlines()
        if lines and json.loads(lines[0]).get("provenance") == provenance:
            answers = {row["id"]: row["answer"] for row in map(json.loads, lines[1:])}
            if all(e.id in answers for e in examples):
                return [dataclasses.replace(e, answer=answers[e.id]) for e in examples]
    batch = cfg.train.batch_size
    max_new = cfg.train.teacher_max_tokens
    prompts = [codec.teacher_prompt_ids(e.chunks, e.question) for e in examples]
    order = np.argsort([len(p) for p in prompts])  # similar lengths together: fewer padded tokens
    answers: dict[str, str] = {}
    dtype = jnp.dtype(cfg.compute_dtype)
    # a host copy of the backbone: each process answers every process_count-th batch on its own devices and the
    # answers are gathered; a backbone sharded across processes: every process runs every batch together (SPMD)
    spmd = not all(getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(params["backbone"]))
    starts = list(range(0, len(order), batch))
    if not spmd:
        starts = starts[distributed.process_index()::distributed.process_count()]
    put = _on_backbone_mesh(params["backbone"]) if spmd else jnp.asarray
    for start in tqdm(starts, desc="teacher answers", disable=not progress):
        rows = list(order[start:start + batch])
        rows += rows[-1:] * (batch - len(rows))  # static batch: repeat the last row
        width = -(-max(len(prompts[i]) for i in rows) // 64) * 64
        tokens = np.zeros((batch, width), np.int32)
        for r, i in enumerate(rows):
            tokens[r, :len(prompts[i])] = prompts[i]
        lengths = np.array([len(prompts[i]) for i in rows], np.int32)
        out, _ = generate(params, put(tokens), put(lengths), None, cfg.model, max_new_tokens=max_new,
                          stop_ids=codec.stop_ids, dtype=dtype)
        out = multihost_utils.process_allgather(out, tiled=True) if spmd else np.asarray(jax.device_get(out))
        for r, i in enumerate(rows):
            answers[examples[i].id] = codec.decode(out[r]).strip()
    if not spmd:
        for part in distributed.allgather_json(answers):
            answers.update(part)
    if distributed.is_primary():
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps({"provenance": provenance}) + "\n")
            for e in examples:
                f.write(json.dumps({"id": e.id, "answer": answers[e.id]}) + "\n")
        tmp.replace(cache_path)
    distributed.barrier("comb_jax.teacher_targets")
    return [dataclasses.replace(e, answer=answers[e.id]) for e in examples]


def _on_backbone_mesh(backbone):
    """numpy array (the same on every process) -> a global array replicated over the backbone's mesh."""
    replicated = NamedSharding(jax.tree.leaves(backbone)[0].sharding.mesh, PartitionSpec())
    return lambda a: jax.make_array_from_process_local_data(replicated, a)


# ----------------------------------------------------------------------------------------------------------
# Tokenization and batching


def needs_teacher_forward(tc) -> bool:
    """Whether the loss reads the full-prompt backbone (KL or hidden-state distillation): batches then carry
    teacher_tokens / teacher_index."""
    return tc.kl_weight > 0 or tc.hidden_weight > 0


def tokenize(example: Example, codec: Codec, tc) -> dict:
    """Example -> {"chunks": [ids per chunk], "prompt": ids, "answer": ids} within the configured limits."""
    if len(example.chunks) > tc.max_chunks:
        raise DataError(f"example {example.id} has {len(example.chunks)} chunks, more than max_chunks={tc.max_chunks}")
    chunks = [codec.encode(c)[: tc.max_chunk_tokens] for c in example.chunks]
    prompt = codec.prompt_ids(example.question)
    answer = codec.answer_ids(example.answer)
    if len(prompt) > tc.max_decoder_tokens // 2:
        # an over-long question keeps its end (the part next to the answer) and half the decoder budget
        prompt = prompt[-(tc.max_decoder_tokens // 2):]
    # the decoder sees prompt + answer[:-1] and predicts answer; keep the total within max_decoder_tokens + 1
    answer = answer[: tc.max_decoder_tokens + 1 - len(prompt)]
    features = {"chunks": chunks, "prompt": prompt, "answer": answer}
    if needs_teacher_forward(tc):  # the teacher reads the same answer after the full-context prompt
        features["teacher_prompt"] = codec.teacher_prompt_ids(example.chunks, example.question)
    return features


def collate(features: list[dict], tc) -> dict[str, np.ndarray]:
    """Pad a list of tokenized examples into fixed bucket shapes (see the module docstring)."""
    b = len(features)
    n = max(len(f["chunks"]) for f in features)
    lc = bucket_for(max(len(c) for f in features for c in f["chunks"]), tc.chunk_buckets, "chunk", DataError)
    td = bucket_for(max(len(f["prompt"]) + len(f["answer"]) - 1 for f in features), tc.decoder_buckets,
                    "decoder sequence", DataError)
    chunk_tokens = np.zeros((b, n, lc), np.int32)
    chunk_mask = np.zeros((b, n, lc), bool)
    tokens = np.zeros((b, td), np.int32)
    targets = np.zeros((b, td), np.int32)
    loss_mask = np.zeros((b, td), np.float32)
    for i, f in enumerate(features):
        for j, c in enumerate(f["chunks"]):
            chunk_tokens[i, j, :len(c)] = c
            chunk_mask[i, j, :len(c)] = True
        seq = f["prompt"] + f["answer"]
        tokens[i, :len(seq) - 1] = seq[:-1]
        targets[i, :len(seq) - 1] = seq[1:]
        loss_mask[i, len(f["prompt"]) - 1:len(seq) - 1] = 1.0  # positions whose target is an answer token
    batch = {"chunk_tokens": chunk_tokens, "chunk_mask": chunk_mask, "tokens": tokens, "targets": targets,
             "loss_mask": loss_mask, "answer_positions": answer_positions(loss_mask)}
    if "teacher_prompt" in features[0]:
        batch.update(_teacher_arrays(features, td, tc))
    return batch


def answer_positions(loss_mask: np.ndarray) -> np.ndarray:
    """[B, A] the positions of each row's answer targets in order, then zeros; A: the most answer targets of a row,
    rounded up to a power of two (at least 8, at most the row length), so that few shapes compile. The loss runs
    the LM head (a third of a SmolLM2 step over every position) on these positions only."""
    b, td = loss_mask.shape
    counts = (loss_mask > 0).sum(1)
    width = min(td, max(8, 1 << max(0, int(counts.max(initial=0)) - 1).bit_length()))
    out = np.zeros((b, width), np.int32)
    for i in range(b):
        where = np.flatnonzero(loss_mask[i] > 0)
        out[i, :len(where)] = where
    return out


def _teacher_arrays(features: list[dict], td: int, tc) -> dict[str, np.ndarray]:
    """teacher_tokens [B, S]: full-context prompt + answer; teacher_index [B, td]: for each student position
    whose target is answer token j, the teacher position whose target is the same token (0 elsewhere)."""
    s = bucket_for(max(len(f["teacher_prompt"]) + len(f["answer"]) - 1 for f in features), tc.teacher_buckets,
                   "teacher sequence", DataError)
    teacher_tokens = np.zeros((len(features), s), np.int32)
    teacher_index = np.zeros((len(features), td), np.int32)
    for i, f in enumerate(features):
        seq = f["teacher_prompt"] + f["answer"]
        teacher_tokens[i, :len(seq) - 1] = seq[:-1]
        j = np.arange(len(f["answer"]))
        teacher_index[i, len(f["prompt"]) - 1 + j] = len(f["teacher_prompt"]) - 1 + j
    return {"teacher_tokens": teacher_tokens, "teacher_index": teacher_index}


def batch_indices(num_examples: int, tc, seed: int, rows: slice | None = None):
    """grain MapDataset: element i is the example indices of `rows` of global batch i (all rows when None).

    The global order is one seeded shuffle of the examples per epoch (reshuffled each epoch), repeated forever and
    cut into batches of `tc.batch_size`; it is the same on every process, and a process keeps only its `rows` of
    each batch (the block its devices hold, `trainer.process_rows`). So over an epoch the processes' indices are
    disjoint and together cover every example once, and nothing but an integer permutation is computed for the
    rows a process does not hold.
    """
    if num_examples < tc.batch_size:
        raise DataError(f"{num_examples} training examples cannot fill one batch of {tc.batch_size}")
    rows = rows or slice(None)
    return (grain.MapDataset.range(num_examples)
            .shuffle(seed=seed)
            .repeat(None)
            .batch(tc.batch_size, drop_remainder=True)
            .map(lambda indices: np.asarray(indices)[rows]))


def _collate_indices(indices: np.ndarray, examples: list[Example], codec: Codec, tc) -> dict[str, np.ndarray]:
    return collate([tokenize(examples[i], codec, tc) for i in indices], tc)


def train_dataset(examples: list[Example], codec: Codec, tc, seed: int, rows: slice | None = None):
    """grain MapDataset of batches: shuffled by `seed` (a new order each epoch), repeated forever.

    `rows` (a multi-process run) keeps only those rows of each global batch (`batch_indices`): a process reads and
    tokenizes only the examples its devices hold. Every process walks the same global order, so the global batch
    equals the one-process batch row for row and the iterator state (the global batch index, the same on every
    process and for any process count) resumes them all. Shapes are this process's own buckets; `pad_to` brings
    them to the buckets agreed across processes.
    """
    return batch_indices(len(examples), tc, seed, rows).map(
        partial(_collate_indices, examples=examples, codec=codec, tc=tc))


def train_iterator(examples: list[Example], codec: Codec, tc, seed: int | None = None, rows: slice | None = None):
    """A checkpointable iterator of batches (`get_state()` / `set_state(state)`); `rows`: see `train_dataset`."""
    return iter(train_dataset(examples, codec, tc, tc.seed if seed is None else seed, rows).to_iter_dataset())


def pad_to(batch: dict[str, np.ndarray], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Zero-pad each array up to `shapes[name]` on its trailing axes (the rows stay): what `collate` builds when
    a longer row picks a larger bucket, since every padding position is 0 / False."""
    out = {}
    for k, v in batch.items():
        pad = [(0, 0)] + [(0, t - s) for s, t in zip(v.shape[1:], shapes[k][1:])]
        out[k] = np.pad(v, pad) if any(p for _, p in pad) else v
    return out


def eval_batches(examples: list[Example], codec: Codec, tc):
    """Fixed-order batches covering every example once; the last batch repeats its final example.

    Yields (batch, number of real rows, the examples of the batch).
    """
    for start in range(0, len(examples), tc.batch_size):
        part = examples[start:start + tc.batch_size]
        real = len(part)
        part = part + part[-1:] * (tc.batch_size - real)
        yield collate([tokenize(e, codec, tc) for e in part], tc), real, part
