"""Checks that a store's cached targets belong to this run, before the first step.

Each check stops with ONE line naming the cause: the store's `reference` entry
(written by `pact precompute`) against the current tokenizer, chat template,
assistant header, encoding options, safety set and reference weights, then every
example's token hash against the hash stored with its targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pact.core.encoding import (
    Encoded,
    EncodingOptions,
    encoding_fingerprints,
    tokenizer_fingerprint,
)
from pact.core.errors import PactError
from pact.store.safety import SafetySet
from pact.store.targets import TargetReader

RERUN = "rerun pact precompute"


def reference_entry(manifest: dict[str, Any], store_root: Any) -> dict[str, Any]:
    """The manifest's `reference` entry; a clear error when precompute never ran."""
    entry = manifest.get("reference")
    if not entry:
        raise PactError(f"store {store_root} has no reference targets: run pact precompute first")
    return entry


def encoding_options_for(
    entry: dict[str, Any] | None,
    max_length: int | None,
    default_max_length: int,
    label_after_end_of_turn: bool = False,
) -> EncodingOptions:
    """The encoding the store's targets were computed with (an explicit `max_length`
    and the `label_after_end_of_turn` choice must agree with it); without a store
    entry, `max_length` or the default."""
    if entry is None:
        return EncodingOptions(
            max_length=max_length or default_max_length, label_after_end_of_turn=label_after_end_of_turn
        )
    stored = entry.get("encoding") or {}
    stored_length = stored.get("max_length")
    if max_length is not None and stored_length != max_length:
        raise PactError(
            f"--max-length {max_length} disagrees with the store's max_length {stored_length} "
            "(its targets were computed with it); omit --max-length or rerun pact precompute"
        )
    try:
        options = EncodingOptions.from_record(stored)
    except TypeError:
        raise PactError(f"the store records unknown encoding options {stored!r}; {RERUN}") from None
    if options.label_after_end_of_turn != label_after_end_of_turn:
        raise PactError(end_of_turn_mismatch(options.label_after_end_of_turn))
    return options


def end_of_turn_mismatch(stored: bool) -> str:
    """The one line refusing targets made under the other end-of-turn rule."""
    if stored:
        return (
            "the store's targets label the tokens after the end-of-turn token (made with "
            "--label-after-end-of-turn, or by a pact before the end-of-turn rule): stale for this run; "
            f"{RERUN}, or pass --label-after-end-of-turn to reproduce the paper's code"
        )
    return (
        "the store's targets stop at the end-of-turn token but --label-after-end-of-turn was given: "
        f"drop it, or {RERUN} --label-after-end-of-turn"
    )


def _mismatch(what: str, stored: Any, current: Any) -> PactError:
    return PactError(
        f"store targets were computed with another {what} (fingerprint {stored} != {current}); {RERUN}"
    )


def check_vocabulary(entry: dict[str, Any], tokenizer: Any) -> None:
    """The tokenizer (vocabulary and special tokens) is the one recorded."""
    current = tokenizer_fingerprint(tokenizer)
    if entry.get("tokenizer") != current:
        raise _mismatch("tokenizer", entry.get("tokenizer"), current)


def check_encoding(entry: dict[str, Any], tokenizer: Any, options: EncodingOptions) -> None:
    """Tokenizer, chat template, assistant header and encoding options as recorded."""
    check_vocabulary(entry, tokenizer)
    current = encoding_fingerprints(tokenizer, options)
    if entry.get("chat_template") != current["chat_template"]:
        raise _mismatch("chat template", entry.get("chat_template"), current["chat_template"])
    if entry.get("assistant_header") != current["assistant_header"]:
        raise PactError(
            f"store targets were computed with another assistant header "
            f"({entry.get('assistant_header')!r} != {current['assistant_header']!r}); {RERUN}"
        )
    recorded = entry.get("encoding")
    try:
        stored = EncodingOptions.from_record(recorded).to_dict() if isinstance(recorded, dict) else recorded
    except (TypeError, PactError):
        stored = recorded
    if stored != current["encoding"]:
        if isinstance(stored, dict) and stored.get("label_after_end_of_turn") != options.label_after_end_of_turn:
            raise PactError(end_of_turn_mismatch(stored["label_after_end_of_turn"]))
        raise PactError(
            f"store targets were computed with other encoding options ({entry.get('encoding')} != {current['encoding']}); {RERUN}"
        )


def check_reference(
    entry: dict[str, Any],
    tokenizer: Any,
    options: EncodingOptions,
    safety: SafetySet | None,
    model_fingerprint: str,
    model_path: str,
) -> None:
    """The whole `reference` entry against this run (the safety set unless None);
    PactError naming the first mismatch."""
    check_encoding(entry, tokenizer, options)
    if safety is not None and entry.get("safety_tokens") != safety.fingerprint:
        raise _mismatch("safety-token set", entry.get("safety_tokens"), safety.fingerprint)
    if entry.get("model") != model_fingerprint:
        raise PactError(
            f"--model {model_path} is not the reference the store was built from "
            f"(model fingerprint {model_fingerprint} != {entry.get('model')}, built from {entry.get('model_path')}); "
            f"fine-tune that model or {RERUN}"
        )


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def check_examples(encoded: Sequence[Encoded], reader: TargetReader) -> None:
    """Every example has finite targets, computed from the same token ids.

    Reads each example's targets once (row group by row group, within the reader's
    memory budget), so NaN/inf stops the run before its first step.
    """
    missing = [e.example_id for e in encoded if e.example_id not in reader]
    if missing:
        raise PactError(
            f"{_plural(len(missing), 'example has', 'examples have')} no targets in the store, "
            f"first: {', '.join(missing[:3])} — run pact precompute"
        )
    changed = [(e, reader.get(e.example_id).token_hash) for e in encoded]
    changed = [(e, stored) for e, stored in changed if stored != e.token_hash]
    if changed:
        first = ", ".join(
            f"{e.example_id} ({stored} != {e.token_hash})" for e, stored in changed[:3]
        )
        raise PactError(
            f"{_plural(len(changed), 'example was', 'examples were')} encoded differently than when "
            f"{'its' if len(changed) == 1 else 'their'} targets were computed (token hash differs), first: {first}; "
            f"other data, tokenizer, chat template or max length? {RERUN}"
        )
