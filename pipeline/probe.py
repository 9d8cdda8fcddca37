"""Drift probe: how far a model's safety-token distribution moved from the reference's.

Teacher-forced on the refusals of a safety set (encoded with the shared encoding),
at every response step t we take the model's full-vocabulary log-probs of the
safety tokens S and compare them with the reference's:

    drift_kl_t    = mean over examples of KL(ref_S,t || model_S,t), where *_S is the
                    softmax over S alone (the log-probs of S, renormalised over S)
    safety_mass_t = mean over examples of sum_{j in S} p_model,t,j (full-vocab probs)

`mean_kl` / `mean_mass` are token means over every (example, step) pair.

The reference side is cached in the store as `probe/<dataset-hash>.parquet`
(columns example_id, token_hash, step, full_logprobs float32[|S|]; schema metadata
`pact.probe` = JSON with the reference fingerprint, safety-set fingerprint, encoding
options and dataset hash), written when the reference itself is evaluated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pact.core.atomic import atomic_write_with
from pact.core.data import Example
from pact.core.encoding import Encoded, EncodingOptions, encode_example
from pact.core.errors import PactError
from pact.store.manifest import Store
from pact.store.safety import SafetySet, load_safety_set

PROBE_DIR = "probe"
PROBE_META_KEY = b"pact.probe"
PROBE_FORMAT_VERSION = 1
DEFAULT_PROBE_MAX_LENGTH = 512
DEFAULT_PROBE_BATCH_SIZE = 16
# Rows x width^2 of one probe forward: what the attention mask and scores grow with.
# 16 rows of 512 tokens; a batch of longer rows is cut to fewer rows.
DEFAULT_PROBE_ATTENTION_BUDGET = 16 * 512 * 512
MISSING_REFERENCE = "evaluate the reference model first or pass --reference"


@dataclass(frozen=True)
class ProbeResult:
    """Per-step drift (steps are 0-based response steps) and token means over all steps."""

    steps: list[int]
    kl: list[float]  # mean KL(ref_S || model_S) per step, nats
    mass: list[float]  # mean safety-token mass of the model per step, in (0, 1]
    mean_kl: float
    mean_mass: float
    n: int  # examples
    counts: tuple[int, ...] = ()  # examples that reach each step


@dataclass(frozen=True)
class ReferenceProbe:
    """Reference full-vocab log-probs of S per example: example_id -> float32 [T, S]."""

    logprobs: dict[str, np.ndarray]
    token_hashes: dict[str, str]
    meta: dict[str, Any]


def dataset_hash(examples: Sequence[Example]) -> str:
    """sha256 (first 16 hex) of the examples' ids and content hashes, in file order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(f"{example.example_id}\x00{example.content_hash}\n".encode())
    return digest.hexdigest()[:16]


def probe_path(store: Store, examples: Sequence[Example]) -> Path:
    """Where the reference probe of `examples` is cached."""
    return store.root / PROBE_DIR / f"{dataset_hash(examples)}.parquet"


def reference_fingerprint(manifest: dict[str, Any]) -> str | None:
    """`manifest["reference"]["model"]`, the fingerprint of the store's reference model."""
    reference = manifest.get("reference") or {}
    value = reference.get("model")
    return value if isinstance(value, str) else None


def probe_encoding_options(
    manifest: dict[str, Any],
    max_length: int = DEFAULT_PROBE_MAX_LENGTH,
    label_after_end_of_turn: bool = False,
) -> EncodingOptions:
    """The store's encoding options (`manifest["reference"]["encoding"]`), else
    `max_length` and `label_after_end_of_turn`."""
    recorded = (manifest.get("reference") or {}).get("encoding")
    if isinstance(recorded, dict) and isinstance(recorded.get("encoding"), dict):
        recorded = recorded["encoding"]
    if isinstance(recorded, dict) and "max_length" in recorded:
        keys = ("max_length", "truncation", "label_after_end_of_turn")
        try:
            return EncodingOptions.from_record({k: recorded[k] for k in keys if k in recorded})
        except TypeError as exc:
            raise PactError(f"the store's reference encoding options {recorded!r} are malformed ({exc})") from None
    return EncodingOptions(max_length=max_length, label_after_end_of_turn=label_after_end_of_turn)


def encode_probe(tokenizer: Any, examples: Sequence[Example], options: EncodingOptions) -> list[Encoded]:
    """Encode the safety examples (prompt + refusal) with the shared encoding."""
    return [encode_example(tokenizer, example, options) for example in examples]


def probe_batches(lengths: Sequence[int], batch_size: int, budget: int = DEFAULT_PROBE_ATTENTION_BUDGET) -> list[range]:
    """Consecutive batches of indices into `lengths` (token counts): at most `batch_size`
    rows each, and rows x (longest length)^2 <= `budget` (a row over it alone), so a
    forward's attention memory stays flat when the sequences grow."""
    batches: list[range] = []
    start = 0
    while start < len(lengths):
        stop, width = start + 1, lengths[start]
        while stop < len(lengths) and stop - start < batch_size:
            wider = max(width, lengths[stop])
            if (stop - start + 1) * wider * wider > budget:
                break
            stop, width = stop + 1, wider
        batches.append(range(start, stop))
        start = stop
    return batches


def safety_logprobs(
    model: Any,
    encoded: Sequence[Encoded],
    safety_ids: np.ndarray,
    *,
    batch_size: int = DEFAULT_PROBE_BATCH_SIZE,
) -> list[np.ndarray]:
    """Teacher-forced full-vocab log-probs of the safety ids: one float32 [T_i, S] per example.

    Step t is the distribution at input position response_start - 1 + t. Batches
    (`probe_batches`: up to `batch_size` rows, fewer for long rows) are right-padded; only the response steps' hidden states go through the LM head, at
    most `pact.core.lm_head.DEFAULT_HEAD_BUDGET` logits at a time. The model's train/eval
    mode is restored afterwards.
    """
    import torch

    from pact.core.lm_head import head_rows, root_unsharded, selected_rows, subset_logprobs

    if batch_size < 1:
        raise PactError(f"batch_size must be at least 1, got {batch_size}")
    results: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), root_unsharded(model) as inner:
            device = next(inner.parameters()).device
            vocab = head_rows(inner)
            if int(np.max(safety_ids)) >= vocab:
                raise PactError(
                    f"safety token id {int(np.max(safety_ids))} is outside the model's vocabulary "
                    f"({vocab} logits): the store belongs to another tokenizer"
                )
            ids = torch.as_tensor(np.asarray(safety_ids, dtype=np.int64), device=device)
            for indices in probe_batches([len(e.input_ids) for e in encoded], batch_size):
                batch = encoded[indices.start : indices.stop]
                width = max(len(e.input_ids) for e in batch)
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                positions = []
                for row, item in enumerate(batch):
                    input_ids[row, : len(item.input_ids)] = torch.from_numpy(item.input_ids)
                    attention[row, : len(item.input_ids)] = 1
                    first = item.response_start - 1
                    positions += [(row, first + t) for t in range(item.response_length)]
                rows = selected_rows(
                    inner, input_ids.to(device), attention.to(device), torch.tensor(positions, dtype=torch.long)
                )
                logprobs = subset_logprobs(rows, ids).cpu().numpy()
                offsets = np.cumsum([0] + [item.response_length for item in batch])
                results += [logprobs[offsets[i] : offsets[i + 1]] for i in range(len(batch))]
    finally:
        model.train(was_training)
    return results


def _log_softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def drift_statistics(reference: Sequence[np.ndarray], model: Sequence[np.ndarray]) -> ProbeResult:
    """Per-step mean KL(ref_S || model_S) and mean model safety mass (see module docstring).

    reference, model: per example, full-vocab log-probs of S, float [T_i, S] each.
    """
    if not reference or len(reference) != len(model):
        raise PactError("the drift probe needs the same, non-zero number of reference and model examples")
    longest = max(r.shape[0] for r in reference)
    kl_sum = np.zeros(longest)
    mass_sum = np.zeros(longest)
    counts = np.zeros(longest, dtype=np.int64)
    for ref, mod in zip(reference, model, strict=True):
        if ref.shape != mod.shape:
            raise PactError(f"reference probe of shape {ref.shape} does not match the model's {mod.shape}")
        ref_s = _log_softmax(ref.astype(np.float64))
        mod_s = _log_softmax(mod.astype(np.float64))
        kl = np.maximum((np.exp(ref_s) * (ref_s - mod_s)).sum(axis=-1), 0.0)
        mass = np.exp(mod.astype(np.float64)).sum(axis=-1)
        steps = ref.shape[0]
        kl_sum[:steps] += kl
        mass_sum[:steps] += mass
        counts[:steps] += 1
    valid = counts > 0
    total = int(counts.sum())
    return ProbeResult(
        steps=[int(t) for t in np.flatnonzero(valid)],
        kl=[float(v) for v in kl_sum[valid] / counts[valid]],
        mass=[float(v) for v in mass_sum[valid] / counts[valid]],
        mean_kl=float(kl_sum.sum() / total),
        mean_mass=float(mass_sum.sum() / total),
        n=len(reference),
        counts=tuple(int(c) for c in counts[valid]),
    )


def write_reference_probe(
    store: Store,
    examples: Sequence[Example],
    encoded: Sequence[Encoded],
    logprobs: Sequence[np.ndarray],
    *,
    reference_model: str,
    safety: SafetySet,
    options: EncodingOptions,
) -> Path:
    """Write the reference probe of `examples` atomically; return its path."""
    width = safety.size
    meta = {
        "format_version": PROBE_FORMAT_VERSION,
        "reference_model": reference_model,
        "safety_fingerprint": safety.fingerprint,
        "encoding": options.to_dict(),
        "dataset_hash": dataset_hash(examples),
        "examples": len(examples),
    }
    lengths = [lp.shape[0] for lp in logprobs]
    values = np.concatenate([np.asarray(lp, dtype=np.float32) for lp in logprobs]).reshape(-1)
    schema = pa.schema(
        [
            ("example_id", pa.string()),
            ("token_hash", pa.string()),
            ("step", pa.int32()),
            ("full_logprobs", pa.list_(pa.float32(), width)),
        ],
        metadata={PROBE_META_KEY: json.dumps(meta, sort_keys=True).encode()},
    )
    table = pa.Table.from_arrays(
        [
            pa.array(np.repeat([e.example_id for e in encoded], lengths).tolist(), pa.string()),
            pa.array(np.repeat([e.token_hash for e in encoded], lengths).tolist(), pa.string()),
            pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])),
            pa.FixedSizeListArray.from_arrays(pa.array(values), width),
        ],
        schema=schema,
    )
    path = probe_path(store, examples)
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))
    return path


def read_reference_probe(store: Store, examples: Sequence[Example]) -> ReferenceProbe | None:
    """The cached reference probe of `examples`, or None when there is none."""
    path = probe_path(store, examples)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[PROBE_META_KEY])
    except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
        raise PactError(f"reference probe {path} is unreadable ({str(exc)[:200]}); delete it and evaluate the reference again") from None
    ids = table.column("example_id").to_pylist()
    hashes = table.column("token_hash").to_pylist()
    column = table.column("full_logprobs").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), column.type.list_size)
    logprobs: dict[str, list[np.ndarray]] = {}
    token_hashes: dict[str, str] = {}
    for row, (example_id, token_hash) in enumerate(zip(ids, hashes, strict=True)):
        logprobs.setdefault(example_id, []).append(values[row])
        token_hashes[example_id] = token_hash
    return ReferenceProbe({k: np.stack(v) for k, v in logprobs.items()}, token_hashes, meta)


def check_reference_probe(
    cached: ReferenceProbe | None,
    encoded: Sequence[Encoded],
    *,
    safety: SafetySet,
    expected_reference: str | None,
    where: str,
) -> list[np.ndarray]:
    """The cached reference log-probs in `encoded` order; PactError when missing or stale."""
    if cached is None:
        raise PactError(f"no cached reference probe for {where}: {MISSING_REFERENCE}")
    meta = cached.meta
    if meta.get("safety_fingerprint") != safety.fingerprint:
        raise PactError(
            f"the cached reference probe for {where} was computed for another safety-token set: {MISSING_REFERENCE}"
        )
    if expected_reference is not None and meta.get("reference_model") != expected_reference:
        raise PactError(
            f"the cached reference probe for {where} comes from model {meta.get('reference_model')}, "
            f"not the store's reference {expected_reference}: {MISSING_REFERENCE}"
        )
    result = []
    for item in encoded:
        values = cached.logprobs.get(item.example_id)
        if values is None:
            raise PactError(f"the cached reference probe lacks example {item.example_id}: {MISSING_REFERENCE}")
        if cached.token_hashes[item.example_id] != item.token_hash or values.shape[0] != item.response_length:
            raise PactError(
                f"example {item.example_id}: its token ids differ from the cached reference probe's "
                f"(other tokenizer, chat template or max length {meta.get('encoding')}?)"
            )
        result.append(values)
    return result


def probe_drift(
    model: Any,
    tokenizer: Any,
    store: Store,
    examples: Sequence[Example],
    *,
    batch_size: int = DEFAULT_PROBE_BATCH_SIZE,
    max_length: int = DEFAULT_PROBE_MAX_LENGTH,
) -> ProbeResult:
    """Drift of an in-memory causal LM against the store's cached reference probe.

    examples: the safety set (prompt, refusal) the reference probe was computed on
    (`pact eval --probe` on the reference writes it). max_length applies only when
    the store records no encoding options. The model's train/eval mode is restored.
    """
    manifest = store.require()
    safety = load_safety_set(store)
    options = probe_encoding_options(manifest, max_length)
    encoded = encode_probe(tokenizer, examples, options)
    reference = check_reference_probe(
        read_reference_probe(store, examples),
        encoded,
        safety=safety,
        expected_reference=reference_fingerprint(manifest),
        where=f"these {len(examples)} examples",
    )
    model_logprobs = safety_logprobs(model, encoded, safety.token_ids, batch_size=batch_size)
    return drift_statistics(reference, model_logprobs)
