"""Precompute's side of the store: claim the reference in the manifest (a changed
reference drops every part), plan the work against what is stored (skip, stale,
non-finite, responses to repair), drop the rows to recompute, and check at the end
that every example is stored."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pact.core.atomic import atomic_write_with
from pact.core.encoding import Encoded, encoding_fingerprints
from pact.pipeline.precompute.options import PrecomputeOptions
from pact.store.manifest import Store
from pact.store.safety import SafetySet
from pact.store.targets import ROW_GROUP_ROWS, TargetReader, unreadable_part

# Reference-entry keys whose change invalidates every stored row (post-only rows included).
GLOBAL_REFERENCE_KEYS = (
    "model",
    "safety_tokens",
    "tokenizer",
    "chat_template",
    "assistant_header",
    "compute_dtype",
    "value_dtype",
)


def reference_entry(
    model_dir: Path, fingerprint: str, compute_dtype: torch.dtype, options: PrecomputeOptions,
    safety: SafetySet, tokenizer: Any,
) -> dict[str, Any]:
    """The manifest's `reference` entry: what the stored targets were computed with."""
    return {
        "model": fingerprint,
        "model_path": str(model_dir.resolve()),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "value_dtype": options.value_dtype,
        "safety_tokens": safety.fingerprint,
        **encoding_fingerprints(tokenizer, options.encoding()),
    }


def claim_reference(store: Store, reference: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Record `reference` in the manifest; when the stored one differs in a global key,
    unregister every part in the same update. Returns (changed keys, dropped part paths)."""
    changed: list[str] = []
    dropped: list[str] = []

    def change(manifest: dict[str, Any]) -> None:
        old = manifest.get("reference")
        if old is not None and manifest["parts"]:
            changed.extend(k for k in GLOBAL_REFERENCE_KEYS if old.get(k) != reference[k])
            if changed:
                dropped.extend(p["path"] for p in manifest["parts"])
                manifest["parts"] = []
        manifest["reference"] = reference

    store.update_manifest(change)
    for relative in dropped:
        store.resolve(relative).unlink(missing_ok=True)
    return changed, dropped


def drop_rows(store: Store, example_ids: set[str], response_hashes: set[str], shard_tag: str) -> int:
    """Rewrite every targets part holding rows of `example_ids`, and every post part
    holding rows of `response_hashes`, without them.

    Runs inside one manifest update (under the store lock): each replacement part is
    written atomically under a new name tagged `shard_tag` (an orphan if we die before
    the manifest is written: the next writer with that tag deletes it), the manifest
    swaps old entries for new ones, then the old files are deleted. Returns bytes written.
    """
    drops = {
        "targets": ("example_id", pa.array(sorted(example_ids), pa.string())),
        "post": ("response_hash", pa.array(sorted(response_hashes), pa.string())),
    }
    replaced: list[str] = []
    written = 0

    def change(manifest: dict[str, Any]) -> None:
        nonlocal written
        parts = []
        for entry in manifest["parts"]:
            key, value_set = drops[entry["kind"]]
            if len(value_set) == 0:
                parts.append(entry)
                continue
            path = store.resolve(entry["path"])
            keys = pq.read_table(path, columns=[key]).column(key)
            drop = pc.is_in(keys, value_set=value_set)
            if not pc.any(drop).as_py():
                parts.append(entry)
                continue
            replaced.append(entry["path"])
            kept = pq.read_table(path).filter(pc.invert(drop))
            if kept.num_rows == 0:
                continue
            relative = f"{entry['kind']}/part-{shard_tag}-{uuid.uuid4().hex[:12]}.parquet"
            final = store.root / relative
            atomic_write_with(
                final,
                lambda p, t=kept: pq.write_table(t, p, row_group_size=ROW_GROUP_ROWS, write_page_checksum=True),
            )
            size = final.stat().st_size
            written += size
            examples = len(pc.unique(kept.column(key)))
            parts.append(
                {"kind": entry["kind"], "path": relative, "rows": kept.num_rows, "examples": examples, "bytes": size}
            )
        manifest["parts"] = parts

    store.update_manifest(change)
    for relative in replaced:
        store.resolve(relative).unlink(missing_ok=True)
    return written


def _non_finite_rows(array: pa.Array) -> np.ndarray:
    """bool [rows]: a NaN, inf or null in the row (any entry of a fixed-size list row)."""
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
        flat = array.values.slice(array.offset * width, len(array) * width).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(flat).reshape(len(array), width).all(axis=1)
    else:
        bad = ~np.isfinite(array.to_numpy(zero_copy_only=False))
    if array.null_count:
        bad |= array.is_null().to_numpy(zero_copy_only=False)
    return bad


def _scan_parts(
    store: Store, kind: str, key: str, wanted: set[str], values: tuple[str, ...], label: str | None = None
) -> tuple[set[str], dict[str, Any]]:
    """Among the rows of registered `kind` parts whose `key` is in `wanted`: the keys with
    NaN/inf (or null) in any of the `values` columns, and (with `label`) key -> that
    column's value at step 0.

    Reads one row group at a time (its key column first: a row group holding none of
    `wanted`, e.g. another shard's, is skipped), so memory stays at one row group
    whatever the store's size."""
    bad: set[str] = set()
    labels: dict[str, Any] = {}
    if not wanted:
        return bad, labels
    columns = [*values, *(("step", label) if label is not None else ())]
    for entry in store.parts(kind):
        path = store.resolve(entry["path"])
        try:
            handle = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
            for group in range(handle.num_row_groups):
                keys = handle.read_row_group(group, columns=[key]).column(0)
                present = pc.unique(keys).to_pylist()
                ours = [k for k in present if k in wanted]
                if not ours:
                    continue
                rows = handle.read_row_group(group, columns=columns)
                if len(ours) < len(present):
                    mine = pc.is_in(keys, value_set=pa.array(ours, pa.string()))
                    keys, rows = keys.filter(mine), rows.filter(mine)
                if label is not None:
                    first = pc.equal(rows.column("step"), 0)
                    labels.update(zip(keys.filter(first).to_pylist(), rows.column(label).filter(first).to_pylist(), strict=True))
                broken = np.any([_non_finite_rows(rows.column(name).combine_chunks()) for name in values], axis=0)
                if broken.any():
                    bad.update(keys.filter(pa.array(broken)).to_pylist())
        except (pa.ArrowException, OSError) as exc:
            raise unreadable_part(path, exc) from None
    return bad, labels


@dataclass
class Work:
    """What this run computes, from `plan_work`; sets hold example ids or response hashes."""

    encoded: list[Encoded] = field(default_factory=list)  # examples to compute
    skipped: int = 0
    stale: set[str] = field(default_factory=set)  # stored with another token hash
    non_finite: set[str] = field(default_factory=set)  # stored with NaN/inf in their rows
    bad_responses: set[str] = field(default_factory=set)  # post-only rows with NaN/inf: dropped, recomputed
    stored_responses: set[str] = field(default_factory=set)  # finite post-only rows in the store
    # responses of skipped examples that lack (finite) post-only rows: computed first
    extra_responses: dict[str, np.ndarray] = field(default_factory=dict)
    repaired_responses: set[str] = field(default_factory=set)  # non-finite or missing: recomputed


def plan_work(store: Store, encoded: list[Encoded]) -> Work:
    """Which examples to compute, which stored rows to drop, which responses to (re)compute.

    Skipped: stored with the same token hash and finite `full_logprobs` and
    `token_logprob`. Stale (another token hash) and non-finite examples are recomputed.
    Post-only rows of this run's responses holding NaN/inf are dropped and recomputed;
    a skipped example whose response has no post-only rows has them computed."""
    if not store.read_manifest()["parts"]:
        return Work(list(encoded))
    reader = TargetReader(store, check_finite=False)  # the index: refuses an example stored twice
    present = {e.example_id for e in encoded if e.example_id in reader}
    bad_examples, token_hashes = _scan_parts(
        store, "targets", "example_id", present, ("full_logprobs", "token_logprob"), label="token_hash"
    )
    bad_responses, _ = _scan_parts(store, "post", "response_hash", {e.response_hash for e in encoded}, ("post_logprobs",))
    work = Work(bad_responses=bad_responses, stored_responses=reader.response_hashes() - bad_responses)
    for item in encoded:
        stored_hash = token_hashes.get(item.example_id)  # None: not stored (or no longer)
        if stored_hash is not None:
            if stored_hash != item.token_hash:
                work.stale.add(item.example_id)
            elif item.example_id in bad_examples:
                work.non_finite.add(item.example_id)
            else:
                work.skipped += 1
                if item.response_hash not in work.stored_responses:
                    work.extra_responses.setdefault(item.response_hash, item.response_ids)
                continue
        work.encoded.append(item)
    work.repaired_responses = bad_responses | work.extra_responses.keys()
    for item in work.encoded:  # computed with the example anyway
        work.extra_responses.pop(item.response_hash, None)
    return work


def missing_examples(store: Store, example_ids: list[str]) -> list[str]:
    """The ids among `example_ids` that have no targets in the store (in order); the
    reader's index also refuses an example stored twice."""
    reader = TargetReader(store, check_finite=False)
    return [example_id for example_id in example_ids if example_id not in reader]
