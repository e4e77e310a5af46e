"""Tokenizer and chat template through `transformers`, from a Hugging Face directory or a GGUF file.

Converting a GGUF tokenizer takes seconds, so the converted tokenizer is saved once under
`$COMB_JAX_CACHE` (default `~/.cache/comb_jax`) keyed by the file's size and name, and loaded from there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from comb_jax.weights import embedded_gguf_path

CACHE_DIR = Path(os.environ.get("COMB_JAX_CACHE", Path.home() / ".cache" / "comb_jax"))


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


def chat_prompt_ids(tok, question: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a chat-templated prompt ending with the assistant turn's header."""
    if messages is None:
        if question is None:
            raise ValueError("a prompt needs a question or messages")
        messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def stop_ids(tok) -> tuple[int, ...]:
    """Token ids that end generation (EOS and the chat template's end-of-turn)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for special in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    return tuple(sorted(i for i in ids if i is not None))
