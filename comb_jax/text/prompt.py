"""The prompt contract: how a request's chunks and question become the one full-context prompt.

Every place that puts the context into the decoder's prompt builds it here: the training teacher
(`Codec.teacher_prompt_ids`, whose answers are cached under `PROMPT_FORMAT`), `--mode full` of the batch and HTTP
servers (`inline_context`), and the eval's decoder-side modes and KV Packet, which read the same prompt piece by
piece (`prompt_segments`). If the wording changed in one place only, `--mode full` would stop matching the
teacher cache and nothing would say so; so it is written once, and `PROMPT_FORMAT` names its version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CONTEXT_HEAD = "Context:"
QUESTION_HEAD = "\nQuestion: "
# Bump when the wording changes: it is part of the teacher cache's provenance.
PROMPT_FORMAT = "v1: user turn = 'Context:\\n' + chunks joined by blank lines + '\\n\\nQuestion: ' + question"
CONTEXT_MARK = "<<CONTEXT>>"  # stands for the user turn when the chat template is split around it


def chunk_piece(chunk: str) -> str:
    """A chunk as it sits in the prompt: the blank lines between chunks are split "\\n" | "\\n" between pieces,
    which is how the whole prompt tokenizes too."""
    return "\n" + chunk + "\n"


def inline_context(chunks, question: str) -> str:
    """The user turn with the context inlined: 'Context:\\n' + chunks joined by blank lines + '\\n\\nQuestion: '
    + question (no chunks: 'Context:\\n\\n\\nQuestion: ', as PROMPT_FORMAT v1 wrote it)."""
    return CONTEXT_HEAD + ("".join(chunk_piece(c) for c in chunks) or "\n\n") + QUESTION_HEAD + question


@dataclass(frozen=True)
class Segments:
    """One request as token ids. The decoder-side prompt is prefix + chunks + suffix. Comb reads comb_chunks
    (each chunk tokenized on its own, as in training and serving; empty: `chunks`) and prefills comb_prompt."""

    prefix: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    suffix: tuple[int, ...]
    comb_prompt: tuple[int, ...]
    comb_chunks: tuple[tuple[int, ...], ...] = ()

    @property
    def context(self) -> tuple[int, ...]:
        return self.prefix + sum(self.chunks, ())

    @property
    def full(self) -> tuple[int, ...]:
        return self.context + self.suffix

    def chunk_offsets(self) -> list[int]:
        """Slot of each chunk's first token in the full prompt."""
        offsets, at = [], len(self.prefix)
        for c in self.chunks:
            offsets.append(at)
            at += len(c)
        return offsets

    def reordered(self, order) -> Segments:
        return dataclasses.replace(self, chunks=tuple(self.chunks[i] for i in order),
                                   comb_chunks=tuple(self.comb_chunks[i] for i in order) if self.comb_chunks else ())


def prompt_segments(codec, chunks, question: str, max_chunk_tokens: int) -> Segments:
    """Token ids of one request. The decoder-side prompt is the teacher's (`inline_context` in the chat template),
    tokenized piece by piece so that each chunk's ids are the same wherever it appears (for SmolLM2 the pieces join
    into exactly the ids of the whole prompt, see tests/test_eval.py; with no chunks the prompt is 'Context:' +
    QUESTION_HEAD + question); Comb's prompt is `Codec.prompt_ids(question)` and its chunks are each chunk's own
    ids, as in training.
    """
    ids = codec.prompt_ids(CONTEXT_MARK)
    template = bytes(ids).decode("utf-8") if codec.tok is None else codec.tok.decode(ids)
    if template.count(CONTEXT_MARK) != 1:
        raise ValueError(f"cannot find the user turn in the prompt template {template!r}")
    before, after = template.split(CONTEXT_MARK)
    chunk_ids = tuple(tuple(codec.encode(chunk_piece(c))[:max_chunk_tokens]) for c in chunks)
    # the template's pieces keep their control tokens; the question is text (it ends where `after`'s first
    # control token starts, which is where the tokenizer splits the whole prompt too)
    return Segments(prefix=tuple(codec.encode_markup(before + CONTEXT_HEAD)), chunks=chunk_ids,
                    suffix=tuple(codec.encode(QUESTION_HEAD + question) + codec.encode_markup(after)),
                    comb_prompt=tuple(codec.prompt_ids(question)),
                    comb_chunks=tuple(tuple(codec.encode(c)[:max_chunk_tokens]) for c in chunks))
