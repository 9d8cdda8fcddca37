"""The training losses through the chunked LM head (`pact.core.lm_head`).

The decoder body gives hidden states [B, L, H]; only the rows that carry a label or a
PACT step (input position `response_start - 1 + t`, `batches.step_positions`) are
gathered and go through the head, chunk by chunk, with `fused_head_loss`: neither the
forward nor the backward pass holds `[B, L, V]` or `[rows, V]` logits. The math stays
in `trainer/loss.py`: the KL is `pact_kl_terms` on the subset logits, constrained SFT
is `constrained_sft_loss` on the token log-probs, the cross-entropy is the token mean
over the label tokens of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pact.core.encoding import IGNORE_INDEX
from pact.core.errors import PactError
from pact.core.lm_head import (
    DEFAULT_HEAD_CHUNK_LOGITS,
    HeadLoss,
    LMHead,
    decoder_hidden,
    fused_head_loss,
)
from pact.trainer.batches import Batch, step_positions
from pact.trainer.loss import PactConfig, constrained_sft_betas, constrained_sft_loss, pact_kl_terms


@dataclass
class StepLoss:
    """One micro-batch: `loss` carries the gradient; ce, kl and gate_mean are floats for
    logging (kl and gate_mean None outside PACT)."""

    loss: Tensor
    ce: float
    kl: float | None
    gate_mean: float | None


def _step_loss(
    loss: Tensor, ce: Tensor, kl: Tensor | None = None, gate_mean: Tensor | None = None
) -> StepLoss:
    """The logged terms as floats (one device sync each)."""
    return StepLoss(
        loss,
        float(ce),
        None if kl is None else float(kl),
        None if gate_mean is None else float(gate_mean),
    )


def _flat_rows(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices b * L + i of the label rows [N_labels] and of the steps [B, T], and the
    valid-step mask [B, T] (bool)."""
    length = batch.input_ids.shape[1]
    valid_labels = batch.labels[:, 1:] != IGNORE_INDEX
    label_b, label_i = valid_labels.nonzero(as_tuple=True)
    positions = step_positions(batch.response_start, batch.num_steps, length)
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    return label_b * length + label_i, rows * length + positions, batch.step_mask > 0


def _next_tokens(batch: Batch, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The token each flat row predicts (the label where there is one, else the next
    input id) and whether that token is a label."""
    next_labels = batch.labels.reshape(-1)[rows + 1]
    labelled = next_labels != IGNORE_INDEX
    return torch.where(labelled, next_labels, batch.input_ids.reshape(-1)[rows + 1]), labelled


def batch_loss(
    model: Any,
    batch: Batch,
    *,
    method: str,
    kl_weight: float,
    pact: PactConfig,
    safety_ids: Tensor | None,
    weights: Tensor | None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    head_chunk_logits: int = DEFAULT_HEAD_CHUNK_LOGITS,
) -> StepLoss:
    """Forward `batch` through `model` and return its loss (token means over the batch).

    pact: CE + kl_weight · pact_kl; sft: CE; constrained-sft: the Qi et al. loss on the
    response token log-probs. `batch.reference` must hold the reference targets for
    pact and constrained-sft. The LM head runs only on the label and step rows, in
    chunks of `head_chunk_logits` logits. The decoder and the head's matmuls run under
    `autocast`; the losses are float32.
    """
    with autocast():
        label_rows, step_rows, valid = _flat_rows(batch)
        if method == "constrained-sft":
            wanted = step_rows[valid]
        else:
            if label_rows.numel() == 0:
                raise PactError("labels have no token to predict: the batch has no response tokens")
            wanted = torch.cat([label_rows, step_rows[valid]]) if method == "pact" else label_rows
        rows = torch.unique(wanted)
        hidden = decoder_hidden(model, batch.input_ids, batch.attention_mask)
        selected = hidden.reshape(-1, hidden.shape[-1])[rows]
        del hidden
        head = LMHead.of(model)  # after the forward: FSDP has gathered the head's weight for it
        targets, labelled = _next_tokens(batch, rows)
        steps = torch.searchsorted(rows, step_rows[valid])  # where each valid step's row sits

        if method == "constrained-sft":
            return _constrained_sft(head, selected, targets, steps, valid, batch, head_chunk_logits)
        ce_weights = labelled.float() / label_rows.numel()
        if method == "sft":
            result = fused_head_loss(head, selected, HeadLoss(targets, ce_weights), budget=head_chunk_logits)
            return _step_loss(result.loss, result.ce)

        if safety_ids is None or weights is None or batch.reference is None:
            raise PactError("--method pact needs the safety set and the batch's reference targets")
        logged: dict[str, Tensor] = {}

        def kl(subset: Tensor) -> Tensor:
            student = subset.new_zeros(*valid.shape, subset.shape[-1]).index_put(valid.nonzero(as_tuple=True), subset[steps])
            terms = pact_kl_terms(student, batch.reference.full, batch.reference.post, weights, batch.step_mask, pact)
            logged.update(kl=terms.kl.detach(), gate=terms.gate)
            return kl_weight * terms.kl

        spec = HeadLoss(targets, ce_weights, subset_ids=safety_ids, subset_loss=kl)
        result = fused_head_loss(head, selected, spec, budget=head_chunk_logits)
        gate_mean = logged["gate"].sum() / batch.step_mask.sum()
        return _step_loss(result.loss, result.ce, logged["kl"], gate_mean)


def _constrained_sft(
    head: LMHead,
    selected: Tensor,
    targets: Tensor,
    steps: Tensor,
    valid: Tensor,
    batch: Batch,
    budget: int,
) -> StepLoss:
    """Constrained SFT on the rows of the valid steps (there, `steps` is the identity)."""
    if batch.reference is None or batch.reference.token_logprobs is None:
        raise PactError("--method constrained-sft needs the batch's reference token log-probs")
    valid_count = int(valid.sum())
    if valid_count == 0:
        raise PactError("the batch has no response tokens")
    reference = batch.reference.token_logprobs[valid]
    step_index = valid.nonzero(as_tuple=True)[1]
    betas = constrained_sft_betas(batch.num_steps).to(selected.device)[step_index]

    def token_loss(logprob: Tensor, rows: Tensor) -> Tensor:
        # rows index the gathered rows; row r is the valid step steps.argsort()[r]
        ones = torch.ones(1, rows.numel(), device=logprob.device)
        mean = constrained_sft_loss(logprob[None], reference[order[rows]][None], ones, betas[order[rows]][None])
        return mean * (rows.numel() / valid_count)

    order = torch.empty_like(steps)
    order[steps] = torch.arange(steps.numel(), device=steps.device)
    result = fused_head_loss(head, selected, HeadLoss(targets, token_loss=token_loss), budget=budget)
    ce = -result.token_logprob.sum() / valid_count
    return _step_loss(result.loss, ce)
