"""Early checks and what reaches a terminal (issue 15, weak cases): `--run-id` refused before
training; example ids with C1 controls or bidi overrides refused; `pact sql`'s table escapes
control characters."""

from __future__ import annotations

import json

import pytest
from hostile.harness import assert_one_error_line, call_pact
from store_fixtures import fill, make_safety

from pact.store import Store


@pytest.mark.parametrize(
    ("identifier", "message"),
    [
        ("a\u0085b", "contains control characters"),  # NEL, C1
        ("a\u009bb", "contains control characters"),  # CSI, C1
        ("a\u007fb", "contains control characters"),  # DEL
        ("abc\u202edcba", "contains bidirectional-text controls"),  # RIGHT-TO-LEFT OVERRIDE
        ("x\u2066y\u2069", "contains bidirectional-text controls"),  # isolates
    ],
)
def test_ids_with_c1_or_bidi_controls_are_refused(tmp_path, identifier, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": identifier, "prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    line = assert_one_error_line(call_pact("data", data), rf"d\.jsonl: row 1 .*field 'id' {message}")
    assert line.isprintable()  # the id is shown escaped


def test_plain_unicode_ids_are_accepted(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "naïve-例-\u05d0", "prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    assert call_pact("data", data).returncode == 0


@pytest.mark.parametrize("run_id", ["bad id", "../escape", ".hidden", "x" * 300, "a\u202eb"])
def test_a_bad_run_id_is_refused_before_anything_is_loaded(tmp_path, run_id):
    """Before: `--run-id` was checked when the metrics were written, after training."""
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    result = call_pact(
        "train", "--model", model, "--data", data, "--out", tmp_path / "run", "--method", "sft", "--run-id", run_id
    )
    assert_one_error_line(result, r"^error: --run-id .* must start with a letter or digit and hold only letters")
    assert not (tmp_path / "run").exists()


def test_sql_table_output_escapes_control_characters(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store, count=1)
    sql = "SELECT chr(27) || '[31mred' || chr(10) || 'error: fake' || chr(8238) AS \"a\x1bb\""
    result = call_pact("sql", store.root, sql)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.isprintable() for line in lines)
    assert "\\x1b[31mred\\nerror: fake\\u202e" in lines[2] and lines[0].startswith("a\\x1bb")


def test_a_huge_prompt_is_refused_before_tokenisation(tiny_tokenizer):
    """The attack: a 50 MB prompt was tokenised (9 GB, 93 s) before the length check. Now the
    size is checked on the text (before: the message counted its tokens)."""
    from pact.core.data import Example
    from pact.core.encoding import EncodingOptions, encode_example
    from pact.core.errors import PactError

    prompt = "word " * 2_000_000
    example = Example(example_id="big", messages=({"role": "user", "content": prompt},), response="ok", content_hash="h", row=1)
    with pytest.raises(PactError, match=r"^example big: the prompt has \d+ characters, more than max_length 64 tokens can hold"):
        encode_example(tiny_tokenizer, example, EncodingOptions(max_length=64))
    fits = Example(example_id="ok", messages=({"role": "user", "content": "word " * 3},), response="ok", content_hash="h", row=1)
    assert encode_example(tiny_tokenizer, fits, EncodingOptions(max_length=64)).response_length > 0
