"""Cells of a plain-text table: one line each, padded by display width.

Real tokens hold "\\n", "\\t" and "\\r", and real data CJK and emoji: printed raw, a
newline splits a row and wide characters shift the columns after them. `pact sql
--format table` (and `pact eval`'s summary) escape control characters and pad by the
terminal columns a cell takes; csv and json print values exactly.
"""

from __future__ import annotations

import re
import unicodedata

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
# C0, DEL, C1, the line and paragraph separators, the bidirectional-text controls (a
# right-to-left override would reorder the rest of the line), and the backslash (so
# "\\n" stays distinguishable from a newline).
_ESCAPED = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\\\\]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` on one line: newline, tab, carriage return and backslash as `\\n`, `\\t`,
    `\\r`, `\\\\`; other C0/C1 control characters as `\\xNN`; the line/paragraph separators
    and bidirectional-text controls as `\\uNNNN`."""
    return _ESCAPED.sub(_escape, text)


def message_line(text: str) -> str:
    """`text` as one line of an error or warning: control characters (a newline in a file
    name would print a second, forged line) and bidirectional-text controls escaped as in
    `escape_control`; backslashes kept."""
    return _CONTROL.sub(_escape, text)


def display_width(text: str) -> int:
    """Terminal columns `text` takes: 2 per wide or full-width character (CJK, most
    emoji; `unicodedata.east_asian_width` W/F), 0 per combining mark and format
    character (accents, zero-width joiner, variation selectors), 1 otherwise."""
    if text.isascii():
        return len(text)
    width = 0
    for char in text:
        if unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def pad(text: str, width: int) -> str:
    """`text` left-aligned in `width` display columns."""
    return text + " " * max(width - display_width(text), 0)


def one_line(text: str, limit: int) -> str:
    """`text` for a one-line message: whitespace runs (newlines included) as one space,
    control characters escaped, cut to `limit` characters with '...'."""
    text = escape_control(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
