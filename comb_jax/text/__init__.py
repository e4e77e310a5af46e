"""Text: the tokenizer, the `Codec` (text <-> ids) and the one prompt contract with its version.

- `tokenizer`: the Hugging Face tokenizer and chat template, from a directory or the GGUF (control tokens in user
  text stay text).
- `codec`: `Codec` / `make_codec`, used by training, serving and eval alike.
- `prompt`: `inline_context` (the full-context prompt), `prompt_segments` (the same prompt piece by piece),
  `PROMPT_FORMAT` (its version, part of the teacher cache's provenance).

Builds on `config` and `paths` only.
"""
