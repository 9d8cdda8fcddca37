"""The reference passes: the decoder body once per batch, the LM head only at response
positions (`reference_targets`), and the loop that hands every example's targets and
every new response's post-only targets to the writer in planned order."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pact.core.encoding import Encoded, post_only_ids
from pact.core.errors import PactError
from pact.core.lm_head import decoder_body, logit_stats
from pact.pipeline.precompute.options import PrecomputeOptions
from pact.pipeline.precompute.planning import part_starts, plan_batches, plan_post_only
from pact.pipeline.precompute.store_state import Work
from pact.pipeline.precompute.summary import PrecomputeSummary
from pact.store.targets import TargetWriter

# Post-only work planned ahead is capped at this many batches of distinct responses.
POST_QUEUE_BATCHES = 32


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


def pad_batch(sequences: list[np.ndarray], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
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
    """`values` [sum(lengths), ...] cut into one block per item, in order."""
    return np.split(values, np.cumsum(lengths)[:-1])


def compute_targets(
    model: Any,
    work: Work,
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
            for response_hash, post in post_only_targets(model, responses, header, safety_ids, pad_id, device, options).items():
                writer.add_post(response_hash, post)
                summary.responses_computed += 1

    written = 0  # examples handed to the writer
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="ex", desc="precompute", disable=not options.progress, file=sys.stderr)
    with torch.inference_mode(), bar:
        for batch in batches:
            items = [todo[i] for i in batch]
            stats = full_context_targets(model, items, safety_ids, pad_id, device, options)
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


def full_context_targets(
    model: Any, items: list[Encoded], safety_ids: torch.Tensor, pad_id: int, device: str, options: PrecomputeOptions
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per item: safety log-probs [T, S], token log-probs [T], entropy [T]."""
    ids, mask = pad_batch([e.input_ids for e in items], pad_id, device)
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


def post_only_targets(
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
        ids, mask = pad_batch([contexts[i][0] for i in batch], pad_id, device)
        lengths = [len(responses[hashes[i]]) for i in batch]
        positions = _step_positions([contexts[i][1] for i in batch], lengths)
        out = reference_targets(model, ids, mask, torch.from_numpy(positions), safety_ids, options.chunk_positions)
        for i, values in zip(batch, _split(out["safety_logprobs"].cpu().numpy(), lengths), strict=True):
            result[hashes[i]] = values
    return result
