"""Stage 1: run the reference (aligned) model once over the fine-tuning set, cache its targets.

For every example (encoded by `pact.core.encoding.encode_example`, the encoding the
trainer uses) and every response step t -- the logits at input position
`response_start - 1 + t`, which predict response token t -- the store receives the
full-vocabulary log-probs of the safety tokens, the teacher-forced token, its
log-prob and the entropy of the step's distribution. Post-only targets (assistant
header + response, the prompt removed) are computed once per distinct response.

Memory: the decoder body runs on the whole batch, but the LM head is applied only
to the hidden states at response positions, `chunk_positions` rows at a time, and
each [chunk, V] block is reduced (float32 log-softmax, gather of the safety ids,
token log-prob, entropy) before the next one: full-vocabulary logits for a whole
batch never exist.

Post-only passes are planned across example batches (`plan_post_only`): the new
responses of up to one part are gathered and run in full length-bucketed batches,
before the first example that uses them is handed to the writer. Parts end at batch
ends (`part_starts`), so a rerun after a kill forms the same batches.

Resume / staleness / repair: examples already stored with the same token hash and
finite values are skipped; a changed token hash, or NaN/inf in an example's stored
rows, drops the example's old rows (its parts are rewritten without them and swapped
in the manifest in one update) and recomputes it; NaN/inf in a response's post-only
rows drops those rows the same way and recomputes the response; a changed reference
(model, safety set, tokenizer, template, header, compute or value dtype) drops every
part of the store and recomputes everything.

Under torchrun (an initialised torch.distributed process group, see
docs/distributed.md) each rank computes shard RANK/WORLD_SIZE into the same store;
the ranks agree on every check before the first write and meet again before any
stored rows are rewritten; at the end every rank checks that its examples are
stored, and the summaries are merged on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pact.core import distributed
from pact.core.atomic import atomic_write_with
from pact.core.config import check_choice, check_int, setting
from pact.core.data import FORMATS, load_examples
from pact.core.encoding import (
    Encoded,
    EncodingOptions,
    assistant_header_ids,
    encode_example,
    encoding_fingerprints,
    post_only_ids,
)
from pact.core.errors import PactError
from pact.core.lm_head import check_head_matches_forward, decoder_body, logit_stats
from pact.core.models import (
    DTYPES,
    check_dir,
    load_model,
    load_tokenizer,
    model_fingerprint,
    past_context_warning,
    resolve_device,
    resolve_dtype,
)
from pact.core.special_text import special_text_warning
from pact.store.lock import shard_writer
from pact.store.manifest import Store
from pact.store.safety import SafetySet, load_safety_set
from pact.store.targets import (
    ROW_GROUP_ROWS,
    VALUE_DTYPES,
    TargetReader,
    TargetWriter,
    unreadable_part,
)

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
# Post-only work planned ahead is capped at this many batches of distinct responses.
POST_QUEUE_BATCHES = 32
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: examples with int(sha256(example_id), 16) % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/N' with 0 <= i < N."""
        match = _SHARD.match(text or "")
        if not match:
            raise PactError(f"--shard must look like i/N (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise PactError(f"--shard {text!r}: need N >= 1 and 0 <= i < N")
        return cls(index, count)

    @property
    def tag(self) -> str:
        """The writer's part-name tag, e.g. `s0of4`."""
        return f"s{self.index}of{self.count}"

    def owns(self, example_id: str) -> bool:
        return shard_of(example_id, self.count) == self.index


def torchrun_defaults(shard: str | None, device: str, environ: Mapping[str, str]) -> tuple[Shard, str]:
    """Shard and device for a run: an explicit --shard wins; under torchrun (RANK and
    WORLD_SIZE set) the shard is RANK/WORLD_SIZE and --device auto or cuda becomes
    cuda:LOCAL_RANK when CUDA is available; else shard 0/1."""
    if shard is not None:
        parsed = Shard.parse(shard)
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        parsed = Shard.parse(f"{environ['RANK']}/{environ['WORLD_SIZE']}")
    else:
        parsed = Shard()
    if device in ("auto", "cuda") and environ.get("LOCAL_RANK", "").isdigit() and torch.cuda.is_available():
        device = f"cuda:{int(environ['LOCAL_RANK'])}"
    return parsed, device


def shard_of(example_id: str, count: int) -> int:
    """int(sha256(example_id utf-8), 16) % count."""
    return int(hashlib.sha256(example_id.encode("utf-8")).hexdigest(), 16) % count


@dataclass(frozen=True)
class PrecomputeOptions:
    """Options of `run_precompute` (the CLI builds the flags of `pact precompute` from
    these fields); invalid values raise PactError when the options are built."""

    batch_size: int = setting(8, help="Examples per forward pass (batches are length-bucketed).")
    max_batch_tokens: int | None = setting(None, help="Cap on rows x padded length per batch.")
    max_length: int = setting(
        1024, help="Max prompt + response tokens (the response tail is cut); must match training."
    )
    label_after_end_of_turn: bool = setting(
        False,
        help="Label what the chat template writes after its end-of-turn token too (Qwen's, Gemma's, Phi-3's newline), as the paper's code does; recorded in the store. Default: labels and PACT steps stop at end-of-turn.",
    )
    dtype: str = setting(
        "auto", help="Compute dtype; auto = float32 on CPU, bfloat16 on CUDA.", choices=DTYPES
    )
    device: str = setting(
        "auto",
        help="auto, cpu, cuda or cuda:<index> (under torchrun auto or cuda: cuda:LOCAL_RANK; another index is refused).",
    )
    chunk_positions: int = setting(
        32, help="Response positions per LM-head chunk (bounds the [chunk, vocab] logits in memory)."
    )
    shard: Shard = setting(help="Shard of the examples this run computes.", factory=Shard, cli=False)
    value_dtype: str = setting(
        "float32", help="Stored dtype of the safety-token log-probs.", choices=tuple(VALUE_DTYPES)
    )
    examples_per_part: int = setting(
        256,
        help="Examples per Parquet part, rounded up to whole batches (a killed run loses at most one part of work).",
        flag="--part-size",
    )
    data_format: str | None = setting(
        None, help="Row shape of --data; detected when omitted.", flag="--format", choices=FORMATS
    )
    skip_invalid: bool = setting(
        False,
        help="Drop invalid rows and examples whose prompt does not fit --max-length (reported) instead of failing.",
    )
    trust_remote_code: bool = setting(False, help="Allow model code shipped with the reference directory.")
    progress: bool = setting(True, help="Show a progress bar.", cli=False)

    def __post_init__(self) -> None:
        check_int(self.batch_size, "--batch-size")
        if self.max_batch_tokens is not None:
            check_int(self.max_batch_tokens, "--max-batch-tokens")
        check_int(self.chunk_positions, "--chunk-positions")
        check_int(self.examples_per_part, "--part-size")
        check_choice(self.dtype, DTYPES, "--dtype")
        check_choice(self.value_dtype, tuple(VALUE_DTYPES), "--value-dtype")
        if not _DEVICE.match(str(self.device)):
            raise PactError(f"--device {self.device!r} must be auto, cpu, cuda or cuda:<index>")
        if self.data_format is not None:
            check_choice(self.data_format, FORMATS, "--format")
        if not isinstance(self.shard, Shard):
            raise PactError("PrecomputeOptions.shard must be a Shard (use Shard.parse('i/N'))")
        self.encoding()

    def encoding(self) -> EncodingOptions:
        """The shared encoding's options for this run."""
        return EncodingOptions(max_length=self.max_length, label_after_end_of_turn=self.label_after_end_of_turn)


@dataclass
class PrecomputeSummary:
    """What one run did. Counts are over this shard's examples."""

    examples: int = 0  # valid examples of this shard
    computed: int = 0  # examples computed by this run (stale ones included)
    skipped: int = 0  # already in the store with the same token hash
    stale: int = 0  # in the store with another token hash: rows dropped, recomputed
    non_finite: int = 0  # in the store with NaN/inf in their values: rows dropped, recomputed
    responses_repaired: int = 0  # responses of stored examples whose post-only rows were non-finite or missing
    reference_reset: bool = False  # the store held another reference: every part dropped
    response_tokens: int = 0  # response steps computed
    responses_computed: int = 0  # distinct responses whose post-only targets were computed
    bytes_written: int = 0
    parts_written: int = 0
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)  # invalid rows / unencodable examples skipped
    computed_per_rank: list[int] = field(default_factory=list)  # merged runs: `computed` of each rank

    @classmethod
    def merge(cls, summaries: list[PrecomputeSummary]) -> PrecomputeSummary:
        """The summary of a multi-rank run: counts summed, the slowest rank's time."""
        merged = cls(
            reference_reset=any(s.reference_reset for s in summaries),
            seconds=max(s.seconds for s in summaries),
            dropped=[line for s in summaries for line in s.dropped],
            computed_per_rank=[s.computed for s in summaries],
        )
        for name in ("examples", "computed", "skipped", "stale", "non_finite", "responses_repaired",
                     "response_tokens", "responses_computed", "bytes_written", "parts_written"):  # fmt: skip
            setattr(merged, name, sum(getattr(s, name) for s in summaries))
        return merged

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        rate = self.seconds if self.seconds > 0 else float("nan")
        stale = f", {self.stale} stale recomputed" if self.stale else ""
        if self.non_finite:
            stale += f", {self.non_finite} recomputed (non-finite)"
        if self.responses_repaired:
            plural = "s" if self.responses_repaired != 1 else ""
            stale += f", {self.responses_repaired} post-only response{plural} recomputed (non-finite or missing)"
        dropped = f", {len(self.dropped)} invalid dropped" if self.dropped else ""
        ranks = (
            f" ({len(self.computed_per_rank)} ranks, computed per rank: {' + '.join(map(str, self.computed_per_rank))})"
            if len(self.computed_per_rank) > 1
            else ""
        )
        return (
            f"precompute{ranks}: {self.computed} examples computed, {self.skipped} skipped (up to date){stale}{dropped}; "
            f"{self.response_tokens} response tokens, {self.responses_computed} distinct responses; "
            f"{_human_bytes(self.bytes_written)} written in {self.parts_written} part{'s' if self.parts_written != 1 else ''}; "
            f"{self.seconds:.1f} s ({self.computed / rate:.1f} examples/s, {self.response_tokens / rate:.0f} tokens/s)"
        )


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# ----------------------------------------------------------------------------- the core


def reference_targets(
    model: Any,
    batch_input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    safety_ids: torch.Tensor,
    chunk: int = 256,
    *,
    target_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reference statistics at selected positions of a right-padded batch.

    batch_input_ids, attention_mask: [B, L]; positions: int64 [N, 2] of (row, input
    position) -- e.g. `mask.nonzero()`; the logits there predict the next token.
    safety_ids: int64 [S]; target_ids: int64 [N] (the token each position predicts) or
    None. Runs the decoder body once, then `logit_stats` on the N gathered hidden states:
    returns float32 `safety_logprobs` [N, S], `entropy` [N], and `token_logprob` [N]
    when target_ids is given, in the order of `positions`. Call under torch.inference_mode().
    """
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise PactError(f"positions must have shape [N, 2] (row, position), got {tuple(positions.shape)}")
    body = decoder_body(model)
    output = body(input_ids=batch_input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    positions = positions.to(hidden.device)
    selected = hidden[positions[:, 0], positions[:, 1]]
    del hidden, output
    return logit_stats(model, selected, safety_ids, chunk, target_ids)


# ----------------------------------------------------------------------------- batching


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Length-bucketed batches of indices into `lengths`, longest first.

    Each batch has at most `batch_size` items and rows x longest length <=
    `max_batch_tokens` (a single item longer than the cap forms its own batch).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current:
            longest = lengths[current[0]]
            full = len(current) >= batch_size
            too_many_tokens = max_batch_tokens is not None and (len(current) + 1) * longest > max_batch_tokens
            if full or too_many_tokens:
                batches.append(current)
                current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _pad(sequences: list[np.ndarray], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both int64 [B, L]."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def _step_positions(starts: list[int], lengths: list[int]) -> np.ndarray:
    """int64 [sum(lengths), 2]: (row, start + t) for t < length, row by row."""
    rows = np.repeat(np.arange(len(starts)), lengths)
    offsets = np.concatenate([np.arange(n) for n in lengths])
    return np.stack([rows, np.repeat(starts, lengths) + offsets], axis=1).astype(np.int64)


def _split(values: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1])


# ----------------------------------------------------------------------------- store state


def _reference_entry(
    model_dir: Path, fingerprint: str, compute_dtype: torch.dtype, options: PrecomputeOptions,
    safety: SafetySet, tokenizer: Any,
) -> dict[str, Any]:
    return {
        "model": fingerprint,
        "model_path": str(model_dir.resolve()),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "value_dtype": options.value_dtype,
        "safety_tokens": safety.fingerprint,
        **encoding_fingerprints(tokenizer, options.encoding()),
    }


def _claim_reference(store: Store, reference: dict[str, Any]) -> tuple[list[str], list[str]]:
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


def _drop_rows(store: Store, example_ids: set[str], response_hashes: set[str], shard_tag: str) -> int:
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
class _Work:
    encoded: list[Encoded] = field(default_factory=list)  # examples to compute
    skipped: int = 0
    stale: set[str] = field(default_factory=set)  # stored with another token hash
    non_finite: set[str] = field(default_factory=set)  # stored with NaN/inf in their rows
    bad_responses: set[str] = field(default_factory=set)  # post-only rows with NaN/inf: dropped, recomputed
    stored_responses: set[str] = field(default_factory=set)  # finite post-only rows in the store
    # responses of skipped examples that lack (finite) post-only rows: computed first
    extra_responses: dict[str, np.ndarray] = field(default_factory=dict)
    repaired_responses: set[str] = field(default_factory=set)  # non-finite or missing: recomputed


def _encode_shard(
    tokenizer: Any, examples: list[Any], options: PrecomputeOptions, summary: PrecomputeSummary
) -> list[Encoded]:
    encoding = options.encoding()
    encoded = []
    for example in examples:
        if not options.shard.owns(example.example_id):
            continue
        try:
            encoded.append(encode_example(tokenizer, example, encoding))
        except PactError as exc:
            if not options.skip_invalid:
                raise PactError(f"{exc} (row {example.row}; pass --skip-invalid to skip it)") from None
            summary.dropped.append(f"row {example.row}: {exc}")
    return encoded


def _plan_work(store: Store, encoded: list[Encoded]) -> _Work:
    """Which examples to compute, which stored rows to drop, which responses to (re)compute.

    Skipped: stored with the same token hash and finite `full_logprobs` and
    `token_logprob`. Stale (another token hash) and non-finite examples are recomputed.
    Post-only rows of this run's responses holding NaN/inf are dropped and recomputed;
    a skipped example whose response has no post-only rows has them computed."""
    if not store.read_manifest()["parts"]:
        return _Work(list(encoded))
    reader = TargetReader(store, check_finite=False)  # the index: refuses an example stored twice
    present = {e.example_id for e in encoded if e.example_id in reader}
    bad_examples, token_hashes = _scan_parts(
        store, "targets", "example_id", present, ("full_logprobs", "token_logprob"), label="token_hash"
    )
    bad_responses, _ = _scan_parts(store, "post", "response_hash", {e.response_hash for e in encoded}, ("post_logprobs",))
    work = _Work(bad_responses=bad_responses, stored_responses=reader.response_hashes() - bad_responses)
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


def _check_vocabulary(model_dir: Path, vocab_rows: int | None, safety: SafetySet, what: str) -> None:
    """The reference must have the vocabulary the safety set was built on."""
    if vocab_rows is None:
        return
    largest = int(safety.token_ids.max())
    if vocab_rows <= largest or vocab_rows != safety.vocab_size:
        raise PactError(
            f"reference {model_dir} has {vocab_rows} {what} but the safety set was built on a "
            f"{safety.vocab_size}-token vocabulary (largest safety id {largest}); "
            "use the aligned model `pact tokens` ran with"
        )


def _config_vocab_size(model_dir: Path, trust_remote_code: bool) -> int | None:
    """config vocab_size of a local model directory (checked to exist), or None."""
    from transformers import AutoConfig

    check_dir(model_dir, "model")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise PactError(f"cannot read the model config in {model_dir}: {str(exc).splitlines()[0]}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def run_precompute(
    model_dir: str | Path,
    data_path: str | Path,
    store_dir: str | Path,
    options: PrecomputeOptions | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> PrecomputeSummary:
    """Compute the reference targets of every example of `data_path` (this shard) into the store.

    Every check (options, safety set, model path and vocabulary, data, encoding, the
    LM-head probe) runs before the first write. `echo` receives one-line notes (reference
    reset, stale examples, dropped rows); default: stderr.

    In an initialised torch.distributed process group of more than one process,
    `options.shard` must be RANK/WORLD_SIZE; a failed check on any rank stops every
    rank; the returned summary is the merge of every rank's (`PrecomputeSummary.merge`)
    after each rank found its examples in the store.
    """
    options = options or PrecomputeOptions()
    with contextlib.ExitStack() as held:
        with distributed.agreeing():  # one writer per shard (store/lock.py)
            held.enter_context(shard_writer(store_dir, options.shard.tag))
        return _precompute(model_dir, data_path, store_dir, options, echo)


def _precompute(
    model_dir: str | Path,
    data_path: str | Path,
    store_dir: str | Path,
    options: PrecomputeOptions,
    echo: Callable[[str], None] | None,
) -> PrecomputeSummary:
    note = echo or (lambda message: tqdm.write(message, file=sys.stderr))
    ranks = distributed.current_ranks()
    rank, world = ranks.rank, ranks.world_size
    say = note if world == 1 else (lambda message: note(f"rank {rank}: {message}"))
    started = time.perf_counter()
    with distributed.agreeing():
        if world > 1 and options.shard != Shard(rank, world):
            raise PactError(
                f"shard {options.shard.index}/{options.shard.count} disagrees with the process group "
                f"(rank {rank} of {world}); under torchrun each rank computes shard RANK/WORLD_SIZE"
            )
        summary = PrecomputeSummary()
        model_dir = Path(model_dir)
        store = Store(store_dir)
        safety = load_safety_set(store)
        if store.read_manifest()["parts"]:
            TargetReader(store, check_finite=False)  # a damaged store fails before the model loads
        _check_vocabulary(model_dir, _config_vocab_size(model_dir, options.trust_remote_code), safety, "vocabulary entries (config.vocab_size)")
        loaded = load_examples(data_path, options.data_format, skip_invalid=options.skip_invalid)
        summary.dropped += [f"row {bad.row}: {bad.reason}" for bad in loaded.invalid]
        tokenizer = load_tokenizer(model_dir, trust_remote_code=options.trust_remote_code)
        encoded = _encode_shard(tokenizer, loaded.examples, options, summary)
        header = assistant_header_ids(tokenizer)
        summary.examples = len(encoded)
        fingerprint = model_fingerprint(model_dir)

        device = resolve_device(options.device)
        compute_dtype = resolve_dtype(options.dtype, device)
        model = load_model(
            model_dir, dtype=options.dtype, device=device, trust_remote_code=options.trust_remote_code
        )
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise PactError(f"reference {model_dir} has no output embedding (LM head)")
        _check_vocabulary(model_dir, int(head.weight.shape[0]), safety, "output-embedding rows")
        safety_ids = torch.from_numpy(safety.token_ids.astype(np.int64)).to(device)
        if encoded:
            with torch.inference_mode():
                probe = torch.from_numpy(encoded[0].input_ids[None, :]).to(device)
                check_head_matches_forward(model, probe)

    for line in summary.dropped:
        say(f"skipped {line}")
    too_long = past_context_warning(model_dir, [len(e.input_ids) for e in encoded], "examples")
    if too_long:
        say(too_long)
    specials = special_text_warning(loaded.examples, tokenizer)
    if specials and rank == 0:
        say(specials)
    # Every rank plans against the store before any rank rewrites stored rows.
    with distributed.agreeing():
        reference = _reference_entry(model_dir, fingerprint, compute_dtype, options, safety, tokenizer)
        changed, dropped_parts = _claim_reference(store, reference)
        if changed:
            summary.reference_reset = True
            say(
                f"the store was computed with another reference ({', '.join(changed)} changed): "
                f"dropped {len(dropped_parts)} parts, recomputing every example"
            )
        work = _plan_work(store, encoded)
    summary.skipped, summary.stale, summary.non_finite = work.skipped, len(work.stale), len(work.non_finite)
    summary.responses_repaired = len(work.repaired_responses)
    if work.stale:
        say(f"{len(work.stale)} examples have a new token hash (tokenizer, template or max length changed): recomputing them")
    if work.non_finite:
        say(f"{len(work.non_finite)} examples hold NaN or inf in their stored targets: recomputing them")
    if work.repaired_responses:
        say(
            f"{len(work.repaired_responses)} responses have non-finite or missing post-only targets "
            "in the store: recomputing them"
        )
    if work.stale or work.non_finite or work.bad_responses:
        summary.bytes_written += _drop_rows(
            store, work.stale | work.non_finite, work.bad_responses, options.shard.tag
        )

    writer = TargetWriter(
        store,
        safety.size,
        shard_tag=options.shard.tag,
        value_dtype=options.value_dtype,
        examples_per_part=None,  # parts end at batch ends: `_compute` flushes them
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        _compute(model, work, header, safety_ids, pad_id, device, options, writer, summary)
    except KeyboardInterrupt:
        writer.flush()  # keep the finished examples: a rerun resumes after them
        raise
    writer.close()
    summary.bytes_written += writer.bytes_written
    summary.parts_written = writer.parts_written
    summary.seconds = time.perf_counter() - started
    if world > 1:
        return _finish_ranks(store, encoded, summary)
    return summary


# ----------------------------------------------------------------------------- torchrun


def missing_examples(store: Store, example_ids: list[str]) -> list[str]:
    """The ids among `example_ids` that have no targets in the store (in order); the
    reader's index also refuses an example stored twice."""
    reader = TargetReader(store, check_finite=False)
    return [example_id for example_id in example_ids if example_id not in reader]


def _finish_ranks(store: Store, encoded: list[Encoded], summary: PrecomputeSummary) -> PrecomputeSummary:
    """After every rank registered its parts: each checks that its examples are stored
    (once), then the summaries are merged on every rank; PactError naming the ranks
    whose examples are missing."""
    distributed.barrier()
    try:
        missing = missing_examples(store, [e.example_id for e in encoded])
        problem = f"{len(missing)} examples missing, first: {', '.join(missing[:3])}" if missing else None
    except PactError as exc:
        problem = str(exc)
    gathered = distributed.all_gather_objects((summary, problem))
    problems = [f"rank {rank}: {problem}" for rank, (_, problem) in enumerate(gathered) if problem]
    if problems:
        raise PactError(
            f"every rank finished but the store is incomplete ({'; '.join(problems)}); rerun pact precompute"
        )
    return PrecomputeSummary.merge([part for part, _ in gathered])


def part_starts(batches: list[list[int]], examples_per_part: int) -> list[int]:
    """Where each part begins in the writer's order (the batches one after the other).

    A part is closed at the first batch end where it holds at least `examples_per_part`
    examples: parts hold whole batches, so a rerun after a kill (which resumes at a part
    boundary) forms the same batches and its values equal an uninterrupted run's bit for bit.
    """
    if examples_per_part < 1:
        raise PactError(f"examples_per_part must be at least 1, got {examples_per_part}")
    starts, position, filled = [0], 0, 0
    for batch in batches:
        position += len(batch)
        filled += len(batch)
        if filled >= examples_per_part:
            starts.append(position)
            filled = 0
    return starts


def plan_post_only(
    todo: list[Encoded],
    stored: set[str],
    starts: Collection[int],
    limit: int,
    first: Mapping[str, np.ndarray] | None = None,
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """When to run which post-only passes: `[(i, {response_hash: response_ids}), ...]`,
    ascending in i; each group is computed right before the i-th example of `todo` (in
    the order the examples reach the writer) is written, and `i == len(todo)` at the end.

    Every distinct response not in `stored` is planned once, in the group of the first
    example that uses it. A group gathers the new responses of at most one part (parts
    begin at the indices `starts`, see `part_starts`) and at most `limit` of them:
    its passes run in full length-bucketed batches across example batches, a part holds
    the post-only rows of its examples (a killed run leaves whole parts behind, and the
    rerun plans the same groups), and the work held at once stays bounded. `first`
    (responses to compute whatever the examples) open the first group.
    """
    if limit < 1:
        raise PactError(f"limit must be at least 1, got {limit}")
    starts = set(starts)
    groups: list[tuple[int, dict[str, np.ndarray]]] = []
    done = set(stored)
    current: dict[str, np.ndarray] | None = None

    def add(index: int, response_hash: str, response_ids: np.ndarray) -> None:
        nonlocal current
        if response_hash in done:
            return
        if current is None or len(current) >= limit:
            current = {}
            groups.append((index, current))
        current[response_hash] = response_ids
        done.add(response_hash)

    for response_hash, response_ids in (first or {}).items():
        add(0, response_hash, response_ids)
    for index, item in enumerate(todo):
        if index and index in starts:
            current = None  # a new part: its responses form new groups
        add(index, item.response_hash, item.response_ids)
    return groups


def _compute(
    model: Any,
    work: _Work,
    header: list[int],
    safety_ids: torch.Tensor,
    pad_id: int,
    device: str,
    options: PrecomputeOptions,
    writer: TargetWriter,
    summary: PrecomputeSummary,
) -> None:
    """Batched reference passes over `work.encoded`. The post-only passes follow
    `plan_post_only`: their rows go to the writer before the first example that uses
    them (so a registered example always has them), the passes of a part's new responses
    run together in full batches."""
    todo = work.encoded
    batches = plan_batches([len(e.input_ids) for e in todo], options.batch_size, options.max_batch_tokens)
    order = [todo[i] for batch in batches for i in batch]  # the order examples reach the writer
    starts = part_starts(batches, options.examples_per_part)
    limit = POST_QUEUE_BATCHES * options.batch_size
    queue = deque(plan_post_only(order, work.stored_responses, starts, limit, work.extra_responses))
    part_ends = set(starts[1:])

    def post_only_until(index: int) -> None:
        while queue and queue[0][0] <= index:
            _, responses = queue.popleft()
            for response_hash, post in _post_only(model, responses, header, safety_ids, pad_id, device, options).items():
                writer.add_post(response_hash, post)
                summary.responses_computed += 1

    written = 0  # examples handed to the writer
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="ex", desc="precompute", disable=not options.progress, file=sys.stderr)
    with torch.inference_mode(), bar:
        for batch in batches:
            items = [todo[i] for i in batch]
            stats = _full_context(model, items, safety_ids, pad_id, device, options)
            for item, (logprobs, token_logprob, entropy) in zip(items, stats, strict=True):
                post_only_until(written)
                writer.add_example(
                    item.example_id,
                    item.token_hash,
                    item.response_hash,
                    item.response_ids,
                    token_logprob,
                    entropy,
                    logprobs,
                )
                written += 1
                summary.computed += 1
                summary.response_tokens += item.response_length
            if written in part_ends:
                writer.flush()
            bar.update(len(items))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{summary.response_tokens / elapsed:.0f} tokens/s", refresh=False)
        post_only_until(len(todo))


def _full_context(
    model: Any, items: list[Encoded], safety_ids: torch.Tensor, pad_id: int, device: str, options: PrecomputeOptions
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per item: safety log-probs [T, S], token log-probs [T], entropy [T]."""
    ids, mask = _pad([e.input_ids for e in items], pad_id, device)
    lengths = [e.response_length for e in items]
    positions = _step_positions([e.response_start - 1 for e in items], lengths)
    targets = np.concatenate([e.response_ids for e in items])
    out = reference_targets(
        model, ids, mask, torch.from_numpy(positions), safety_ids, options.chunk_positions,
        target_ids=torch.from_numpy(targets),
    )
    safety = _split(out["safety_logprobs"].cpu().numpy(), lengths)
    token = _split(out["token_logprob"].cpu().numpy(), lengths)
    entropy = _split(out["entropy"].cpu().numpy(), lengths)
    return list(zip(safety, token, entropy, strict=True))


def _post_only(
    model: Any,
    responses: dict[str, np.ndarray],
    header: list[int],
    safety_ids: torch.Tensor,
    pad_id: int,
    device: str,
    options: PrecomputeOptions,
) -> dict[str, np.ndarray]:
    """Post-only safety log-probs [T, S] per response hash (header + response[:-1])."""
    if not responses:
        return {}
    hashes = list(responses)
    contexts = [post_only_ids(header, responses[h]) for h in hashes]
    result: dict[str, np.ndarray] = {}
    batches = plan_batches([len(ids) for ids, _ in contexts], options.batch_size, options.max_batch_tokens)
    for batch in batches:
        ids, mask = _pad([contexts[i][0] for i in batch], pad_id, device)
        lengths = [len(responses[hashes[i]]) for i in batch]
        positions = _step_positions([contexts[i][1] for i in batch], lengths)
        out = reference_targets(model, ids, mask, torch.from_numpy(positions), safety_ids, options.chunk_positions)
        for i, values in zip(batch, _split(out["safety_logprobs"].cpu().numpy(), lengths), strict=True):
            result[hashes[i]] = values
    return result
