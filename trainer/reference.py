"""`--reference online`: the reference targets of a batch computed on the fly.

The same numbers `pact precompute` caches: full-vocabulary log-probs of the safety
ids in the full context (f) and in the post-only context (o: assistant header +
response[:-1], step t at position len(header) - 1 + t), and the teacher-forced
log-prob of each response token. Computed under no_grad with the reference in
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
    safety_ids: int64 [S] on the model's device, or None when only the token
    log-probs are needed (constrained SFT). autocast: a context factory for the
    forward passes (bf16 autocast on CUDA, a no-op on CPU). head_chunk_logits: logits
    per chunk of the LM head, which runs on the response steps only.
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

    def _stats(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        first_step: Tensor,
        steps: int,
        target_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """`head_stats` at positions first_step + t: `safety_logprobs` [B, T, S] (with
        safety ids) and, with target_ids [B, T], `token_logprob` [B, T]; float32."""
        with self.autocast():
            hidden = decoder_hidden(self.model, input_ids, attention_mask)
            rows = gather_steps(hidden, first_step, steps, offset=0)  # [B, T, H]
            del hidden
            stats = head_stats(
                LMHead.of(self.model),
                rows.reshape(-1, rows.shape[-1]),
                budget=self.head_chunk_logits,
                safety_ids=self.safety_ids,
                target_ids=None if target_ids is None else target_ids.reshape(-1),
            )
        shape = rows.shape[:2]
        return {key: value.view(*shape, *value.shape[1:]) for key, value in stats.items()}

    @torch.no_grad()
    def targets(self, batch: Batch) -> ReferenceTargets:
        """Token log-probs [B, T] and, with safety ids, f and o [B, T, S] for `batch` (on the device)."""
        steps = batch.num_steps
        valid = batch.step_mask > 0
        with self._reference_mode():
            tokens = gather_steps(batch.input_ids[..., None], batch.response_start, steps, offset=0)[..., 0]
            full = self._stats(
                batch.input_ids, batch.attention_mask, batch.response_start - 1, steps, tokens
            )
            targets = ReferenceTargets(_masked(full["token_logprob"], valid))
            if self.safety_ids is not None:
                targets.full = _masked(full["safety_logprobs"], valid)
                targets.post = _masked(self._post_logprobs(batch), valid)
        return targets

    def _post_logprobs(self, batch: Batch) -> Tensor:
        """Safety-id log-probs [B, T, S] in the post-only context: header + response[:-1]."""
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
        return self._stats(post_ids, post_mask, first, batch.num_steps)["safety_logprobs"]


def _masked(values: Tensor, valid: Tensor) -> Tensor:
    """Zero on padded steps; valid is [B, T], values [B, T] or [B, T, S]."""
    if values.dim() == 3:
        valid = valid[..., None]
    return torch.where(valid, values, torch.zeros((), device=values.device))
