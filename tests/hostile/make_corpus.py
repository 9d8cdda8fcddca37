"""The hostile-input corpus for `pact data FILE`: bad files and the one error line each must give.

Regenerate the files and README.md (deterministic for a given pyarrow version):

    python tests/hostile/make_corpus.py

`CASES` is the single source of truth: tests/test_hostile_inputs.py runs `pact data` on
every file and checks exit code 2, exactly one stderr line `error: <file>...` matching
`error`, and no traceback. A case with `known_bug` set is a strict xfail until the bug
named there is fixed; then clear `known_bug` and regenerate README.md.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"
README = HERE / "README.md"

OK_ROW = {"prompt": "Say hi.", "completion": "hi"}
MILLION = 10**6
NESTING = 50_000


@dataclass(frozen=True)
class BadFile:
    """One corpus file: `write(path)` creates it; `error` is a regex the error line must match."""

    name: str
    what: str
    error: str
    write: Callable[[Path], None]
    known_bug: str | None = None


def _line(row: object) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content.encode("utf-8"))


def raw(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def jsonl(*rows: object) -> Callable[[Path], None]:
    return text("".join(_line(r) for r in rows))


def parquet(columns: dict) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        pq.write_table(pa.table(columns), path)

    return write


def _invalid_utf8_string_column(path: Path) -> None:
    offsets = pa.py_buffer(np.array([0, 4], dtype=np.int32).tobytes())
    prompt = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"ab\xff\xfe")])
    pq.write_table(pa.table({"prompt": prompt, "completion": ["hi"]}), path)


def _good_parquet_bytes() -> tuple[bytes, object]:
    table = pa.table({"prompt": ["hello world " * 50, "abc " * 80], "completion": ["c" * 300, "d" * 300]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="snappy")
    data = buffer.getvalue()
    return data, pq.ParquetFile(io.BytesIO(data)).metadata


def _flip(data: bytes, positions: range) -> bytes:
    damaged = bytearray(data)
    for i in positions:
        damaged[i] ^= 0xA5
    return bytes(damaged)


def _truncated_parquet(path: Path) -> None:
    data, _ = _good_parquet_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupted_page_payload(path: Path) -> None:
    """Flip bytes at the end of the `prompt` dictionary page: its snappy payload no longer decodes."""
    data, metadata = _good_parquet_bytes()
    column = metadata.row_group(0).column(0)
    end = column.data_page_offset
    path.write_bytes(_flip(data, range(end - 40, end - 2, 3)))


def _corrupted_page_header(path: Path) -> None:
    """Flip the first bytes of the `prompt` data page header (Thrift)."""
    data, metadata = _good_parquet_bytes()
    start = metadata.row_group(0).column(0).data_page_offset
    path.write_bytes(_flip(data, range(start, start + 12)))


def _corrupted_footer(path: Path) -> None:
    """Flip bytes inside the Thrift footer (file metadata), leaving the PAR1 magic intact."""
    data, _ = _good_parquet_bytes()
    footer_length = int.from_bytes(data[-8:-4], "little")
    footer_start = len(data) - 8 - footer_length
    path.write_bytes(_flip(data, range(footer_start + 4, footer_start + 40, 2)))


_UTF8_LINE_3_OFFSET = 2 * len(json.dumps(OK_ROW)) + 2 + len('{"prompt": "caf')

CASES: list[BadFile] = [
    # -- truncated or malformed JSON ----------------------------------------------------------
    BadFile("truncated_array.json", "JSON array cut off in its second row",
            r"truncated_array\.json:2: malformed JSON \(",
            text('[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "compl')),
    BadFile("truncated_last_line.jsonl", "JSONL whose 4th line is cut mid-string",
            r"truncated_last_line\.jsonl:4: malformed JSON line",
            text(_line(OK_ROW) * 3 + '{"prompt": "d", "completion": "e')),
    BadFile("truncated_escape.jsonl", "line ends inside a \\u escape",
            r"truncated_escape\.jsonl:1: malformed JSON line", text('{"prompt": "a\\u12')),
    BadFile("jsonl_in_json.json", "two JSON objects on two lines in a .json file",
            r"jsonl_in_json\.json:2: malformed JSON \(Extra data\)", jsonl(OK_ROW, OK_ROW)),
    BadFile("nan_constant.json", "bare NaN (not JSON) on line 2 of a .json array",
            r"nan_constant\.json:2: malformed JSON \(NaN is not valid JSON\)$",
            text('[\n {"prompt": "a", "completion": NaN}\n]')),
    BadFile("nan_after_nan_text.json", "bare NaN on line 2, after a string holding ', NaN' on line 1",
            r"nan_after_nan_text\.json:2: malformed JSON \(NaN is not valid JSON\)$",
            text('[{"prompt": "a, NaN", "completion": "b"},\n {"prompt": "a", "completion": NaN}]')),
    BadFile("infinity_constant.jsonl", "bare -Infinity on line 2",
            r"infinity_constant\.jsonl:2: malformed JSON line \(-Infinity is not valid JSON\)",
            text(_line(OK_ROW) + '{"prompt": "a", "completion": -Infinity}\n')),
    BadFile("nul_byte_in_string.jsonl", "raw NUL byte inside a JSON string",
            r"nul_byte_in_string\.jsonl:1: malformed JSON line \(Invalid control character",
            text('{"prompt": "a\x00b", "completion": "c"}\n')),
    BadFile("csv_file.csv", "a CSV file (not JSON, JSONL or Parquet)",
            r"csv_file\.csv:1: malformed JSON line", text("prompt,completion\nhi,hello\n")),
    BadFile("deep_nesting.json", f"array nested {NESTING} levels deep",
            r"deep_nesting\.json: JSON nested too deeply$", text("[" * NESTING + "]" * NESTING)),
    BadFile("deep_nesting.jsonl", f"a prompt nested {NESTING} levels deep",
            r"deep_nesting\.jsonl:1: JSON nested too deeply$",
            text('{"prompt": ' + "[" * NESTING + "]" * NESTING + ', "completion": "b"}\n')),
    BadFile("huge_line_unterminated.jsonl", "one 10^6-character line with an unterminated string",
            r"huge_line_unterminated\.jsonl:1: malformed JSON line \(Unterminated string",
            text('{"prompt": "' + "x" * MILLION + "\n")),
    BadFile("int_5000_digits.jsonl", "an id with 5000 digits (past Python's int-conversion limit)",
            r"int_5000_digits\.jsonl:1: malformed JSON line \(Exceeds the limit",
            text('{"id": ' + "9" * 5000 + ', "prompt": "a", "completion": "b"}\n')),
    # -- encodings ------------------------------------------------------------------------------
    BadFile("latin1.jsonl", "Latin-1 encoded text (\\xe9 for e-acute)",
            r"latin1\.jsonl:1: not valid UTF-8 \(byte 15\)", raw(b'{"prompt": "caf\xe9", "completion": "b"}\n')),
    BadFile("overlong_utf8.jsonl", "overlong UTF-8 encoding of '/' (C0 AF)",
            r"overlong_utf8\.jsonl:1: not valid UTF-8 \(byte 12\)", raw(b'{"prompt": "\xc0\xaf", "completion": "b"}\n')),
    BadFile("cesu8_surrogate.jsonl", "a UTF-16 surrogate encoded as 3 UTF-8 bytes (ED A0 80)",
            r"cesu8_surrogate\.jsonl:1: not valid UTF-8 \(byte 12\)", raw(b'{"prompt": "\xed\xa0\x80", "completion": "b"}\n')),
    BadFile("truncated_multibyte.jsonl", "file ends inside a 2-byte UTF-8 character",
            r"truncated_multibyte\.jsonl:1: not valid UTF-8 \(byte 15\)", raw(b'{"prompt": "caf\xc3')),
    BadFile("utf16.jsonl", "UTF-16 (with BOM) instead of UTF-8",
            r"utf16\.jsonl:1: not valid UTF-8 \(byte 0\)", raw((_line(OK_ROW)).encode("utf-16"))),
    BadFile("gzip_not_decompressed.jsonl", "gzip-compressed JSONL under a .jsonl name",
            r"gzip_not_decompressed\.jsonl:1: not valid UTF-8 \(byte 1\)",
            raw(gzip.compress(_line(OK_ROW).encode(), mtime=0))),
    BadFile("latin1_line3.jsonl", "two good lines, then Latin-1 text on line 3",
            rf"latin1_line3\.jsonl:3: not valid UTF-8 \(byte {_UTF8_LINE_3_OFFSET}\)$",
            raw(_line(OK_ROW).encode() * 2 + b'{"prompt": "caf\xe9", "completion": "b"}\n')),
    BadFile("lone_surrogate_escape.jsonl", "JSON escape \\ud800 (unpaired surrogate) in the prompt",
            r"lone_surrogate_escape\.jsonl: row 1: field 'prompt' contains an unpaired surrogate \(invalid Unicode\)$",
            text('{"prompt": "a\\ud800b", "completion": "c"}\n')),
    BadFile("lone_surrogate_in_message.jsonl", "JSON escape \\udc00 (unpaired surrogate) in a chat message",
            r"lone_surrogate_in_message\.jsonl: row 1: messages\[0\]\.content contains an unpaired surrogate "
            r"\(invalid Unicode\)$",
            text(json.dumps({"messages": [{"role": "user", "content": "a\udc00"},
                                          {"role": "assistant", "content": "b"}]}) + "\n")),
    # -- empty or wrong top level -------------------------------------------------------------
    BadFile("zero_bytes.jsonl", "an empty file", r"zero_bytes\.jsonl is empty", raw(b"")),
    BadFile("whitespace_only.json", "only blank lines", r"whitespace_only\.json is empty", text("\n \n\t\n")),
    BadFile("empty_array.json", "a JSON list with no rows", r"empty_array\.json holds no rows", text("[]")),
    BadFile("top_level_number.json", "a bare number", r"top_level_number\.json: expected a JSON list of rows, got int", text("42")),
    BadFile("data_not_a_list.json", '{"data": {...}} instead of {"data": [...]}',
            r"data_not_a_list\.json: expected a JSON list of rows, got dict", text('{"data": {"prompt": "a"}}')),
    # -- wrong types --------------------------------------------------------------------------
    BadFile("prompt_is_list.jsonl", "prompt is a list", r"prompt_is_list\.jsonl: row 1: field 'prompt' is list, not a string",
            jsonl({"prompt": ["a"], "completion": "b"})),
    BadFile("completion_is_object.jsonl", "completion is an object on row 2",
            r"completion_is_object\.jsonl: row 2: field 'completion' is dict, not a string",
            jsonl(OK_ROW, {"prompt": "a", "completion": {"text": "b"}})),
    BadFile("completion_overflows_to_inf.jsonl", "completion 1e400 (parses to inf)",
            r"completion_overflows_to_inf\.jsonl: row 1: field 'completion' is inf, not a string",
            text('{"prompt": "a", "completion": 1e400}\n')),
    BadFile("messages_is_string.jsonl", "messages is a string",
            r"messages_is_string\.jsonl: row 1: field 'messages' is not a non-empty list", jsonl({"messages": "hi"})),
    BadFile("content_parts_list.json", "OpenAI-style content parts (a list) instead of a string",
            r"content_parts_list\.json: row 1: messages\[0\]\.content is list, not a string",
            text(json.dumps([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                           {"role": "assistant", "content": "hello"}]}]))),
    BadFile("tool_role.jsonl", "a 'tool' message (unsupported role) on row 2",
            r"tool_role\.jsonl: row 2: messages\[1\] has unknown role 'tool'",
            jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                  {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "{}"},
                                {"role": "assistant", "content": "b"}]})),
    BadFile("no_user_turn.jsonl", "system + assistant, no user message",
            r"no_user_turn\.jsonl: row 1: the prompt must end with a user message",
            jsonl({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]})),
    BadFile("blank_prompt.jsonl", "prompt of spaces and tabs", r"blank_prompt\.jsonl: row 1: the prompt is empty",
            jsonl({"prompt": " \t ", "completion": "b"})),
    BadFile("row_is_string.jsonl", "row 2 is a JSON string", r"row_is_string\.jsonl: row 2: row is str, not an object",
            jsonl(OK_ROW, "just a string")),
    BadFile("id_is_bool.jsonl", "id true", r"id_is_bool\.jsonl: row 1 .*field 'id' is bool, not a string or integer",
            jsonl({"id": True, **OK_ROW})),
    BadFile("id_is_float.jsonl", "id 1.5", r"id_is_float\.jsonl: row 1 .*field 'id' is float, not a string or integer",
            jsonl({"id": 1.5, **OK_ROW})),
    BadFile("id_blank.jsonl", "id of spaces", r"id_blank\.jsonl: row 1 .*field 'id' is empty", jsonl({"id": "  ", **OK_ROW})),
    # -- huge fields ----------------------------------------------------------------------------
    BadFile("field_1e6_id.jsonl", "an id of 10^6 characters",
            r"field_1e6_id\.jsonl: row 1 \(id 'i+\.\.\.\): field 'id' is longer than 512 characters$",
            jsonl({"id": "i" * MILLION, **OK_ROW})),
    BadFile("field_1e6_key.json", "a row whose only key has 10^6 characters",
            r"field_1e6_key\.json: cannot detect the format from row 1 \(fields \['k+\.\.\.\]\)",
            text(json.dumps([{"k" * MILLION: "v"}]))),
    BadFile("field_1e6_role.parquet", "a chat message whose role has 10^6 characters",
            r"field_1e6_role\.parquet: row 1: messages\[0\] has unknown role 'r+\.\.\. \(expected one of",
            parquet({"messages": [[{"role": "r" * MILLION, "content": "a"}, {"role": "assistant", "content": "b"}]]})),
    BadFile("newline_in_id.jsonl", "an id holding a newline and a fake 'error:' line, on a bad row",
            r"newline_in_id\.jsonl: row 1 \(id 'a\\nerror: injected second line'\): "
            r"field 'id' contains control characters$",
            jsonl({"id": "a\nerror: injected second line", "prompt": 3, "completion": "b"})),
    # -- duplicate ids --------------------------------------------------------------------------
    BadFile("duplicate_ids.jsonl", "rows 1 and 4 share id 'a' with different content",
            r"duplicate_ids\.jsonl: id 'a' is used by row 1 and row 4 with different content",
            jsonl({"id": "a", **OK_ROW}, {"id": "b", **OK_ROW}, {"id": "c", **OK_ROW},
                  {"id": "a", "prompt": "other", "completion": "x"})),
    BadFile("duplicate_ids_int_and_str.jsonl", "id 7 and id \"7\" (same after str()) with different content",
            r"duplicate_ids_int_and_str\.jsonl: id '7' is used by row 1 and row 2 with different content",
            jsonl({"id": 7, **OK_ROW}, {"id": "7", "prompt": "other", "completion": "x"})),
    BadFile("duplicate_ids.parquet", "Parquet rows 2 and 3 share id 'x' with different content",
            r"duplicate_ids\.parquet: id 'x' is used by row 2 and row 3 with different content",
            parquet({"id": ["w", "x", "x"], "prompt": ["a", "b", "c"], "completion": ["d", "e", "f"]})),
    # -- Parquet: non-finite values, wrong types, corruption ------------------------------------
    BadFile("nan_completion.parquet", "float completion column, NaN on row 1",
            r"nan_completion\.parquet: row 1: field 'completion' is nan, not a string",
            parquet({"prompt": ["a", "b"], "completion": [float("nan"), 1.0]})),
    BadFile("inf_prompt.parquet", "float prompt column, inf on row 1",
            r"inf_prompt\.parquet: row 1: field 'prompt' is inf, not a string",
            parquet({"prompt": [float("inf"), 1.0], "completion": ["b", "c"]})),
    BadFile("nan_id.parquet", "float id column holding NaN",
            r"nan_id\.parquet: row 1 .*field 'id' is float, not a string or integer",
            parquet({"id": [float("nan")], "prompt": ["a"], "completion": ["b"]})),
    BadFile("int_instruction.parquet", "Alpaca instruction column of int64",
            r"int_instruction\.parquet: row 1: field 'instruction' is int, not a string",
            parquet({"instruction": [1], "output": ["b"]})),
    BadFile("binary_prompt.parquet", "prompt column of binary (bytes) type",
            r"binary_prompt\.parquet: row 1: field 'prompt' is bytes, not a string",
            parquet({"prompt": [b"a"], "completion": ["b"]})),
    BadFile("null_completion.parquet", "null completion on row 2",
            r"null_completion\.parquet: row 2: missing field 'completion'",
            parquet({"prompt": ["a", "b"], "completion": ["c", None]})),
    BadFile("messages_as_json_string.parquet", "messages column holding JSON text instead of a list",
            r"messages_as_json_string\.parquet: row 1: field 'messages' is not a non-empty list",
            parquet({"messages": [json.dumps([{"role": "user", "content": "a"}])]})),
    BadFile("messages_list_of_strings.parquet", "messages column of list<string>",
            r"messages_list_of_strings\.parquet: row 1: messages\[0\] is not an object",
            parquet({"messages": [["hi", "there"]]})),
    BadFile("zero_rows.parquet", "valid schema, no rows", r"zero_rows\.parquet is empty",
            parquet({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())})),
    BadFile("invalid_utf8_string_column.parquet", "string column holding the bytes FF FE",
            r"invalid_utf8_string_column\.parquet is not a readable Parquet file \(.*Invalid UTF8 sequence",
            _invalid_utf8_string_column),
    BadFile("zero_bytes.parquet", "an empty .parquet file", r"zero_bytes\.parquet is not a readable Parquet file", raw(b"")),
    BadFile("json_named_parquet.parquet", "JSON text under a .parquet name",
            r"json_named_parquet\.parquet is not a readable Parquet file", text(json.dumps([OK_ROW]))),
    BadFile("truncated.parquet", "first half of a valid Parquet file",
            r"truncated\.parquet is not a readable Parquet file", _truncated_parquet),
    BadFile("corrupted_page_payload.parquet", "snappy payload of a dictionary page damaged",
            r"corrupted_page_payload\.parquet is not a readable Parquet file \(Corrupt snappy", _corrupted_page_payload),
    BadFile("corrupted_page_header.parquet", "Thrift header of a data page damaged",
            r"corrupted_page_header\.parquet is not a readable Parquet file \(.*thrift.*\)$", _corrupted_page_header),
    BadFile("corrupted_footer.parquet", "Thrift footer (file metadata) damaged, magic bytes intact",
            r"corrupted_footer\.parquet is not a readable Parquet file \(.*thrift.*\)$", _corrupted_footer),
]


def write_corpus(directory: Path) -> list[Path]:
    """Write every case of CASES into `directory` (created); return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in CASES:
        path = directory / case.name
        case.write(path)
        paths.append(path)
    return paths


def suite_lines() -> list[str]:
    """One line per `test_hostile_*.py` suite beside this file: its name and the first
    sentence of its docstring."""
    lines = []
    for path in sorted(HERE.glob("test_hostile_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        first = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0]
        lines.append(f"- `{path.name}`: {first.replace('|', chr(92) + '|')}")
    return lines


def readme_text() -> str:
    """README.md for the corpus, generated from CASES, and the list of the hostile suites."""
    lines = [
        "# Hostile and broken inputs for `pact data`",
        "",
        "Generated by `python tests/hostile/make_corpus.py` (do not edit by hand); checked by",
        "`python -m pytest tests/test_hostile_inputs.py`.",
        "",
        "For every file, `pact data tests/hostile/files/<file>` must exit with code 2, print",
        "nothing on stdout and exactly one stderr line `error: ...` that names the file, matches",
        "the pattern below (a Python regex) and stays under 500 characters; never a traceback.",
        "Files marked **known bug** fail that today: their test is a strict xfail until the",
        "fix named in `make_corpus.py` lands (then clear `known_bug` there and regenerate).",
        "",
        "| file | what is wrong | the error line must match | status |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        pattern = case.error.replace("|", "\\|")
        status = "**known bug**" if case.known_bug else "held"
        lines.append(f"| `{case.name}` | {case.what} | `{pattern}` | {status} |")
    total = sum((FILES / c.name).stat().st_size for c in CASES if (FILES / c.name).exists())
    bugs = sum(1 for c in CASES if c.known_bug)
    lines += [
        "",
        f"{len(CASES)} files, {bugs} known bug{'' if bugs == 1 else 's'}, "
        f"{total / 1e6:.1f} MB in all.",
        "",
        "## The hostile suites",
        "",
        "Every `tests/hostile/test_hostile_*.py` (the attack run of issue 15, one suite per",
        "surface), with the first sentence of its docstring:",
        "",
        *suite_lines(),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    write_corpus(FILES)
    README.write_text(readme_text(), encoding="utf-8")
    sys.stdout.write(f"wrote {len(CASES)} files to {FILES} and {README}\n")


if __name__ == "__main__":
    main()
