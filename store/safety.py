"""The safety-token set S: ids (ascending), weights w = max(v, 0), the full vector v.

Files: `safety_tokens.safetensors` (tensors `ids` int64 [S], `weights` float32 [S],
`vector` float32 [V]) and `tokens.parquet` (one row per token of S, for SQL).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pact.core.atomic import atomic_write_with
from pact.core.errors import PactError
from pact.store.manifest import Store

SAFETY_FILE = "safety_tokens.safetensors"
TOKENS_FILE = "tokens.parquet"

TOKENS_SCHEMA = pa.schema(
    [
        ("token_id", pa.int64()),
        ("idx", pa.int32()),
        ("token", pa.string()),
        ("aligned_prob", pa.float64()),
        ("base_prob", pa.float64()),
        ("score", pa.float64()),
        ("value", pa.float64()),
        ("weight", pa.float64()),
        ("rank", pa.int32()),
    ]
)


@dataclass(frozen=True)
class SafetySet:
    """token_ids: int64 [S] ascending; weights: float32 [S] (>= 0); vector: float32 [V]."""

    token_ids: np.ndarray
    weights: np.ndarray
    vector: np.ndarray

    @property
    def size(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.vector.shape[0])

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.token_ids, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(self.weights, dtype="<f4").tobytes())
        digest.update(str(self.vocab_size).encode())
        return digest.hexdigest()[:16]


def safety_set_from_vector(vector: np.ndarray) -> SafetySet:
    """S = every j with v_j != 0 (ascending), w_j = max(v_j, 0)."""
    vector = np.asarray(vector, dtype=np.float32)
    ids = np.flatnonzero(vector != 0).astype(np.int64)
    if ids.size == 0:
        raise PactError("the safety-token set is empty (v has no non-zero entry)")
    return SafetySet(ids, np.maximum(vector[ids], 0).astype(np.float32), vector)


def save_safety_set(
    store: Store, safety: SafetySet, table: pa.Table, meta: dict[str, Any]
) -> None:
    """Write both files atomically, then record `meta` + fingerprint in the manifest."""
    if table.num_rows != safety.size:
        raise PactError(f"tokens table has {table.num_rows} rows for {safety.size} safety tokens")
    store.root.mkdir(parents=True, exist_ok=True)
    tensors = {
        "ids": np.ascontiguousarray(safety.token_ids, dtype=np.int64),
        "weights": np.ascontiguousarray(safety.weights, dtype=np.float32),
        "vector": np.ascontiguousarray(safety.vector, dtype=np.float32),
    }
    # The manifest commits: until it is written, readers check both files against the
    # manifest's fingerprint and refuse a half-replaced set (`check_tokens_table`).
    atomic_write_with(
        store.root / TOKENS_FILE, lambda p: pq.write_table(table.cast(TOKENS_SCHEMA), p)
    )
    atomic_write_with(store.root / SAFETY_FILE, lambda p: save_file(tensors, str(p)))
    entry = dict(meta)
    entry.update(fingerprint=safety.fingerprint, count=safety.size, vocab_size=safety.vocab_size)

    def change(manifest: dict[str, Any]) -> None:
        manifest["safety_tokens"] = entry

    store.update_manifest(change)


class SafetyCountMismatch(PactError):
    """The manifest's safety_tokens.count disagrees with the safety set it records."""


def check_count(store: Store, entry: dict[str, Any], size: int, source: str) -> None:
    """SafetyCountMismatch when the manifest entry's count is not `size`, the number of
    tokens of the set `source` holds (a file whose fingerprint matches the entry: so the
    count, not the file, is wrong)."""
    if entry.get("count") != size:
        raise SafetyCountMismatch(
            f"{store.manifest_path}: safety_tokens.count {entry.get('count')!r} disagrees with {source} "
            f"({size} tokens, the set the manifest's fingerprint names): corrupted manifest; restore it "
            "from a backup, or delete the store and rerun `pact tokens` and `pact precompute`"
        )


def load_safety_set(store: Store) -> SafetySet:
    """The store's safety set; a clear error when it is missing or does not match the manifest."""
    manifest = store.require()
    entry = manifest.get("safety_tokens")
    path = store.root / SAFETY_FILE
    if entry is None or not path.is_file():
        raise PactError(f"store {store.root} has no safety-token set: run `pact tokens` first")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PactError(f"{path} is not a readable safetensors file ({exc})") from None
    missing = {"ids", "weights", "vector"} - set(tensors)
    if missing:
        raise PactError(f"{path} lacks tensors {sorted(missing)}")
    vector = tensors["vector"].astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise PactError(f"{path} holds non-finite values")
    safety = safety_set_from_vector(vector)
    if not np.array_equal(safety.token_ids, tensors["ids"]) or not np.allclose(
        safety.weights, tensors["weights"]
    ):
        raise PactError(f"{path}: ids/weights disagree with the stored vector (tampered file?)")
    if safety.fingerprint != entry.get("fingerprint"):
        raise PactError(
            f"{path} does not match the manifest's safety-token fingerprint (file replaced after `pact tokens`?)"
        )
    check_count(store, entry, safety.size, SAFETY_FILE)
    return safety


def table_fingerprint(table: pa.Table, vocab_size: int) -> str:
    """`SafetySet.fingerprint` of the set a tokens table lists (ids, float32 weights)."""
    ids = np.asarray(table.column("token_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    weights = np.asarray(table.column("weight").to_numpy(zero_copy_only=False), dtype=np.float32)
    return SafetySet(ids, weights, np.zeros(vocab_size, np.float32)).fingerprint


def check_tokens_table(store: Store, entry: dict[str, Any]) -> None:
    """PactError unless `tokens.parquet` lists the safety set the manifest entry records
    (a `pact tokens` killed after replacing the file, before the manifest, leaves them apart)."""
    path = store.root / TOKENS_FILE
    if not path.is_file():
        raise PactError(
            f"{path} is missing; rerun the `pact tokens` command that wrote the store (add --force when it "
            "holds targets: the same models, data and options give the same set, and the targets stay valid)"
        )
    try:
        table = pq.read_table(path, columns=["token_id", "weight"])
        matches = table_fingerprint(table, int(entry.get("vocab_size") or 0)) == entry.get("fingerprint")
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise PactError(f"{path} is unreadable ({reason}); rerun the `pact tokens` command that wrote the store") from None
    if not matches:
        raise PactError(
            f"{path} does not list the safety-token set the manifest records (a `pact tokens` run "
            "was interrupted?); rerun the `pact tokens` command that was interrupted"
        )
    check_count(store, entry, table.num_rows, TOKENS_FILE)
