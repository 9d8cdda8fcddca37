"""What a training run reads before it loads a model, checked: `prepare_inputs`.

The fine-tuning set read (pact/core/data.py) and encoded, the tokenizer and the model
fingerprint (pact/core/models.py), the store, its safety set and its record of the
targets checked against this run (trainer/validate.py), and the drift probe
(`StoreDriftProbe`, pipeline/probe.py) for `--probe-every`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pact.core import distributed, models
from pact.core.data import Example, load_examples
from pact.core.distributed import Ranks
from pact.core.encoding import Encoded, EncodingOptions, encode_example
from pact.core.errors import PactError
from pact.core.special_text import special_text_warning
from pact.pipeline.probe import (
    DEFAULT_PROBE_BATCH_SIZE,
    encode_probe,
    probe_drift,
    probe_encoding_options,
    read_reference_probe,
    reference_fingerprint,
    safety_logprobs,
    write_reference_probe,
)
from pact.store.manifest import Store
from pact.store.safety import SafetySet, load_safety_set
from pact.store.targets import TargetReader
from pact.trainer.config import DEFAULT_MAX_LENGTH, TrainConfig
from pact.trainer.validate import (
    check_examples,
    check_reference,
    check_vocabulary,
    encoding_options_for,
    reference_entry,
)


@dataclass
class RunInputs:
    """Everything a run reads before it loads the model, validated."""

    tokenizer: Any
    encoded: list[Encoded]
    options: EncodingOptions
    model_fingerprint: str
    store: Store | None
    reference_entry: dict[str, Any] | None  # the store's record of how its targets were made
    safety: SafetySet | None  # pact only
    reader: TargetReader | None  # cached targets (pact / constrained-sft with --reference cached)
    probe: StoreDriftProbe | None = None  # --probe-every


def prepare_inputs(config: TrainConfig, ranks: Ranks | None = None) -> RunInputs:
    """Data, tokenizer, store and safety set; with cached targets every check of the
    store against this run passes here, before any model is loaded.

    In a multi-process run each rank checks the token hashes of its share of the
    examples (every `world_size`-th one) and a failure on any rank stops all of them."""
    ranks = ranks or Ranks()
    examples = load_examples(config.data, config.data_format).examples
    model_fingerprint = models.model_fingerprint(config.model)
    tokenizer = models.load_tokenizer(config.model)
    use_targets = config.method != "sft" and config.reference == "cached"
    store = Store(config.store) if config.store is not None else None
    entry = safety = None
    if store is not None:
        manifest = store.require()
        entry = reference_entry(manifest, store.root) if use_targets else manifest.get("reference")
    if config.method == "pact":
        safety = load_safety_set(store)
        if not np.any(safety.weights > 0):
            raise PactError(
                f"the safety-token set of {store.root} has only zero weights: the PACT target is undefined"
            )
    options = encoding_options_for(entry, config.max_length, DEFAULT_MAX_LENGTH, config.label_after_end_of_turn)
    if use_targets:
        check_reference(entry, tokenizer, options, safety, model_fingerprint, config.model)
    elif entry is not None and safety is not None:
        check_vocabulary(entry, tokenizer)  # online PACT: the safety ids must name the same tokens
    encoded = [
        encode_example(tokenizer, example, options)
        for example in tqdm(
            examples, desc="encode", unit="ex", file=sys.stderr, leave=False, disable=not ranks.is_main
        )
    ]
    too_long = models.past_context_warning(config.model, [len(e.input_ids) for e in encoded], "examples")
    if too_long and ranks.is_main:
        tqdm.write(too_long, file=sys.stderr)
    specials = special_text_warning(examples, tokenizer)
    if specials and ranks.is_main:
        tqdm.write(specials, file=sys.stderr)
    reader = None
    if use_targets:
        reader = TargetReader(store, memory_budget_mb=config.targets_memory_mb)
        if ranks.enabled:
            with distributed.agreeing():
                check_examples(encoded[ranks.rank :: ranks.world_size], reader)
        else:
            check_examples(encoded, reader)
    probe = None
    if config.probe_every:
        probe = StoreDriftProbe(
            config.probe, tokenizer, store, safety, model_fingerprint, config.probe_batch_size
        )
    return RunInputs(tokenizer, encoded, options, model_fingerprint, store, entry, safety, reader, probe)


@dataclass
class StoreDriftProbe:
    """`--probe FILE --probe-every N`: the drift of the
    model's safety-token confidences on FILE from the store's cached reference probe
    (pipeline/probe.py, as `pact eval --probe` measures it)."""

    path: str  # the probe set: (harmful prompt, refusal) rows
    tokenizer: Any
    store: Store
    safety: SafetySet | None  # the run's safety set (pact), else None
    model_fingerprint: str  # of the model being fine-tuned, as loaded
    batch_size: int = DEFAULT_PROBE_BATCH_SIZE  # probe examples per forward pass
    examples: list[Example] = field(default_factory=list)

    def start(self, model: Any, *, fresh: bool) -> None:
        """Read the probe examples; the store must hold their reference probe.

        When it has none yet and this is a fresh run of the store's reference model, the
        model at step 0 IS the reference: compute and cache it (rank 0 writes)."""
        self.examples = load_examples(self.path, require_response=True).examples
        if read_reference_probe(self.store, self.examples) is not None:
            return
        manifest = self.store.require()
        reference = reference_fingerprint(manifest)
        if not fresh or self.safety is None or reference is None or self.model_fingerprint != reference:
            raise PactError(
                f"the store has no reference probe for {Path(self.path).name}: run "
                f"`pact eval --model REFERENCE --store {self.store.root} --probe {self.path}` first"
            )
        options = probe_encoding_options(manifest)
        encoded = encode_probe(self.tokenizer, self.examples, options)
        logprobs = safety_logprobs(model, encoded, self.safety.token_ids, batch_size=self.batch_size)
        distributed.on_main(
            lambda: write_reference_probe(
                self.store, self.examples, encoded, logprobs,
                reference_model=reference, safety=self.safety, options=options,
            )  # fmt: skip
        )
        distributed.barrier()

    def measure(self, model: Any) -> tuple[float, float]:
        """(mean KL(reference ‖ model), mean safety-token mass) on the probe set."""
        drift = probe_drift(model, self.tokenizer, self.store, self.examples, batch_size=self.batch_size)
        return drift.mean_kl, drift.mean_mass
