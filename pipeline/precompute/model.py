"""The reference model: its vocabulary checked against the safety set, loaded, and its
chunked LM head checked against its own forward pass before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pact.core.encoding import Encoded
from pact.core.errors import PactError
from pact.core.lm_head import check_head_matches_forward
from pact.core.models import check_dir, load_model, model_fingerprint, resolve_device, resolve_dtype
from pact.pipeline.precompute.options import PrecomputeOptions
from pact.store.safety import SafetySet


@dataclass
class Reference:
    """The loaded reference model and what its passes run with."""

    model: Any
    fingerprint: str  # `model_fingerprint` of its directory
    device: str
    compute_dtype: torch.dtype
    safety_ids: torch.Tensor  # int64 [S] on `device`


def load_reference(
    model_dir: Path, safety: SafetySet, encoded: list[Encoded], options: PrecomputeOptions
) -> Reference:
    """Load the reference at `model_dir`, check its LM head has the safety set's
    vocabulary and matches its forward pass (on the first of `encoded`)."""
    fingerprint = model_fingerprint(model_dir)
    device = resolve_device(options.device)
    compute_dtype = resolve_dtype(options.dtype, device)
    model = load_model(
        model_dir, dtype=options.dtype, device=device, trust_remote_code=options.trust_remote_code,
        allow_partial_weights=options.allow_partial_weights,
    )  # fmt: skip
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise PactError(f"reference {model_dir} has no output embedding (LM head)")
    check_vocabulary(model_dir, int(head.weight.shape[0]), safety, "output-embedding rows")
    safety_ids = torch.from_numpy(safety.token_ids.astype(np.int64)).to(device)
    if encoded:
        with torch.inference_mode():
            probe = torch.from_numpy(encoded[0].input_ids[None, :]).to(device)
            check_head_matches_forward(model, probe)
    return Reference(model, fingerprint, device, compute_dtype, safety_ids)


def check_vocabulary(model_dir: Path, vocab_rows: int | None, safety: SafetySet, what: str) -> None:
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


def config_vocab_size(model_dir: Path, trust_remote_code: bool) -> int | None:
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
