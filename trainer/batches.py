"""Batches for the trainer: encoded examples, right-padded, joined with reference targets.

Shapes: B = examples in the batch, L = longest input, T = longest response,
S = |safety set|, V = vocabulary. Step t of a [B, T, ...] tensor belongs to response
token t and is predicted by the logits at input position `response_start - 1 + t`
(the store's position convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from pact.core.encoding import IGNORE_INDEX, Encoded
from pact.core.errors import PactError
from pact.store.targets import ExampleTargets, TargetReader


@dataclass
class ReferenceTargets:
    """The reference's statistics for one batch, cached or computed online.

    token_logprobs: float32 [B, T] log-prob of each teacher-forced response token (None
    where only the safety ids are needed: the online reference of --method pact);
    full, post: float32 [B, T, S] scores of the safety ids in the full and the
    post-only context (None where only token log-probs are needed): the cache holds
    their full-vocabulary log-probs, the online reference their logits, which differ
    from those by one constant per step, to which the PACT loss is invariant (it takes
    softmaxes over S only). Padded steps hold zeros.
    """

    token_logprobs: Tensor | None = None
    full: Tensor | None = None
    post: Tensor | None = None

    def to(self, device: torch.device | str) -> ReferenceTargets:
        return ReferenceTargets(*(None if t is None else t.to(device) for t in (self.token_logprobs, self.full, self.post)))


@dataclass
class Batch:
    """One right-padded batch of encoded examples."""

    example_ids: list[str]
    input_ids: Tensor  # int64 [B, L], pad id after each example
    attention_mask: Tensor  # int64 [B, L], 1 on real tokens
    labels: Tensor  # int64 [B, L], -100 on prompt and padding
    response_start: Tensor  # int64 [B], index of the first response token (>= 1)
    response_length: Tensor  # int64 [B]
    step_mask: Tensor  # float32 [B, T], 1 on real response steps
    reference: ReferenceTargets | None = None  # cached targets; None until joined

    @property
    def num_steps(self) -> int:
        """T, the longest response of the batch."""
        return int(self.step_mask.shape[1])

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) input tokens of the batch."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            response_start=self.response_start.to(device),
            response_length=self.response_length.to(device),
            step_mask=self.step_mask.to(device),
            reference=None if self.reference is None else self.reference.to(device),
        )


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every batch of one epoch: a permutation drawn from
    `torch.Generator(seed + epoch)`, cut into batches of `batch_size` (the last may be smaller)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def rank_share(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of one global micro-batch: the batch cut into
    `world_size` runs whose sizes differ by at most one (the first ranks get the extra
    examples; a rank may get none). Concatenated over the ranks, the shares are `indices`."""
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    return list(indices[start : start + base + (1 if rank < extra else 0)])


def pad_rows(rows: Sequence[np.ndarray], width: int, fill: float, dtype: torch.dtype) -> Tensor:
    """Rows of different lengths right-padded with `fill` -> [len(rows), width]."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(np.asarray(row))
    return out


def collate(
    encoded: Sequence[Encoded], pad_id: int, targets: Sequence[ExampleTargets] | None = None
) -> Batch:
    """Right-pad `encoded` into a Batch; with `targets` (same order) join the cached reference."""
    if not encoded:
        raise PactError("cannot build a batch from no examples")
    width = max(len(e.input_ids) for e in encoded)
    steps = max(e.response_length for e in encoded)
    lengths = torch.tensor([e.response_length for e in encoded], dtype=torch.int64)
    batch = Batch(
        example_ids=[e.example_id for e in encoded],
        input_ids=pad_rows([e.input_ids for e in encoded], width, pad_id, torch.int64),
        attention_mask=pad_rows(
            [np.ones(len(e.input_ids)) for e in encoded], width, 0, torch.int64
        ),
        labels=pad_rows([e.labels for e in encoded], width, IGNORE_INDEX, torch.int64),
        response_start=torch.tensor([e.response_start for e in encoded], dtype=torch.int64),
        response_length=lengths,
        step_mask=(torch.arange(steps)[None, :] < lengths[:, None]).float(),
    )
    if targets is not None:
        batch.reference = _join_targets(encoded, targets, steps)
    return batch


def _join_targets(
    encoded: Sequence[Encoded], targets: Sequence[ExampleTargets], steps: int
) -> ReferenceTargets:
    num_safety = targets[0].full_logprobs.shape[1]
    full = torch.zeros(len(encoded), steps, num_safety)
    post = torch.zeros(len(encoded), steps, num_safety)
    token_logprobs = torch.zeros(len(encoded), steps)
    for i, (example, target) in enumerate(zip(encoded, targets, strict=True)):
        if target.example_id != example.example_id:
            raise PactError(
                f"targets of {target.example_id} joined to example {example.example_id}"
            )
        n = example.response_length
        if target.full_logprobs.shape[0] != n or target.post_logprobs.shape[0] != n:
            raise PactError(
                f"example {example.example_id}: the store holds {target.full_logprobs.shape[0]} steps "
                f"for a response of {n} tokens (corrupted part?)"
            )
        full[i, :n] = torch.from_numpy(target.full_logprobs)
        post[i, :n] = torch.from_numpy(target.post_logprobs)
        token_logprobs[i, :n] = torch.from_numpy(target.token_logprobs)
    return ReferenceTargets(token_logprobs, full, post)


def cached_batch(encoded: Sequence[Encoded], pad_id: int, reader: TargetReader) -> Batch:
    """collate() joined with the store's targets, read by example_id."""
    return collate(encoded, pad_id, [reader.get(e.example_id) for e in encoded])


def gather_steps(values: Tensor, response_start: Tensor, steps: int, offset: int = -1) -> Tensor:
    """Rows of `values` [B, L, X] at positions response_start + offset + t -> [B, T, X].

    offset -1 picks the logits that predict response token t; offset 0 picks the
    response tokens themselves. Positions past the input (padded steps) are clamped:
    they are masked by the caller.
    """
    positions = step_positions(response_start.to(values.device), steps, values.shape[1], offset)
    rows = torch.arange(values.shape[0], device=values.device)[:, None]
    return values[rows, positions]


def step_positions(response_start: Tensor, steps: int, length: int, offset: int = -1) -> Tensor:
    """Input positions response_start + offset + t, clamped into [0, length) -> [B, T] (long).

    With offset -1, row t is the position whose logits predict response token t.
    """
    t = torch.arange(steps, device=response_start.device)
    return (response_start[:, None] + offset + t[None, :]).clamp(0, length - 1)


def response_token_logprobs(
    logits: Tensor, input_ids: Tensor, response_start: Tensor, step_mask: Tensor
) -> Tensor:
    """Log-prob (float32) of each response token under `logits` [B, L, V] -> [B, T]; 0 on padded steps."""
    steps = step_mask.shape[1]
    logprobs = torch.log_softmax(gather_steps(logits, response_start, steps).float(), dim=-1)
    tokens = gather_steps(input_ids[..., None], response_start, steps, offset=0)
    picked = logprobs.gather(-1, tokens).squeeze(-1)
    return torch.where(step_mask > 0, picked, torch.zeros_like(picked))
