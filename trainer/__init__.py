"""Stage 2: the PACT loss (pure functions) and the training loop behind `pact train`."""

from pact.trainer.config import TrainConfig
from pact.trainer.fused import batch_loss
from pact.trainer.loss import (
    PactConfig,
    constrained_sft_loss,
    cross_entropy_and_subset,
    pact_kl,
    pact_kl_terms,
    response_cross_entropy,
)
from pact.trainer.train import TrainResult, train

__all__ = [
    "PactConfig",
    "TrainConfig",
    "TrainResult",
    "batch_loss",
    "constrained_sft_loss",
    "cross_entropy_and_subset",
    "pact_kl",
    "pact_kl_terms",
    "response_cross_entropy",
    "train",
]
