"""A run's inputs, read and checked before the model loads: the store and its safety
set, the reference's configured vocabulary, the examples of this shard and their
encoding (the one the trainer uses)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pact.core.data import Example, load_examples
from pact.core.encoding import Encoded, assistant_header_ids, encode_example
from pact.core.errors import PactError
from pact.core.models import load_tokenizer
from pact.pipeline.precompute.model import check_vocabulary, config_vocab_size
from pact.pipeline.precompute.options import PrecomputeOptions
from pact.pipeline.precompute.summary import PrecomputeSummary
from pact.store.manifest import Store
from pact.store.safety import SafetySet, load_safety_set
from pact.store.targets import TargetReader


@dataclass
class Inputs:
    """What `read_inputs` read."""

    model_dir: Path
    store: Store
    safety: SafetySet
    examples: list[Example]  # every valid example of the data, all shards
    tokenizer: Any
    encoded: list[Encoded]  # this shard's examples, encoded
    header: list[int]  # the assistant header ids (the post-only context's start)


def read_inputs(
    model_dir: Path,
    data_path: str | Path,
    store_dir: str | Path,
    options: PrecomputeOptions,
    summary: PrecomputeSummary,
) -> Inputs:
    """Read and check the store, the safety set, the reference's config vocabulary and
    the data; encode this shard's examples. Dropped rows go to `summary.dropped`."""
    store = Store(store_dir)
    safety = load_safety_set(store)
    if store.read_manifest()["parts"]:
        TargetReader(store, check_finite=False)  # a damaged store fails before the model loads
    vocab_size = config_vocab_size(model_dir, options.trust_remote_code)
    check_vocabulary(model_dir, vocab_size, safety, "vocabulary entries (config.vocab_size)")
    loaded = load_examples(data_path, options.data_format, skip_invalid=options.skip_invalid)
    summary.dropped += [f"row {bad.row}: {bad.reason}" for bad in loaded.invalid]
    tokenizer = load_tokenizer(model_dir, trust_remote_code=options.trust_remote_code)
    encoded = _encode_shard(tokenizer, loaded.examples, options, summary)
    summary.examples = len(encoded)
    return Inputs(model_dir, store, safety, loaded.examples, tokenizer, encoded, assistant_header_ids(tokenizer))


def _encode_shard(
    tokenizer: Any, examples: list[Example], options: PrecomputeOptions, summary: PrecomputeSummary
) -> list[Encoded]:
    """The examples this shard owns, encoded; with --skip-invalid an unencodable one is
    dropped (noted in `summary.dropped`), else it fails the run."""
    encoding = options.encoding()
    encoded = []
    for example in examples:
        if not options.shard.owns(example.example_id):
            continue
        try:
            encoded.append(encode_example(tokenizer, example, encoding))
        except PactError as exc:
            if not options.skip_invalid:
                raise PactError(f"{exc} (row {example.row}; pass --skip-invalid to skip it)") from None
            summary.dropped.append(f"row {example.row}: {exc}")
    return encoded
