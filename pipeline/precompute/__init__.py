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

The package, one job a module, in the order a run uses them:

    options.py      PrecomputeOptions, Shard (which examples a rank computes)
    inputs.py       the store, safety set and data read and checked; this shard encoded
    model.py        the reference loaded; its vocabulary and LM head checked
    store_state.py  the reference claimed in the manifest, the work planned against the
                    stored rows, outdated rows dropped, stored examples checked
    planning.py     length-bucketed batches, part boundaries, post-only groups
    compute.py      the reference passes and the loop feeding the writer
    summary.py      PrecomputeSummary
    run.py          run_precompute: the phases above in order
"""

from pact.pipeline.precompute.compute import POST_QUEUE_BATCHES, pad_batch, reference_targets
from pact.pipeline.precompute.options import PrecomputeOptions, Shard, shard_of, torchrun_defaults
from pact.pipeline.precompute.planning import part_starts, plan_batches, plan_post_only
from pact.pipeline.precompute.run import run_precompute
from pact.pipeline.precompute.store_state import GLOBAL_REFERENCE_KEYS, missing_examples
from pact.pipeline.precompute.summary import PrecomputeSummary

__all__ = [
    "GLOBAL_REFERENCE_KEYS",
    "POST_QUEUE_BATCHES",
    "PrecomputeOptions",
    "PrecomputeSummary",
    "Shard",
    "missing_examples",
    "pad_batch",
    "part_starts",
    "plan_batches",
    "plan_post_only",
    "reference_targets",
    "run_precompute",
    "shard_of",
    "torchrun_defaults",
]
