"""No-grad LM-head operations on selected rows, chunk by chunk.

A stage that needs the next-token distribution at a few positions of a batch runs
the decoder body once, keeps the final hidden states of those positions only
(`selected_rows`) and turns them into float32 logits a chunk of rows at a time
(`logit_chunks`): no more than `budget` elements of `[rows, V]` logits exist at once,
so memory grows with neither batch x length nor the vocabulary. The head is the
model's output embedding followed by what its forward does to the logits
(`pact.pipeline.precompute.logit_transform`: logit scale, soft-capping), in the
head's dtype, then cast to float32, as the model's own forward computes them.

A model whose decoder body cannot be found (no `get_decoder()` nor `.model`) is run
whole, and its logits at the selected positions are gathered instead.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pact.core.errors import PactError
from pact.pipeline.precompute import decoder_body, logit_transform

# Elements of [rows, V] float32 logits one chunk may hold: 16 MiB, 27 rows at V = 151,936.
DEFAULT_HEAD_BUDGET = 1 << 22


def rows_per_chunk(vocab: int, budget: int = DEFAULT_HEAD_BUDGET) -> int:
    """How many rows of [*, vocab] logits fit in `budget` elements (at least one)."""
    if budget < 1:
        raise PactError(f"the LM-head budget must be at least 1 element, got {budget}")
    return max(1, budget // max(vocab, 1))


def unwrap(model: Any) -> Any:
    """The module under a DistributedDataParallel wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def root_unsharded(model: Any) -> Iterator[Any]:
    """The model (unwrapped from DDP), with an FSDP2 root's own parameters (embeddings,
    final norm, head) gathered while the body and the head are called separately; the
    root is initialised first, as its forward would, so its layers do not take the root's
    role. A collective under FSDP: every rank enters it."""
    model = unwrap(model)
    fsdp_state = getattr(model, "_get_fsdp_state", None)
    sharded = callable(fsdp_state) and callable(getattr(model, "reshard", None))
    if sharded:
        fsdp_state()._lazy_init()
        model.unshard()
    try:
        yield model
    finally:
        if sharded:
            model.reshard()


def head_rows(model: Any) -> int:
    """Rows of the model's output embedding (the size V of its logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers >= 4.50 causal LMs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def find_body(model: Any) -> Any | None:
    """The decoder body of `model`, or None for a model that has none pact can find."""
    try:
        return decoder_body(model)
    except PactError:
        return None


@dataclass
class HeadRows:
    """N selected rows on their way to logits.

    `values` is [N, H] final hidden states when `model` is set (the head still has to
    run), else [N, V] logits the model's forward already produced.
    """

    values: torch.Tensor
    model: Any | None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def vocab(self) -> int:
        return head_rows(self.model) if self.model is not None else int(self.values.shape[1])


def selected_rows(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> HeadRows:
    """The rows at `positions` (int64 [N, 2] of (batch row, input position)) of a
    right-padded batch ([B, L] ids and mask): final hidden states through the decoder
    body, or, for a model without a separable body, its logits there (with
    `logits_to_keep` over the positions' span when the model takes it)."""
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise PactError(f"positions must have shape [N, 2] (row, position), got {tuple(positions.shape)}")
    device = input_ids.device
    positions = positions.to(device)
    body = find_body(model)
    if body is not None:
        output = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return HeadRows(hidden[positions[:, 0], positions[:, 1]], model)
    first = int(positions[:, 1].min()) if accepts_logits_to_keep(model) else 0
    kwargs = {"logits_to_keep": torch.arange(first, input_ids.shape[1], device=device)} if first else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    if logits.shape[1] != input_ids.shape[1] - first:
        raise PactError(
            f"the model returned logits for {logits.shape[1]} positions, expected {input_ids.shape[1] - first}"
        )
    positions = positions.to(logits.device)
    return HeadRows(logits[positions[:, 0], positions[:, 1] - first], None)


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [N, V] of final hidden states [N, H], as the model's forward computes them."""
    logits = model.get_output_embeddings()(hidden)
    transform = logit_transform(model.config)
    if transform is not None:
        logits = transform(logits)
    return logits.float()


def logit_chunks(rows: HeadRows, budget: int = DEFAULT_HEAD_BUDGET) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, float32 logits [stop - start, V]) over `rows`, at most `budget`
    elements per chunk; drop each chunk before asking for the next."""
    step = rows_per_chunk(rows.vocab, budget)
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        part = rows.values[start:stop]
        yield start, stop, head_logits(rows.model, part) if rows.model is not None else part.float()


def subset_logprobs(rows: HeadRows, ids: torch.Tensor, budget: int = DEFAULT_HEAD_BUDGET) -> torch.Tensor:
    """Full-vocabulary log-softmax of each row at `ids` (int64 [S]): float32 [N, S]."""
    ids = ids.to(rows.values.device)
    out = torch.empty((len(rows), ids.numel()), dtype=torch.float32, device=rows.values.device)
    for start, stop, logits in logit_chunks(rows, budget):
        out[start:stop] = torch.log_softmax(logits, dim=-1).index_select(1, ids)
        del logits
    return out


def last_position_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """float32 next-token logits [B, V] at the last position of final hidden states [B, L, H]."""
    return head_logits(model, hidden[:, -1])
