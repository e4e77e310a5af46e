"""The built-in demo batch of serve.py: six chunks asked about three times, in a new order each round.

Two chunks state invented facts that are in no model's training data, so an answer that contains them was read
from the chunks.
"""

from __future__ import annotations

import numpy as np

DEMO_CHUNKS = [
    "Mira keeps her bicycle in the blue shed behind the bakery. The red shed holds only garden tools.",
    "The town library opens at nine in the morning and closes at six, except on Sundays when it is closed.",
    "Jonas bakes rye bread every Tuesday and sells it at the market square for three euros a loaf.",
    "The river Alder floods every spring, so the footbridge near the mill is closed from March to May.",
    # invented facts (made-up names, years and codes): no model can answer these without reading its chunks
    "The Dravenko Society was founded in 1743 by Tolvar Brimesthan. It met in a tavern by the harbour.",
    "The archive lists Keluna Vosmirath under the registration code KT-482. Her letters fill three boxes.",
]
# (chunk that holds the answer, question, the answer as the chunk states it)
DEMO_QUESTIONS = [
    (0, "Where does Mira keep her bicycle?", "blue shed"),
    (1, "When does the library close?", "six"),
    (2, "How much does Jonas charge for a loaf of rye bread?", "three euros"),
    (3, "Why is the footbridge closed in spring?", "floods"),
    (4, "In what year was the Dravenko Society founded?", "1743"),
    (5, "What is the registration code of Keluna Vosmirath?", "KT-482"),
]


def demo_requests(rounds: int = 3, seed: int = 0) -> list[dict]:
    """Each round asks every question with all the chunks in a fresh order: later rounds are all hits."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rounds):
        for q, (_, question, _) in enumerate(DEMO_QUESTIONS):
            order = rng.permutation(len(DEMO_CHUNKS))
            out.append({"id": f"demo-{r}-{q}", "chunks": [DEMO_CHUNKS[i] for i in order], "question": question})
    out.append({"id": "demo-no-context", "chunks": [], "question": "What is the capital of France?"})
    return out


def demo_expected(request_id: str) -> str | None:
    """The answer a demo request's chunks state (None for the no-context request)."""
    parts = request_id.split("-")
    return DEMO_QUESTIONS[int(parts[2])][2] if len(parts) == 3 and parts[2].isdigit() else None
