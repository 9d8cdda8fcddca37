"""The options of a precompute run and the example shards it splits into."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pact.core.config import check_choice, check_device, check_int, setting
from pact.core.data import FORMATS
from pact.core.encoding import EncodingOptions
from pact.core.errors import PactError
from pact.core.models import DTYPES, PARTIAL_WEIGHTS_HELP
from pact.store.targets import VALUE_DTYPES

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: examples with int(sha256(example_id), 16) % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/N' with 0 <= i < N."""
        match = _SHARD.match(text or "")
        if not match:
            raise PactError(f"--shard must look like i/N (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise PactError(f"--shard {text!r}: need N >= 1 and 0 <= i < N")
        return cls(index, count)

    @property
    def tag(self) -> str:
        """The writer's part-name tag, e.g. `s0of4`."""
        return f"s{self.index}of{self.count}"

    def owns(self, example_id: str) -> bool:
        return shard_of(example_id, self.count) == self.index


def torchrun_defaults(shard: str | None, device: str, environ: Mapping[str, str]) -> tuple[Shard, str]:
    """Shard and device for a run: an explicit --shard wins; under torchrun (RANK and
    WORLD_SIZE set) the shard is RANK/WORLD_SIZE and --device auto or cuda becomes
    cuda:LOCAL_RANK when CUDA is available; else shard 0/1."""
    if shard is not None:
        parsed = Shard.parse(shard)
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        parsed = Shard.parse(f"{environ['RANK']}/{environ['WORLD_SIZE']}")
    else:
        parsed = Shard()
    if device in ("auto", "cuda") and environ.get("LOCAL_RANK", "").isdigit() and torch.cuda.is_available():
        device = f"cuda:{int(environ['LOCAL_RANK'])}"
    return parsed, device


def shard_of(example_id: str, count: int) -> int:
    """int(sha256(example_id utf-8), 16) % count."""
    return int(hashlib.sha256(example_id.encode("utf-8")).hexdigest(), 16) % count


@dataclass(frozen=True)
class PrecomputeOptions:
    """Options of `run_precompute` (the CLI builds the flags of `pact precompute` from
    these fields); invalid values raise PactError when the options are built."""

    batch_size: int = setting(8, help="Examples per forward pass (batches are length-bucketed).")
    max_batch_tokens: int | None = setting(None, help="Cap on rows x padded length per batch.")
    max_length: int = setting(
        1024, help="Max prompt + response tokens (the response tail is cut); must match training."
    )
    label_after_end_of_turn: bool = setting(
        False,
        help="Label what the chat template writes after its end-of-turn token too (Qwen's, Gemma's, Phi-3's newline), as the paper's code does; recorded in the store. Default: labels and PACT steps stop at end-of-turn.",
    )
    dtype: str = setting(
        "auto", help="Compute dtype; auto = float32 on CPU, bfloat16 on CUDA.", choices=DTYPES
    )
    device: str = setting(
        "auto",
        help="auto, cpu, cuda or cuda:<index> (under torchrun auto or cuda: cuda:LOCAL_RANK; another index is refused).",
    )
    chunk_positions: int = setting(
        32, help="Response positions per LM-head chunk (bounds the [chunk, vocab] logits in memory)."
    )
    shard: Shard = setting(help="Shard of the examples this run computes.", factory=Shard, cli=False)
    value_dtype: str = setting(
        "float32", help="Stored dtype of the safety-token log-probs.", choices=tuple(VALUE_DTYPES)
    )
    examples_per_part: int = setting(
        256,
        help="Examples per Parquet part, rounded up to whole batches (a killed run loses at most one part of work).",
        flag="--part-size",
    )
    data_format: str | None = setting(
        None, help="Row shape of --data; detected when omitted.", flag="--format", choices=FORMATS
    )
    skip_invalid: bool = setting(
        False,
        help="Drop invalid rows and examples whose prompt does not fit --max-length (reported) instead of failing.",
    )
    trust_remote_code: bool = setting(False, help="Allow model code shipped with the reference directory.")
    allow_partial_weights: bool = setting(False, help=PARTIAL_WEIGHTS_HELP)
    progress: bool = setting(True, help="Show a progress bar.", cli=False)

    def __post_init__(self) -> None:
        check_int(self.batch_size, "--batch-size")
        if self.max_batch_tokens is not None:
            check_int(self.max_batch_tokens, "--max-batch-tokens")
        check_int(self.chunk_positions, "--chunk-positions")
        check_int(self.examples_per_part, "--part-size")
        check_choice(self.dtype, DTYPES, "--dtype")
        check_choice(self.value_dtype, tuple(VALUE_DTYPES), "--value-dtype")
        check_device(self.device, "--device")
        if self.data_format is not None:
            check_choice(self.data_format, FORMATS, "--format")
        if not isinstance(self.shard, Shard):
            raise PactError("PrecomputeOptions.shard must be a Shard (use Shard.parse('i/N'))")
        self.encoding()

    def encoding(self) -> EncodingOptions:
        """The shared encoding's options for this run."""
        return EncodingOptions(max_length=self.max_length, label_after_end_of_turn=self.label_after_end_of_turn)
