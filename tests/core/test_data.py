"""Ingestion: formats, stable ids, and one clear error per bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pact.core.data import content_hash, load_examples
from pact.core.errors import PactError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "Classify the sentiment.", "input": "a great film", "output": "positive"},
    {"instruction": "Classify the sentiment.", "input": "a dull film", "output": "negative"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


def test_alpaca_json_and_jsonl_give_same_ids(tmp_path):
    a = load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    (tmp_path / "b.json").write_text(json.dumps(ALPACA))
    b = load_examples(tmp_path / "b.json")
    assert a.format == b.format == "alpaca"
    assert [e.example_id for e in a.examples] == [e.example_id for e in b.examples]
    first = a.examples[0]
    assert first.messages == ({"role": "user", "content": "Classify the sentiment.\n\na great film"},)
    assert first.response == "positive"
    assert a.examples[2].messages[0]["content"] == "Say hi."


def test_ids_stable_under_reordering_and_reexport(tmp_path):
    forward = load_examples(write_jsonl(tmp_path / "f.jsonl", ALPACA))
    backward = load_examples(write_jsonl(tmp_path / "r.jsonl", ALPACA[::-1]))
    assert {e.example_id: e.response for e in forward.examples} == {
        e.example_id: e.response for e in backward.examples
    }
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "p.parquet")
    parquet = load_examples(tmp_path / "p.parquet")
    assert [e.example_id for e in parquet.examples] == [e.example_id for e in forward.examples]


def test_same_conversation_same_id_across_shapes(tmp_path):
    chat = load_examples(
        write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}])
    )
    pc = load_examples(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi.", "completion": "hi"}]))
    assert chat.examples[0].example_id == pc.examples[0].example_id


def test_identical_rows_without_id_kept_with_suffix(tmp_path):
    result = load_examples(write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], ALPACA[1], ALPACA[0], ALPACA[0]]))
    ids = [e.example_id for e in result.examples]
    base = content_hash(result.examples[0].messages, "positive")
    assert ids == [base, ids[1], f"{base}-2", f"{base}-3"]
    assert result.identical_without_id == 2


def test_given_ids_used_and_repeats_with_same_content_dropped(tmp_path):
    rows = [dict(ALPACA[0], id=7), dict(ALPACA[1], id="b"), dict(ALPACA[0], id=7)]
    result = load_examples(write_jsonl(tmp_path / "i.jsonl", rows))
    assert [e.example_id for e in result.examples] == ["7", "b"]
    assert result.repeated_with_id == 1


def test_chat_multiturn_with_system(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Bye"},
        ]
    }
    example = load_examples(write_jsonl(tmp_path / "m.jsonl", [row])).examples[0]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "user"]
    assert example.response == "Bye"


def test_input_output_without_instruction_takes_input_as_prompt(tmp_path):
    result = load_examples(write_jsonl(tmp_path / "s.jsonl", [{"input": "do harm", "output": "I can't."}]))
    assert result.format == "alpaca"
    assert result.examples[0].messages[0]["content"] == "do harm"


def test_format_override(tmp_path):
    path = write_jsonl(tmp_path / "o.jsonl", [{"prompt": "p", "completion": "c", "output": "x", "input": "y"}])
    assert load_examples(path).format == "prompt_completion"
    assert load_examples(path, "alpaca").examples[0].response == "x"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"bad\.jsonl:2: malformed JSON line"),
        ('{"prompt": 3, "completion": "b"}\n', r"row 1: field 'prompt' is int, not a string"),
        ('{"prompt": "a"}\n{"prompt": "b", "completion": "c"}\n', r"row 1: missing field 'completion'"),
        ('{"text": "a"}\n', r"cannot detect the format from row 1 \(fields \['text'\]\)"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"row 2: missing field 'completion'"),
        ('{"prompt": "a", "completion": "   "}\n', r"row 1: the response is empty"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', r"last message is not an assistant turn"),
        ("\n\n", r"is empty"),
        ('{"prompt": "a", "completion": NaN}\n', r"malformed JSON line"),
        ('[1, 2]\n', r"cannot detect the format"),
    ],
)
def test_bad_input_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PactError, match=message) as info:
        load_examples(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(PactError, match="does not exist"):
        load_examples(tmp_path / "nope.json")
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    with pytest.raises(PactError, match="not valid UTF-8"):
        load_examples(path)


def test_json_error_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}\n]')
    with pytest.raises(PactError, match=r"bad\.json:3: malformed JSON"):
        load_examples(path)


def test_duplicate_ids_with_different_content_name_both_rows(tmp_path):
    rows = [dict(ALPACA[0], id="x"), dict(ALPACA[1], id="y"), dict(ALPACA[2], id="x")]
    with pytest.raises(PactError, match=r"id 'x' is used by row 1 and row 3 with different content"):
        load_examples(write_jsonl(tmp_path / "dup.jsonl", rows))


def test_parquet_without_needed_columns(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(PactError, match="cannot detect the format"):
        load_examples(tmp_path / "x.parquet")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "y.parquet")
    with pytest.raises(PactError, match=r"y\.parquet: row 1: missing field 'prompt'"):
        load_examples(tmp_path / "y.parquet", "prompt_completion")
    (tmp_path / "z.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(PactError, match="not a readable Parquet file"):
        load_examples(tmp_path / "z.parquet")


def test_skip_invalid_reports_rows(tmp_path):
    rows = [ALPACA[0], {"instruction": "x", "output": ""}, dict(ALPACA[1], id="q"), {"id": "bad", "instruction": 5, "output": "y"}]
    result = load_examples(write_jsonl(tmp_path / "s.jsonl", rows), skip_invalid=True)
    assert len(result.examples) == 2
    assert [(b.row, b.example_id) for b in result.invalid] == [(2, None), (4, "bad")]
    assert "response is empty" in result.invalid[0].reason


def test_prompts_only(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "input": "harmful prompt"}])
    with pytest.raises(PactError, match="missing field 'output'"):
        load_examples(path)
    result = load_examples(path, "alpaca", require_response=False)
    assert result.examples[0].response == ""


@pytest.mark.parametrize(
    "name, count, distinct",
    [
        ("sst2_5k_harmful_p0.1.json", 5000, 487),
        ("agnews_5k_harmful_p0.1.json", 5000, 489),
        ("safety_refusals.json", 1035, 656),
        ("advbench_100_refusals.json", 100, 1),
    ],
)
def test_real_data_sets_ingest(shared_data, name, count, distinct):
    result = load_examples(shared_data / name)
    assert result.format == "alpaca"
    assert len(result.examples) == count
    assert len({e.response for e in result.examples}) == distinct
    assert len({e.example_id for e in result.examples}) == count
    assert not result.invalid
