"""Data text that the tokenizer reads as special tokens.

A literal `<|im_end|>` in a user message or a response is not text to a tokenizer:
it encodes as the control token, so the example silently ends a turn where it
does not. `pact data --tokenizer`, `pact precompute` and `pact train` warn with
`special_text_warning`; the examples are encoded as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pact.core.encoding import special_token_ids

if TYPE_CHECKING:
    from pact.core.data import Example

SHOWN_ROWS = 3


@dataclass(frozen=True)
class SpecialTextRow:
    """One row whose text holds special-token strings (in order of first appearance)."""

    row: int  # 1-based row of the source file
    example_id: str
    tokens: tuple[str, ...]


def special_text_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching any of the tokenizer's special-token strings (longest first),
    None when it has none."""
    texts = sorted(special_token_ids(tokenizer), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def rows_with_special_text(examples: Sequence[Example], tokenizer: Any) -> list[SpecialTextRow]:
    """The examples whose messages or response contain special-token strings."""
    pattern = special_text_pattern(tokenizer)
    if pattern is None:
        return []
    found = []
    for example in examples:
        texts = [m.get("content") or "" for m in example.messages] + [example.response or ""]
        tokens = dict.fromkeys(match for text in texts for match in pattern.findall(text))
        if tokens:
            found.append(SpecialTextRow(example.row, example.example_id, tuple(tokens)))
    return found


def special_text_warning(examples: Sequence[Example], tokenizer: Any) -> str | None:
    """One warning line naming how many rows hold special-token strings and the first
    rows with the strings found, or None when no row does."""
    found = rows_with_special_text(examples, tokenizer)
    if not found:
        return None
    shown = "; ".join(f"row {r.row}: {', '.join(r.tokens)}" for r in found[:SHOWN_ROWS])
    more = f"; and {len(found) - SHOWN_ROWS} more" if len(found) > SHOWN_ROWS else ""
    return (
        f"warning: {len(found)} of {len(examples)} rows contain the tokenizer's special-token strings, "
        f"which encode as control tokens, not text ({shown}{more}); clean or escape them if they are text"
    )
