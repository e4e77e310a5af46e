"""Reading: how much of the full prompt's advantage a PIC method recovers, by teacher-forced NLLs.

For each request, the NLL per answer token of its reference answer (`golds[0]`) under several readings of its
context: "none" (no context), "full" (the context inlined in the prompt) and the method's own (Comb's PICaches,
KV Packet's packets, ...). `reading_nlls` is the one function for every method; a method says how it scores a
reading as a `ReadingMethod` (Comb's: `eval.harness.comb_reading`, KV Packet's: `eval.kvpacket.kvpacket_reading`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from comb_jax.training.data import Example

PerExample = dict[str, np.ndarray]  # reading name -> float64 [requests]; "kl_*": KL per answer token, else NLL


@dataclass(frozen=True)
class ReadingMethod:
    """How one PIC method reads, for `reading_nlls`. Both callables take the examples (`answer` = the reference).

    name: the method's own reading ("comb", "kvpacket"). reference(examples) -> the readings that do not depend on
    the method's trained parameters, "none" and "full" among them (cached across calls by `reading_nlls`);
    method(examples) -> the method's readings: `name`, optionally `name + "_other"` (each request reading another
    request's context: what answer style alone is worth) and "kl_*" values.
    """

    name: str
    reference: Callable[[list[Example]], PerExample]
    method: Callable[[list[Example]], PerExample]


def gap_closed(nll_none: float, nll_x: float, nll_full: float) -> float | None:
    """(nll_none - nll_x) / (nll_none - nll_full); None when the full prompt is no different from no context."""
    denominator = nll_none - nll_full
    value = (nll_none - nll_x) / denominator if denominator else None
    return value if value is not None and np.isfinite(value) else None


def reading_nlls(examples: list[Example], method: ReadingMethod, cache: dict | None = None) -> dict:
    """Every reading of `method` on `examples`, means over examples and the context gap each closes.

    Returns {"nll_R" (or "kl_R"): mean over examples for each reading R; "gap_closed_R": `gap_closed` of each NLL
    reading besides none and full; "gap_closed": the method's own; "nll_NAME_other" and "reading_gap_closed":
    (nll_NAME_other - nll_NAME) / (nll_none - nll_full), the part of the gap closed by reading the right context
    (None where not measured); "requests"; "per_example": {"id", and each reading's values in example order}}.
    `cache` (a dict the caller keeps across calls on the same examples, as training's periodic eval does) holds
    `method.reference`'s readings.
    """
    gold = [dataclasses.replace(e, answer=e.golds[0]) for e in examples]
    cache = {} if cache is None else cache
    if "readings" not in cache:
        cache["readings"] = method.reference(gold)
    values = {**cache["readings"], **method.method(gold)}
    means = {k: float(np.mean(v)) if len(v) else None for k, v in values.items()}
    out = {k if k.startswith("kl_") else f"nll_{k}": m for k, m in means.items()}
    none, full, own = means["none"], means["full"], means[method.name]
    for k, m in means.items():
        if not k.startswith("kl_") and k not in ("none", "full"):
            out[f"gap_closed_{k}"] = gap_closed(none, m, full) if examples else None
    other = means.get(f"{method.name}_other")
    out[f"nll_{method.name}_other"] = other
    out["gap_closed"] = out[f"gap_closed_{method.name}"]
    out["reading_gap_closed"] = (None if other is None or out["gap_closed"] is None
                                 else gap_closed(other, own, other - (none - full)))
    per_example = {k if k.startswith("kl_") else f"nll_{k}": [float(x) for x in v] for k, v in values.items()}
    return {**out, "requests": len(examples), "per_example": {"id": [e.id for e in examples], **per_example}}
