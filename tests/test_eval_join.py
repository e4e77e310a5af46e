"""`python -m comb_jax.eval.join`: one table from a baseline run and a Comb run over the same requests."""

import json

from comb_jax.eval.join import join_runs, markdown


def _run(path, dataset, mode, answers, golds):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"dataset": dataset}))
    rows = []
    for p, texts in answers.items():
        for i, text in enumerate(texts):
            rows.append({"mode": mode, "id": f"q{i}", "pass": p, "answer": text, "contain": float(golds[i] in text),
                         "score": float(text == golds[i])})
    (path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_join_scores_every_mode_against_the_full_prompts_answer(tmp_path):
    golds = ["1743", "KT-482"]
    _run(tmp_path / "base", "wording", "full", {"original": ["1743", "a code"], "shuffled": ["1743", "KT-482"]}, golds)
    _run(tmp_path / "ckpt", "wording", "comb", {"original": ["1743", "KT-482"], "shuffled": ["1743", "KT-482"]}, golds)
    table = join_runs([tmp_path / "base", tmp_path / "ckpt"])
    full, comb = table["wording"]["modes"]["full"], table["wording"]["modes"]["comb (ckpt)"]
    assert table["wording"]["requests"] == 2
    assert full["F1 vs full's answer"] == 1 and full["same answer both orders"] == 0.5
    assert comb["contain original"] == 1 and comb["same answer both orders"] == 1
    assert comb["F1 vs full's answer"] == 0.75  # "KT-482" against the full prompt's "a code" on one of four rows
    assert "| wording | 2 | comb (ckpt) | 1 | 1 |" in markdown(table)
