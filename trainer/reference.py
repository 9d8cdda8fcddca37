"""`--reference online`: the reference targets of a batch computed on the fly.

What `pact precompute` caches, as each method needs it. `--method pact`: the
scores of the safety ids in the full context (f) and in the post-only context (o:
assistant header + response[:-1], step t at position len(header) - 1 + t), as their
logits: the cache holds full-vocabulary log-probs, which differ from the logits by
one constant per step, and the loss takes softmaxes over the safety ids only
(DESIGN, "Softmax over S is invariant to a per-step shift"), so the reference's head
runs over those |S| rows of its weight instead of the whole vocabulary. `--method
constrained-sft`: the teacher-forced log-prob of each response token (the full
vocabulary's log-sum-exp, chunked). Computed under no_grad with the reference in
eval mode: a frozen second copy for full fine-tuning, or the model being trained
with its LoRA adapters disabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pact.core.encoding import post_only_ids
from pact.core.lm_head import DEFAULT_HEAD_CHUNK_LOGITS, LMHead, decoder_hidden, head_stats
from pact.trainer.batches import Batch, ReferenceTargets, gather_steps, pad_rows


class OnlineReference:
    """Computes ReferenceTargets for a Batch with a reference model.

    model: the frozen reference, or a peft model whose adapters are disabled for the
    pass (`adapters_disabled=True`). header_ids: the assistant header tokens.
    safety_ids: int64 [S] on the model's device (--method pact: f and o), or None
    (constrained SFT: the token log-probs). autocast: a context factory for the
    forward passes (bf16 autocast on CUDA, a no-op on CPU). head_chunk_logits: logits
    per chunk of the full-vocabulary head (token log-probs), which runs on the
    response steps only.
    """

    def __init__(
        self,
        model: Any,
        header_ids: list[int],
        safety_ids: Tensor | None,
        pad_id: int,
        *,
        adapters_disabled: bool,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        head_chunk_logits: int = DEFAULT_HEAD_CHUNK_LOGITS,
    ) -> None:
        self.model = model
        self.header_ids = list(header_ids)
        self.safety_ids = safety_ids
        self.pad_id = pad_id
        self.adapters_disabled = adapters_disabled
        self.autocast = autocast
        self.head_chunk_logits = head_chunk_logits

    @contextlib.contextmanager
    def _reference_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with (
                self.model.disable_adapter() if self.adapters_disabled else contextlib.nullcontext()
            ):
                yield
        finally:
            self.model.train(was_training)

    def _step_rows(self, input_ids: Tensor, attention_mask: Tensor, first_step: Tensor, steps: int) -> Tensor:
        """Final hidden states [B, T, H] at positions first_step + t."""
        hidden = decoder_hidden(self.model, input_ids, attention_mask)
        return gather_steps(hidden, first_step, steps, offset=0)

    @torch.no_grad()
    def targets(self, batch: Batch) -> ReferenceTargets:
        """For `batch` (on the device): with safety ids, f and o [B, T, S] (logits);
        without, the token log-probs [B, T]. Zero on padded steps."""
        steps = batch.num_steps
        valid = batch.step_mask > 0
        first_step = batch.response_start - 1
        with self._reference_mode(), self.autocast():
            rows = self._step_rows(batch.input_ids, batch.attention_mask, first_step, steps)
            head = LMHead.of(self.model)
            if self.safety_ids is not None:
                full = head.subset_logits(rows, self.safety_ids)
                post = head.subset_logits(self._post_rows(batch), self.safety_ids)
                return ReferenceTargets(full=_masked(full, valid), post=_masked(post, valid))
            tokens = gather_steps(batch.input_ids[..., None], batch.response_start, steps, offset=0)[..., 0]
            stats = head_stats(
                head, rows.reshape(-1, rows.shape[-1]), budget=self.head_chunk_logits, target_ids=tokens.reshape(-1)
            )
        return ReferenceTargets(_masked(stats["token_logprob"].view(rows.shape[:2]), valid))

    def _post_rows(self, batch: Batch) -> Tensor:
        """Final hidden states [B, T, H] of the post-only context (header + response[:-1])
        at its steps."""
        rows = [
            post_only_ids(self.header_ids, ids[start : start + length])[0]
            for ids, start, length in zip(
                batch.input_ids.cpu().numpy(),
                batch.response_start.tolist(),
                batch.response_length.tolist(),
                strict=True,
            )
        ]
        width = max(len(r) for r in rows)
        device = batch.input_ids.device
        post_ids = pad_rows(rows, width, self.pad_id, torch.int64).to(device)
        post_mask = pad_rows([np.ones(len(r)) for r in rows], width, 0, torch.int64).to(device)
        first = torch.full((len(rows),), len(self.header_ids) - 1, dtype=torch.int64, device=device)
        return self._step_rows(post_ids, post_mask, first, batch.num_steps)


def _masked(values: Tensor, valid: Tensor) -> Tensor:
    """Zero on padded steps; valid is [B, T], values [B, T] or [B, T, S]."""
    if values.dim() == 3:
        valid = valid[..., None]
    return torch.where(valid, values, torch.zeros((), device=values.device))
