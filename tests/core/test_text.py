"""`pact sql --format table` cells: control characters escaped, columns aligned by
display width (pact/core/text.py); csv and json stay exact (test_templates.py)."""

from __future__ import annotations

from pact.core.text import display_width, escape_control, pad
from pact.pipeline.commands.sql import format_table


def test_control_characters_are_escaped():
    assert escape_control("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert escape_control("\n\n") == "\\n\\n"
    assert escape_control("\x00\x1b[31m\x7f\x85\x9f") == "\\x00\\x1b[31m\\x7f\\x85\\x9f"
    assert escape_control("line\u2028para\u2029") == "line\\u2028para\\u2029"
    assert escape_control("a literal \\n") == "a literal \\\\n"  # not mistaken for a newline
    assert escape_control("plain ünïcode 你好 😀") == "plain ünïcode 你好 😀"


def test_display_width():
    assert display_width("abc") == 3
    assert display_width("你好") == 4
    assert display_width("日本語テキスト") == 14
    assert display_width("😀") == 2
    assert display_width("e\u0301") == 1  # combining accent
    assert display_width("👨\u200d👩") == 4  # the joiner takes no column
    assert display_width("ｆｕｌｌ") == 8  # full-width forms
    assert pad("你", 4) == "你  " and pad("abc", 2) == "abc"


def test_table_is_one_line_per_row_and_aligned_by_display_width():
    columns = ["token_id", "token", "prob"]
    rows = [(198, "\n", 0.5), (271, "\n\n", 0.25), (9, "\t", 0.1), (100, "你好", 0.05), (101, "😀👍", 0.01),
            (102, "plain", 1.0), (103, None, float("nan"))]  # fmt: skip
    lines = format_table(columns, rows).split("\n")
    assert len(lines) == len(rows) + 3
    body = lines[:-1]
    assert len({display_width(line) for line in body}) == 1
    bars = {tuple(display_width(line[: i]) for i, c in enumerate(line) if c == "|") for line in body[:1] + body[2:]}
    assert len(bars) == 1  # every separator at the same column
    assert lines[2].split(" | ")[1].strip() == "\\n"
    assert lines[3].split(" | ")[1].strip() == "\\n\\n"
    assert lines[4].split(" | ")[1].strip() == "\\t"
    assert lines[-1] == "(7 rows)"


def test_a_list_cell_with_newlines_stays_on_its_line():
    lines = format_table(["tokens"], [(["a\nb", "c"],)]).split("\n")
    assert lines[2] == "[a\\nb, c]" and len(lines) == 4
