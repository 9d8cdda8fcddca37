"""One optimizer step: its micro-batches read, their losses backpropagated (in one
process, or each rank its share under torchrun), then clip, step and schedule.

A micro-batch's loss is a token mean over its response tokens; each is divided by the
number of micro-batches of the step (docs/training.md). A loss or a gradient norm
that is not finite raises `Diverged`, which the loop turns into the error that stops
the run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pact.core import distributed
from pact.core.distributed import Ranks
from pact.core.encoding import Encoded
from pact.store.targets import TargetReader
from pact.trainer.batches import Batch, cached_batch, collate, rank_share
from pact.trainer.checkpoint import TrainerState
from pact.trainer.config import TrainConfig
from pact.trainer.fused import StepLoss, batch_loss
from pact.trainer.reference import OnlineReference


class Diverged(Exception):
    """A loss or a gradient norm is not finite; the message says where."""


@dataclass
class StepTotals:
    """Sums over the micro-batches of one optimizer step, for the metrics row."""

    loss: float
    ce: float
    kl: float
    gate_mean: float
    tokens: int

    def add(self, terms: StepLoss, loss: float, tokens: int) -> None:
        self.loss += loss
        self.ce += terms.ce
        self.kl += terms.kl or 0.0
        self.gate_mean += terms.gate_mean or 0.0
        self.tokens += tokens

    def row(self, micro_batches: int, *, pact: bool) -> dict[str, float | None]:
        """Means over the micro-batches; kl and gate_mean only for PACT."""
        return {
            "loss": self.loss / micro_batches,
            "ce": self.ce / micro_batches,
            "kl": self.kl / micro_batches if pact else None,
            "gate_mean": self.gate_mean / micro_batches if pact else None,
        }


@dataclass
class MicroBatches:
    """How this run reads a micro-batch (cached targets joined, or online targets) and
    takes its loss through `model` (the DDP / FSDP wrapper under torchrun)."""

    config: TrainConfig
    encoded: list[Encoded]
    pad_id: int
    reader: TargetReader | None
    online: OnlineReference | None
    model: Any
    safety_ids: Tensor | None
    weights: Tensor | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: str

    def batch(self, indices: list[int]) -> Batch:
        """The examples `indices` as a Batch on the device, with their reference targets."""
        chosen = [self.encoded[i] for i in indices]
        if self.reader is not None:
            batch = cached_batch(chosen, self.pad_id, self.reader).to(self.device)
        else:
            batch = collate(chosen, self.pad_id).to(self.device)
        if self.online is not None:
            batch.reference = self.online.targets(batch)
        return batch

    def loss(self, batch: Batch) -> StepLoss:
        config = self.config
        return batch_loss(
            self.model, batch, method=config.method, kl_weight=config.kl_weight,
            pact=config.pact, safety_ids=self.safety_ids, weights=self.weights,
            autocast=self.autocast, head_chunk_logits=config.head_chunk_logits,
        )  # fmt: skip


def _where(state: TrainerState, micro: int, batch: Batch) -> str:
    examples = ", ".join(batch.example_ids[:3])
    return f"epoch {state.epoch}, batch {state.batch_index + micro}, examples {examples}"


def micro_steps(
    group: list[list[int]], micro: MicroBatches, state: TrainerState, ranks: Ranks
) -> StepTotals:
    """Forward and backward over the micro-batches `group` (example indices of each
    global micro-batch); gradients accumulate in the model."""
    if ranks.enabled:
        return _distributed_micro_steps(group, micro, state, ranks)
    return _local_micro_steps(group, micro, state)


def _local_micro_steps(
    group: list[list[int]], micro: MicroBatches, state: TrainerState
) -> StepTotals:
    """Single process: each micro-batch's loss (a token mean) / the number of micro-batches."""
    totals = StepTotals(0.0, 0.0, 0.0, 0.0, 0)
    for index, indices in enumerate(group):
        batch = micro.batch(indices)
        terms = micro.loss(batch)
        value = float(terms.loss.detach())
        if not math.isfinite(value):
            raise Diverged(f"the loss is {value} at step {state.step + 1} ({_where(state, index, batch)})")
        (terms.loss / len(group)).backward()
        totals.add(terms, value, batch.num_tokens)
    return totals


def _distributed_micro_steps(
    group: list[list[int]], micro: MicroBatches, state: TrainerState, ranks: Ranks
) -> StepTotals:
    """Every rank: its share of each global micro-batch, weighed so that DDP's gradient
    mean equals the single-process gradient of the whole micro-batch.

    Global micro-batch k has N_k response tokens (all-reduced first); this rank's share
    n_k. Its loss is a token mean over n_k (CE over the response labels, KL over the
    valid steps: the same tokens), so loss_k * n_k / N_k is its part of the token mean
    over N_k; times world_size because DDP averages gradients over the ranks; / the
    number of micro-batches as in a single process. A rank with an empty share runs the
    micro-batch's first example with weight 0 (DDP needs every rank in every backward).
    """
    shares = [rank_share(indices, ranks.rank, ranks.world_size) for indices in group]
    local = [sum(micro.encoded[i].response_length for i in share) for share in shares]
    global_tokens = distributed.all_reduce(local)
    sums = [0.0] * 5  # loss, ce, kl, gate_mean (token-weighted), input tokens
    failure = None
    for index, (indices, share) in enumerate(zip(group, shares, strict=True)):
        weight = local[index] / global_tokens[index] if share else 0.0
        batch = micro.batch(share or indices[:1])
        with distributed.gradient_sync(micro.model, index == len(group) - 1):
            terms = micro.loss(batch)
            (terms.loss * (weight * ranks.world_size / len(group))).backward()
        if not share:
            continue
        value = float(terms.loss.detach())
        if not math.isfinite(value) and failure is None:
            failure = (value, _where(state, index, batch))
        for i, part in enumerate((value, terms.ce, terms.kl or 0.0, terms.gate_mean or 0.0)):
            sums[i] += part * weight
        sums[4] += batch.num_tokens
    loss, ce, kl, gate_mean, tokens = distributed.all_reduce(sums)
    if not math.isfinite(loss):
        value, where = next(f for f in distributed.all_gather_objects(failure) if f is not None)
        raise Diverged(f"the loss is {value} at step {state.step + 1} ({where})")
    return StepTotals(loss, ce, kl, gate_mean, int(tokens))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `warmup_steps`, then cosine / linear decay to 0 at
    `total_steps`, or constant (the transformers schedules)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float | None,
    state: TrainerState,
) -> tuple[float, float]:
    """Clip the gradients (none: `max_grad_norm` 0 or None), step, schedule, zero the
    gradients; returns (gradient norm before clipping, the learning rate used)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
    if not math.isfinite(grad_norm):
        raise Diverged(f"the gradient norm is {grad_norm} at step {state.step + 1} (epoch {state.epoch})")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def advance(state: TrainerState, micro_batches: int, epoch_length: int) -> int:
    """Count one optimizer step of `micro_batches` global micro-batches (an epoch has
    `epoch_length`); returns the epoch the step belonged to."""
    epoch = state.epoch
    state.step += 1
    state.batch_index += micro_batches
    if state.batch_index >= epoch_length:
        state.epoch, state.batch_index = state.epoch + 1, 0
    return epoch
