"""`run_precompute`: the stage's orchestration, phase by phase.

    lock the shard -> check the shard against the process group -> read the inputs ->
    load the reference -> notes -> claim the reference and plan against the store ->
    drop outdated rows -> compute into the store -> (torchrun) finish the ranks

Every check runs inside the first `distributed.agreeing()` block, before the first
write; the planning runs on every rank before any rank rewrites stored rows.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from pact.core import distributed
from pact.core.distributed import Ranks
from pact.core.encoding import Encoded
from pact.core.errors import PactError
from pact.core.models import past_context_warning
from pact.core.special_text import special_text_warning
from pact.pipeline.precompute.compute import compute_targets
from pact.pipeline.precompute.inputs import Inputs, read_inputs
from pact.pipeline.precompute.model import Reference, load_reference
from pact.pipeline.precompute.options import PrecomputeOptions, Shard
from pact.pipeline.precompute.store_state import (
    Work,
    claim_reference,
    drop_rows,
    missing_examples,
    plan_work,
    reference_entry,
)
from pact.pipeline.precompute.summary import PrecomputeSummary
from pact.store.lock import shard_writer
from pact.store.manifest import Store
from pact.store.targets import TargetWriter

Say = Callable[[str], None]


def run_precompute(
    model_dir: str | Path,
    data_path: str | Path,
    store_dir: str | Path,
    options: PrecomputeOptions | None = None,
    *,
    echo: Say | None = None,
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
    echo: Say | None,
) -> PrecomputeSummary:
    """The phases of `run_precompute`, in order, with the shard's writer lock held."""
    started = time.perf_counter()
    ranks = distributed.current_ranks()
    say = _notes(echo, ranks)
    summary = PrecomputeSummary()
    with distributed.agreeing():  # every check, on every rank, before the first write
        _check_shard(options.shard, ranks)
        inputs = read_inputs(Path(model_dir), data_path, store_dir, options, summary)
        reference = load_reference(inputs.model_dir, inputs.safety, inputs.encoded, options)
    _note_inputs(inputs, summary, say, ranks)
    with distributed.agreeing():  # every rank plans before any rank rewrites stored rows
        work = _plan_against_store(inputs, reference, options, summary, say)
    _drop_outdated_rows(inputs.store, work, options, summary, say)
    _compute_into_store(inputs, reference, work, options, summary)
    summary.seconds = time.perf_counter() - started
    if ranks.world_size > 1:
        return _finish_ranks(inputs.store, inputs.encoded, summary)
    return summary


def _notes(echo: Say | None, ranks: Ranks) -> Say:
    """Where one-line notes go (default: stderr), prefixed with the rank under torchrun."""
    note = echo or (lambda message: tqdm.write(message, file=sys.stderr))
    if ranks.world_size == 1:
        return note
    return lambda message: note(f"rank {ranks.rank}: {message}")


def _check_shard(shard: Shard, ranks: Ranks) -> None:
    """Under torchrun each rank computes shard RANK/WORLD_SIZE."""
    if ranks.world_size > 1 and shard != Shard(ranks.rank, ranks.world_size):
        raise PactError(
            f"shard {shard.index}/{shard.count} disagrees with the process group "
            f"(rank {ranks.rank} of {ranks.world_size}); under torchrun each rank computes shard RANK/WORLD_SIZE"
        )


def _note_inputs(inputs: Inputs, summary: PrecomputeSummary, say: Say, ranks: Ranks) -> None:
    """Dropped rows, examples past the model's context, special-token text (rank 0)."""
    for line in summary.dropped:
        say(f"skipped {line}")
    too_long = past_context_warning(inputs.model_dir, [len(e.input_ids) for e in inputs.encoded], "examples")
    if too_long:
        say(too_long)
    specials = special_text_warning(inputs.examples, inputs.tokenizer)
    if specials and ranks.rank == 0:
        say(specials)


def _plan_against_store(
    inputs: Inputs, reference: Reference, options: PrecomputeOptions, summary: PrecomputeSummary, say: Say
) -> Work:
    """Record the reference in the manifest (another one drops every part), then plan."""
    entry = reference_entry(
        inputs.model_dir, reference.fingerprint, reference.compute_dtype, options, inputs.safety, inputs.tokenizer
    )
    changed, dropped_parts = claim_reference(inputs.store, entry)
    if changed:
        summary.reference_reset = True
        say(
            f"the store was computed with another reference ({', '.join(changed)} changed): "
            f"dropped {len(dropped_parts)} parts, recomputing every example"
        )
    return plan_work(inputs.store, inputs.encoded)


def _drop_outdated_rows(
    store: Store, work: Work, options: PrecomputeOptions, summary: PrecomputeSummary, say: Say
) -> None:
    """Count the plan in `summary`, say what is recomputed, drop the stored rows it replaces."""
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
        summary.bytes_written += drop_rows(store, work.stale | work.non_finite, work.bad_responses, options.shard.tag)


def _compute_into_store(
    inputs: Inputs, reference: Reference, work: Work, options: PrecomputeOptions, summary: PrecomputeSummary
) -> None:
    """Run the reference passes into a writer of this shard; on Ctrl-C keep the finished parts."""
    writer = TargetWriter(
        inputs.store,
        inputs.safety.size,
        shard_tag=options.shard.tag,
        value_dtype=options.value_dtype,
        examples_per_part=None,  # parts end at batch ends: `compute_targets` flushes them
    )
    tokenizer = inputs.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        compute_targets(
            reference.model, work, inputs.header, reference.safety_ids, pad_id, reference.device,
            options, writer, summary,
        )  # fmt: skip
    except KeyboardInterrupt:
        writer.flush()  # keep the finished examples: a rerun resumes after them
        raise
    writer.close()
    summary.bytes_written += writer.bytes_written
    summary.parts_written = writer.parts_written


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
