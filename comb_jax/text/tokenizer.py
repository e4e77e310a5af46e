"""Tokenizer and chat template through `transformers`, from a Hugging Face directory or a GGUF file.

Converting a GGUF tokenizer takes seconds, so the converted tokenizer is saved once under
`$COMB_JAX_CACHE` (default `~/.cache/comb_jax`) keyed by the file's size and name, and loaded from there.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from comb_jax.paths import CACHE_DIR, embedded_gguf_path


def _file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.basename(path)}:{st.st_size}".encode()).hexdigest()[:16]


def load_tokenizer(cfg):
    """The tokenizer for a Config (weights.source gguf | hf). Random-weight configs have none."""
    from transformers import AutoTokenizer

    w = cfg.weights
    if w.source == "hf":
        if not w.path or not Path(w.path).is_dir():
            raise FileNotFoundError(f"tokenizer: Hugging Face directory {w.path!r} does not exist")
        return AutoTokenizer.from_pretrained(w.path)
    if w.source == "gguf":
        path = w.path or embedded_gguf_path()
        cached = CACHE_DIR / "tokenizers" / _file_key(path)
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached))
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, cached)
        except OSError:  # another process won the race
            pass
        return tok
    raise ValueError(f"config {cfg.name} (weights.source={w.source!r}) has no tokenizer")


def special_strings(tok) -> list[str]:
    """The spellings of the tokenizer's special (control) tokens, longest first."""
    found = set(tok.all_special_tokens)
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(added.content)
    return sorted((s for s in found if s), key=len, reverse=True)


def text_ids(tok, text: str) -> list[int]:
    """Ids of `text` as plain text: a control token's spelling inside it (`<|im_end|>`) is text, never control."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def chat_prompt_ids(tok, question: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a chat-templated prompt ending with the assistant turn's header.

    The template's own control tokens are control tokens; the messages' text is always text. A message that
    spells a control token is rendered with it escaped, then the template's pieces and the text are tokenized
    apart (which is how the tokenizer splits at control tokens anyway, so other prompts are unchanged).
    """
    if messages is None:
        if question is None:
            raise ValueError("a prompt needs a question or messages")
        messages = [{"role": "user", "content": question}]
    specials = special_strings(tok)
    contents = [str(m.get("content", "")) for m in messages]
    if not any(sp in c for c in contents for sp in specials):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return _escaped_chat_prompt_ids(tok, messages, specials)


def _escaped_chat_prompt_ids(tok, messages: list[dict], specials: list[str]) -> list[int]:
    everything = "".join(str(m.get("content", "")) for m in messages)
    start = next(chr(c) for c in range(0xE000, 0xF8FF) if chr(c) not in everything)  # private-use: never text
    end = next(chr(c) for c in range(ord(start) + 1, 0xF8FF) if chr(c) not in everything)
    find = re.compile("|".join(re.escape(sp) for sp in specials))
    escape = lambda text: find.sub(lambda m: f"{start}{specials.index(m.group())}{end}", text)
    unescape = lambda text: re.sub(f"{re.escape(start)}([0-9]+){re.escape(end)}", lambda m: specials[int(m.group(1))],
                                   text)
    escaped = [dict(m, content=escape(m["content"])) if isinstance(m.get("content"), str) else m for m in messages]
    text = tok.apply_chat_template(escaped, add_generation_prompt=True, tokenize=False)
    ids, pos = [], 0
    for m in find.finditer(text):  # only the template's control tokens are left unescaped
        ids += text_ids(tok, unescape(text[pos:m.start()]))
        ids.append(tok.convert_tokens_to_ids(m.group()))
        pos = m.end()
    return ids + text_ids(tok, unescape(text[pos:]))


def stop_ids(tok) -> tuple[int, ...]:
    """Token ids that end generation (EOS and the chat template's end-of-turn)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for special in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    return tuple(sorted(i for i in ids if i is not None))
