"""Ingestion: JSON, JSONL and Parquet files of Alpaca, chat or prompt/completion rows.

Every row becomes an `Example` with a stable `example_id`: the row's `id` when it
has one, else a hash of its canonical content (so ids survive reordering and
re-export); identical rows without ids get `<hash>-2`, `<hash>-3`, ...
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pact.core.errors import PactError

FORMATS = ("alpaca", "chat", "prompt_completion")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One conversation: prompt `messages` (ending with a user turn) and the `response`."""

    example_id: str
    messages: tuple[dict[str, str], ...]
    response: str
    content_hash: str
    row: int  # 1-based row (line for JSONL) in the source file

    @property
    def prompt_text(self) -> str:
        """The last user message (what a refusal matcher or a plain prompt shows)."""
        return self.messages[-1]["content"]


@dataclass
class InvalidRow:
    row: int
    example_id: str | None
    reason: str


@dataclass
class LoadResult:
    path: Path
    format: str
    examples: list[Example]
    invalid: list[InvalidRow] = field(default_factory=list)
    identical_without_id: int = 0  # rows identical to an earlier row, kept with `-N` ids
    repeated_with_id: int = 0  # rows repeating an earlier row's id and content, dropped


def content_hash(messages: list[dict[str, str]] | tuple, response: str) -> str:
    """sha256 (first 16 hex) of the canonical JSON of (messages, response)."""
    canonical = json.dumps(
        {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "response": response},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class _RowError(Exception):
    pass


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, raw row) pairs; PactError for unreadable files."""
    if not path.exists():
        raise PactError(f"data file {path} does not exist")
    if path.is_dir():
        raise PactError(f"data file {path} is a directory")
    if not path.is_file():
        raise PactError(f"data file {path} is not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PactError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PactError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise PactError(f"{path} is empty")
    if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line, parse_constant=_reject_constant)))
            except (json.JSONDecodeError, ValueError) as exc:
                raise PactError(f"{path}:{number}: malformed JSON line ({_short(exc)})") from None
            except RecursionError:
                raise PactError(f"{path}:{number}: JSON nested too deeply") from None
        return rows
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        line = getattr(exc, "lineno", None) or _constant_line(text)
        raise PactError(f"{path}:{line}: malformed JSON ({_short(exc)})") from None
    except RecursionError:
        raise PactError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PactError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data, start=1))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _constant_line(text: str) -> int | str:
    """Line of the first bare NaN/Infinity (json reports no position for those)."""
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)\b', text):
        if match.group(1):
            return text.count("\n", 0, match.start(1)) + 1
    return "?"


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split(": line")[0].split())[:200]


def _clip(value: Any, limit: int = 60) -> str:
    """repr of a value cut to `limit` characters, safe to echo in a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        table.validate(full=True)
    except (pa.ArrowException, OSError) as exc:
        raise PactError(f"{path} is not a readable Parquet file ({_short(exc)})") from None
    if table.num_rows == 0:
        raise PactError(f"{path} is empty")
    return list(enumerate(table.to_pylist(), start=1))


def detect_format(row: Any) -> str | None:
    """The shape of one row, or None when it fits none."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "prompt" in row:
        return "prompt_completion"
    if "instruction" in row or "input" in row:
        return "alpaca"
    return None


def _string(row: dict, key: str, *, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(f"missing field '{key}'")
        return None
    value = row[key]
    if not isinstance(value, str):
        if isinstance(value, float) and not math.isfinite(value):
            raise _RowError(f"field '{key}' is {value}, not a string")
        raise _RowError(f"field '{key}' is {type(value).__name__}, not a string")
    return _check_text(value, f"field '{key}'")


def _check_text(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowError(f"{what} contains an unpaired surrogate (invalid Unicode)") from None
    return value


def _parse(row: Any, fmt: str, require_response: bool) -> tuple[list[dict[str, str]], str]:
    if not isinstance(row, dict):
        raise _RowError(f"row is {type(row).__name__}, not an object")
    if fmt == "alpaca":
        instruction = _string(row, "instruction", required=False)
        extra = _string(row, "input", required=False)
        if instruction is None and extra is None:
            raise _RowError("missing field 'instruction' (or 'input')")
        if instruction is None:
            prompt = extra
        else:
            prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        messages = [{"role": "user", "content": prompt}]
        response = _string(row, "output", required=require_response) or ""
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _string(row, "prompt")}]
        response = _string(row, "completion", required=require_response) or ""
    else:
        messages = _parse_messages(row.get("messages"))
        if messages and messages[-1]["role"] == "assistant":
            response = messages.pop()["content"]
        elif require_response:
            raise _RowError("the last message is not an assistant turn (no response)")
        else:
            response = ""
    if not messages or messages[-1]["role"] != "user":
        raise _RowError("the prompt must end with a user message")
    if not messages[-1]["content"].strip():
        raise _RowError("the prompt is empty")
    if require_response and not response.strip():
        raise _RowError("the response is empty")
    return messages, response


def _parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _RowError("field 'messages' is not a non-empty list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _RowError(f"messages[{i}] is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise _RowError(f"messages[{i}] has unknown role {_clip(role)} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise _RowError(f"messages[{i}].content is {type(content).__name__}, not a string")
        messages.append({"role": role, "content": _check_text(content, f"messages[{i}].content")})
    return messages


# Marks, embeddings, overrides and isolates of the Unicode bidirectional algorithm.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _row_id(row: Any) -> str | None:
    if not isinstance(row, dict) or row.get("id") is None:
        return None
    value = row["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(f"field 'id' is {type(value).__name__}, not a string or integer")
    text = str(value)
    if not text.strip():
        raise _RowError("field 'id' is empty")
    if len(text) > 512:
        raise _RowError("field 'id' is longer than 512 characters")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):  # C0, DEL and C1 controls
        raise _RowError("field 'id' contains control characters")
    if any(c in _BIDI_CONTROLS for c in text):
        raise _RowError("field 'id' contains bidirectional-text controls (they reorder what a terminal shows)")
    return _check_text(text, "field 'id'")


def load_examples(
    path: str | Path,
    format: str | None = None,
    *,
    skip_invalid: bool = False,
    require_response: bool = True,
) -> LoadResult:
    """Read and validate a data file.

    format: None (detect from the first row) or one of FORMATS.
    skip_invalid: drop bad rows and list them in `LoadResult.invalid` instead of failing.
    require_response: False for prompt-only files (evaluation prompts).
    Raises PactError with one line naming the file and row for any problem.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise PactError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    rows = _read_rows(path)
    if not rows:
        raise PactError(f"{path} holds no rows")
    fmt = format or detect_format(rows[0][1])
    if fmt is None:
        first = rows[0][1]
        if isinstance(first, dict):
            names = sorted(str(k) for k in first)
            keys = "[" + ", ".join(_clip(k, 40) for k in names[:10]) + (", ..." if len(names) > 10 else "") + "]"
        else:
            keys = type(first).__name__
        raise PactError(
            f"{path}: cannot detect the format from row 1 (fields {keys}); expected "
            "'instruction'/'input'/'output', 'messages' or 'prompt'/'completion' (or pass --format)"
        )
    result = LoadResult(path=path, format=fmt, examples=[])
    by_id: dict[str, Example] = {}
    occurrences: Counter[str] = Counter()
    for number, row in rows:
        try:
            given_id = _row_id(row)
            messages, response = _parse(row, fmt, require_response)
        except _RowError as exc:
            row_id = row.get("id") if isinstance(row, dict) else None
            if not skip_invalid:
                where = f" (id {_clip(row_id)})" if row_id is not None else ""
                raise PactError(f"{path}: row {number}{where}: {exc}") from None
            result.invalid.append(InvalidRow(number, None if row_id is None else " ".join(str(row_id).split())[:80], str(exc)))
            continue
        digest = content_hash(messages, response)
        if given_id is None:
            occurrences[digest] += 1
            count = occurrences[digest]
            example_id = digest if count == 1 else f"{digest}-{count}"
            if count > 1:
                result.identical_without_id += 1
        else:
            example_id = given_id
        example = Example(example_id, tuple(messages), response, digest, number)
        previous = by_id.get(example_id)
        if previous is not None:
            if given_id is not None and previous.content_hash == digest:
                result.repeated_with_id += 1
                continue
            raise PactError(
                f"{path}: id {_clip(example_id)} is used by row {previous.row} and row {number} "
                "with different content"
            )
        by_id[example_id] = example
        result.examples.append(example)
    if not result.examples:
        raise PactError(f"{path}: no valid rows ({len(result.invalid)} invalid)")
    return result
