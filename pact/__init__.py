"""pact: safety-preserving fine-tuning (PACT) as an offline reference-statistics pipeline
plus a lightweight trainer.

The public API (imported on first use, so `import pact` stays cheap); the layers are
described in docs/architecture.md:

- `pact.core`: errors, atomic I/O, data, the shared encoding, model loading, torchrun helpers;
- `pact.store`: the on-disk contract between stages (no model code);
- `pact.pipeline`: stage 0 (tokens), stage 1 (precompute), evaluation, the CLI and the demo;
- `pact.trainer`: stage 2, the PACT loss and the training loop.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Example": "pact.core.data",
    "LoadResult": "pact.core.data",
    "load_examples": "pact.core.data",
    "Encoded": "pact.core.encoding",
    "EncodingOptions": "pact.core.encoding",
    "encode_example": "pact.core.encoding",
    "PactError": "pact.core.errors",
    "SafetySet": "pact.store",
    "Store": "pact.store",
    "TargetReader": "pact.store",
    "load_safety_set": "pact.store",
    "PactConfig": "pact.trainer.loss",
    "constrained_sft_loss": "pact.trainer.loss",
    "cross_entropy_and_subset": "pact.trainer.loss",
    "pact_kl": "pact.trainer.loss",
    "pact_kl_terms": "pact.trainer.loss",
    "response_cross_entropy": "pact.trainer.loss",
    "TrainConfig": "pact.trainer.config",
    "batch_loss": "pact.trainer.fused",
    "train": "pact.trainer.train",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pact' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
