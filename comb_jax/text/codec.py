"""Text <-> ids the same way everywhere: training, eval and both servers.

`Codec` wraps the Hugging Face chat template for real models, and a byte-level toy (vocab 256, id 0 ends an
answer) for random-weight configs, so tests need no tokenizer. Prompts with context come from `text.prompt`.
"""

from __future__ import annotations

from comb_jax.errors import DataError
from comb_jax.text.prompt import inline_context
from comb_jax.text.tokenizer import chat_prompt_ids, load_tokenizer, stop_ids, text_ids


class Codec:
    """Prompt/answer tokenization. `tok=None` is the byte-level toy (vocab 256, id 0 ends a turn)."""

    def __init__(self, tok=None):
        self.tok = tok
        self.stop_ids: tuple[int, ...] = (0,) if tok is None else stop_ids(tok)

    @property
    def name(self) -> str:
        return "bytes" if self.tok is None else f"{type(self.tok).__name__}:{self.tok.name_or_path}:{len(self.tok)}"

    @property
    def bos_id(self) -> int | None:
        return getattr(self.tok, "bos_token_id", None) if self.tok is not None else None

    def encode(self, text: str) -> list[int]:
        """Ids of user text (chunks, answers): a control token's spelling inside it is text, never control."""
        if self.tok is None:
            return list(text.encode("utf-8"))
        return text_ids(self.tok, text)

    def encode_markup(self, text: str) -> list[int]:
        """Ids of chat-template text, whose control tokens (`<|im_start|>`) are control tokens."""
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:i]
                break
        if self.tok is None:
            return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, question: str) -> list[int]:
        """The student's prompt: the question alone (its context arrives as PICaches)."""
        if self.tok is None:
            return self.encode(f"Q: {question}\nA: ")
        return chat_prompt_ids(self.tok, question)

    def messages_ids(self, messages: list[dict], inline_chunks: list[str] | None = None) -> list[int]:
        """A chat's prompt ids; `inline_chunks` (mode full) go into the last user turn as the teacher reads them.
        The byte-level toy has no chat template: its prompt is the last user turn as the question."""
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        if inline_chunks is not None:
            messages = [dict(m) for m in messages]
            messages[last_user]["content"] = inline_context(inline_chunks, messages[last_user]["content"])
        if self.tok is None:
            return self.prompt_ids(messages[last_user]["content"])
        return chat_prompt_ids(self.tok, messages=messages)

    def teacher_prompt_ids(self, chunks, question: str) -> list[int]:
        """The teacher's prompt: the whole context inlined before the question (`prompt.inline_context`)."""
        return self.prompt_ids(inline_context(chunks, question))

    def answer_ids(self, answer: str) -> list[int]:
        """Answer text followed by the end-of-turn id the model should learn to emit."""
        return self.encode(answer) + [self.stop_ids[-1] if self.tok is None else self._end_of_turn()]

    def _end_of_turn(self) -> int:
        for special in ("<|im_end|>", "<|eot_id|>"):
            tid = self.tok.convert_tokens_to_ids(special)
            if tid in self.stop_ids:
                return tid
        return self.stop_ids[0]


def make_codec(cfg) -> Codec:
    if cfg.weights.source == "random":
        if cfg.model.vocab_size < 256:
            raise DataError(f"the byte-level toy tokenizer needs vocab_size >= 256, config has {cfg.model.vocab_size}")
        return Codec(None)
    return Codec(load_tokenizer(cfg))
