"""The batch mode's files (comb_jax/serving/batch_io.py, through serve.py): runs that cannot eat their input or
each other's output, a byte order mark, automatic ids that never collide, errors naming the right field."""

import json

import pytest
from test_engine import SERVE_OVERRIDES

from comb_jax.cli import serve
from comb_jax.errors import UsageError, run
from comb_jax.serving import batch, batch_io
from comb_jax.text.codec import Codec

CODEC = Codec(None)  # the byte-level toy of tiny_comb
LINES = [json.dumps({"id": f"q{i}", "question": "Bike?", "chunks": ["Mira: blue shed."], "max_tokens": 2})
         for i in range(3)]


def _no_model(*args):
    raise AssertionError("the model must not load")


def _main(src, out):
    return run(serve.main, "serve.py", ["--config", "tiny_comb", "--input", str(src), "--output", str(out),
                                        *SERVE_OVERRIDES])


def _refused(capsys, src, out) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _main(src, out)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_second_run_on_the_same_output_is_refused_and_the_first_keeps_its_rows(tmp_path, monkeypatch, capsys):
    """Case 1: run A holds OUTPUT.partial; run B with the same --output stops before its model loads, so A's
    output has exactly A's rows and B never points at a partial file that is gone."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(LINES) + "\n")
    first = batch.ResultWriter(out)  # run A, mid-run
    first.put(0, {"id": "a0"})
    monkeypatch.setattr(serve, "load_model", _no_model)
    err = _refused(capsys, src, out)
    assert "being written by another run" in err
    first.put(1, {"id": "a1"})
    first.commit()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a0", "a1"]
    assert not batch_io.partial_path(out).exists()
    second = batch.ResultWriter(out)  # once A is done, the output is free again
    second.put(0, {"id": "b0"})
    second.commit()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["b0"]


def test_a_run_that_loses_the_rename_race_reopens_the_new_partial(tmp_path):
    """The lock is on an open file: if the path was renamed away (to OUTPUT) before we locked it, we must not
    truncate the file we hold (it is now OUTPUT), but the new partial file."""
    out = tmp_path / "out.jsonl"
    out.write_text("A's committed results\n")
    tmp, f = batch_io.open_locked_partial(out)
    f.write("mine\n")
    f.close()
    assert out.read_text() == "A's committed results\n" and tmp.read_text() == "mine\n"


@pytest.mark.parametrize("how", ["same_path", "symlink", "input_is_the_partial"])
def test_an_output_that_is_the_input_is_refused(tmp_path, monkeypatch, capsys, how):
    """Case 2: --output equal to --input (or a link to it), or an input named OUTPUT.partial: refused before the
    model loads; the input is untouched."""
    monkeypatch.setattr(serve, "load_model", _no_model)
    src = tmp_path / ("out.jsonl.partial" if how == "input_is_the_partial" else "in.jsonl")
    src.write_text("\n".join(LINES) + "\n")
    out = {"same_path": src, "symlink": tmp_path / "link.jsonl", "input_is_the_partial": tmp_path / "out.jsonl"}[how]
    if how == "symlink":
        out.symlink_to(src)
    err = _refused(capsys, src, out)
    assert "--output" in err or "--input" in err
    assert src.read_text() == "\n".join(LINES) + "\n"


def test_check_output_is_not_input_allows_distinct_files(tmp_path):
    batch_io.check_output_is_not_input(tmp_path / "a.jsonl", tmp_path / "b.jsonl")  # neither exists yet: fine
    batch_io.check_output_is_not_input(None, tmp_path / "b.jsonl")  # the demo batch has no input
    with pytest.raises(UsageError):
        batch_io.check_output_is_not_input(tmp_path / "a.jsonl", tmp_path / "." / "a.jsonl")


def test_a_byte_order_mark_does_not_cost_line_one(tmp_path):
    """Case 8: a UTF-8 BOM before line 1 (Notepad writes one) is not part of the JSON."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(batch_io.BOM + ("\n".join(LINES) + "\n").encode())
    parsed = batch.read_requests(batch.read_input(src), CODEC, "comb")
    assert [p.error for p in parsed] == [None, None, None]
    assert [p.id for p in parsed] == ["q0", "q1", "q2"]


def test_automatic_ids_never_collide_with_explicit_ones():
    """Case 8: an explicit id `line-2` on line 1 used to make line 2 (no id: `line-2`) a duplicate."""
    lines = [json.dumps({"id": "line-2", "question": "a"}), json.dumps({"question": "b"}),
             json.dumps({"id": "line-2~2", "question": "c"}), json.dumps({"question": "d"})]
    parsed = batch.read_requests(lines, CODEC, "comb")
    assert [p.error for p in parsed] == [None] * 4
    assert [p.id for p in parsed] == ["line-2", "line-2~3", "line-2~2", "line-4"]
    assert len({p.request.id for p in parsed}) == 4
    # a real duplicate is still one
    again = batch.read_requests([json.dumps({"id": 7, "question": "a"}), json.dumps({"id": "7", "question": "b"})],
                                CODEC, "comb")
    assert again[0].error is None and "duplicate request id" in again[1].error


@pytest.mark.parametrize("field,obj", [
    ("chunks[1]", {"chunks": ["fine", "s\ud800"], "question": "q"}),
    ("question", {"question": "lone \udfff"}),
    ("messages[0].content", {"messages": [{"role": "user", "content": "\ud83d"}]}),
])
def test_a_lone_surrogate_is_reported_in_its_own_field(field, obj):
    """Case 8: JSON's \\ud800 escape decodes to a lone surrogate; the error names the field that holds it (it used
    to be `'question' could not be tokenized` for a chunk)."""
    line = json.dumps(obj)  # ensure_ascii: the surrogate travels as a \\uXXXX escape, as in a real file
    (parsed,) = batch.read_requests([line], CODEC, "comb")
    assert parsed.error.startswith(f"line 1: '{field}' is not valid UTF-8 text"), parsed.error
