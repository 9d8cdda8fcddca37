"""PACT from Hugging Face transformers' `Trainer` and TRL's `SFTTrainer` (docs/integrations.md).

    rows = pact_dataset("train.json", tokenizer, store="store")
    trainer = PactTrainer(model=model, args=TrainingArguments(...), train_dataset=rows,
                          processing_class=tokenizer, store="store")   # or PactSFTTrainer(..., args=SFTConfig(...))
    trainer.train()

- `pact_dataset`: the data encoded with pact's ONE encoding (`pact.core.encoding`), one row
  per example: example_id, input_ids, labels (-100 on the prompt), response_start,
  response_length. TRL does not tokenize it again, so the cached targets line up.
- `PactCollator`: rows -> a right-padded batch joined with each example's cached
  targets by example_id (`trainer.batches.cached_batch`), after checking every example's
  token hash against the store (`trainer.validate.check_examples`).
- `PactLossMixin`: `compute_loss` is `pact train`'s loss of a micro-batch
  (`pact.trainer.fused.batch_loss`), normalised as `pact train` normalises it: a token mean
  per micro-batch, divided by the micro-batches of the optimizer step, and under DDP each
  rank's share weighed by its response tokens. ce, kl and gate_mean go to `Trainer.log`.
  Every check of the store against the tokenizer, the model and the data runs when the
  trainer is built, before the first step. The data order is `pact train`'s.
- `PactTrainer` (transformers `Trainer`) and `PactSFTTrainer` (TRL `SFTTrainer`, needs
  `pip install 'pact[trl]'`).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import Trainer

from pact.core import distributed
from pact.core.data import load_examples
from pact.core.encoding import Encoded, EncodingOptions, encode_example, hash_ids
from pact.core.errors import PactError
from pact.core.models import model_fingerprint
from pact.store.manifest import Store
from pact.store.safety import SafetySet, load_safety_set
from pact.store.targets import DEFAULT_MEMORY_BUDGET_MB, TargetReader
from pact.trainer.batches import Batch, ReferenceTargets, cached_batch, collate, epoch_batches
from pact.trainer.config import DEFAULT_KL_WEIGHT, DEFAULT_MAX_LENGTH, METHODS
from pact.trainer.fused import batch_loss
from pact.trainer.loss import PactConfig
from pact.trainer.validate import (
    check_encoding,
    check_examples,
    check_reference,
    encoding_options_for,
    reference_entry,
)

__all__ = [
    "EpochOrderSampler",
    "PactCollator",
    "PactLossMixin",
    "PactTrainer",
    "pact_dataset",
]

ROW_COLUMNS = ("example_id", "input_ids", "labels", "response_start", "response_length")
# Columns of a pact_dataset row that the Trainer would drop as unknown to the model.
PACT_COLUMNS = ("example_id", "response_start", "response_length")
REFERENCE_KEYS = ("ref_token_logprobs", "ref_full", "ref_post")


# ----------------------------------------------------------------------------- the data


def _store(store: str | Path | Store) -> Store:
    return store if isinstance(store, Store) else Store(store)


def store_encoding(store: str | Path | Store, tokenizer: Any, max_length: int | None = None) -> EncodingOptions:
    """The encoding options the store's targets were computed with, after checking that
    `tokenizer` (vocabulary, chat template, assistant header) is the one they were
    computed with; PactError naming the first difference."""
    store = _store(store)
    entry = reference_entry(store.require(), store.root)
    options = encoding_options_for(entry, max_length, DEFAULT_MAX_LENGTH)
    check_encoding(entry, tokenizer, options)
    return options


def _rows_of(data: Any) -> Iterator[dict[str, Any]]:
    for row in data:
        yield {key: value for key, value in dict(row).items() if value is not None}


def _examples(data: Any, data_format: str | None) -> list:
    """pact's examples of a data file, or of the rows of a `datasets.Dataset` (or any
    iterable of dicts) read through the same reader (same example ids)."""
    if isinstance(data, (str, Path)):
        return load_examples(data, data_format).examples
    with tempfile.TemporaryDirectory(prefix="pact-rows-") as folder:
        path = Path(folder) / "rows.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for row in _rows_of(data):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return load_examples(path, data_format).examples


def encoded_row(encoded: Encoded) -> dict[str, Any]:
    """One dataset row (python lists and ints) of an encoded example."""
    return {
        "example_id": encoded.example_id,
        "input_ids": encoded.input_ids.tolist(),
        "labels": encoded.labels.tolist(),
        "response_start": encoded.response_start,
        "response_length": encoded.response_length,
    }


def pact_dataset(
    data: str | Path | Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    store: str | Path | Store | None = None,
    max_length: int | None = None,
    data_format: str | None = None,
) -> Any:
    """`data` (a JSON, JSONL or Parquet file, or a `datasets.Dataset` of rows in one of
    pact's shapes) encoded as `pact precompute` and `pact train` encode it.

    With `store`, the store's encoding options (max_length) are used and `tokenizer` is
    checked against the one its targets were computed with; without, `max_length`
    (default 1024). Returns a `datasets.Dataset` with the columns of `ROW_COLUMNS` (a list
    of row dicts when `datasets` is not installed)."""
    if store is not None:
        options = store_encoding(store, tokenizer, max_length)
    else:
        options = EncodingOptions(max_length=max_length or DEFAULT_MAX_LENGTH)
    rows = [encoded_row(encode_example(tokenizer, e, options)) for e in _examples(data, data_format)]
    try:
        import datasets
    except ImportError:
        return rows
    return datasets.Dataset.from_list(rows)


def row_encoded(row: dict[str, Any]) -> Encoded:
    """A `pact_dataset` row as the trainer's `Encoded`; the hashes are those of the row's
    own token ids."""
    missing = [column for column in ROW_COLUMNS if column not in row]
    if missing:
        raise PactError(
            f"a training row has no {', '.join(missing)}: build the dataset with "
            "pact.integrations.hf.pact_dataset (pact's encoding, with example ids)"
        )
    input_ids = np.asarray(row["input_ids"], dtype=np.int64)
    start, length = int(row["response_start"]), int(row["response_length"])
    return Encoded(
        example_id=str(row["example_id"]),
        input_ids=input_ids,
        labels=np.asarray(row["labels"], dtype=np.int64),
        response_start=start,
        response_length=length,
        token_hash=hash_ids(input_ids),
        response_hash=hash_ids(input_ids[start : start + length]),
        truncated=False,
    )


# ----------------------------------------------------------------------------- batches


def batch_inputs(batch: Batch) -> dict[str, Any]:
    """A Batch as the dict of tensors a Trainer moves to its device (`example_id`: list)."""
    inputs: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
        "response_start": batch.response_start,
        "response_length": batch.response_length,
        "step_mask": batch.step_mask,
        "example_id": list(batch.example_ids),
    }
    if batch.reference is not None:
        reference = batch.reference
        values = (reference.token_logprobs, reference.full, reference.post)
        inputs |= {key: value for key, value in zip(REFERENCE_KEYS, values, strict=True) if value is not None}
    return inputs


def inputs_batch(inputs: dict[str, Any]) -> Batch:
    """The Batch of `batch_inputs` back, on the device the Trainer moved it to."""
    reference = None
    if "ref_token_logprobs" in inputs:
        reference = ReferenceTargets(inputs["ref_token_logprobs"], inputs.get("ref_full"), inputs.get("ref_post"))
    return Batch(
        example_ids=list(inputs["example_id"]),
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=inputs["labels"],
        response_start=inputs["response_start"],
        response_length=inputs["response_length"],
        step_mask=inputs["step_mask"],
        reference=reference,
    )


class PactCollator:
    """`pact_dataset` rows -> one right-padded batch (`trainer.batches.collate`) joined with
    each example's cached targets by example_id, as a dict of tensors.

    Every example's token ids are first checked against the hash stored with its targets
    (`trainer.validate.check_examples`): another tokenizer, chat template or max length
    stops with one line naming the example. Without a reader (method sft): no targets."""

    def __init__(self, pad_token_id: int, reader: TargetReader | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.reader = reader

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        encoded = [row_encoded(row) for row in rows]
        if self.reader is None:
            return batch_inputs(collate(encoded, self.pad_token_id))
        check_examples(encoded, self.reader)
        return batch_inputs(cached_batch(encoded, self.pad_token_id, self.reader))


class EpochOrderSampler(torch.utils.data.Sampler[int]):
    """`pact train`'s data order: epoch e visits the permutation drawn from
    `torch.Generator(seed + e)` (`trainer.batches.epoch_batches`). The Trainer cuts it
    into batches (under DDP, rank r takes every r-th batch: with a full last batch, the
    shares of `pact train`'s global micro-batches) and calls `set_epoch`."""

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples, self.seed, self.epoch = num_examples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.num_examples:
            return iter(())
        return iter(epoch_batches(self.num_examples, self.num_examples, self.seed, self.epoch)[0])

    def __len__(self) -> int:
        return self.num_examples


# ----------------------------------------------------------------------------- the loss


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PactError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass
class PactSetup:
    """What the loss reads, checked: method, λ, gate and KL options, the store's record,
    encoding, safety set (pact) and targets (pact, constrained-sft)."""

    method: str
    kl_weight: float
    pact: PactConfig
    tokenizer: Any
    entry: dict[str, Any] | None = None
    options: EncodingOptions | None = None
    safety: SafetySet | None = None
    reader: TargetReader | None = None

    @classmethod
    def open(
        cls,
        store: str | Path | Store | None,
        tokenizer: Any,
        method: str,
        kl_weight: float,
        pact: PactConfig,
        targets_memory_mb: float,
    ) -> PactSetup:
        if method not in METHODS:
            raise PactError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        kl_weight = _number(kl_weight, "kl_weight")
        if method != "pact" and kl_weight != DEFAULT_KL_WEIGHT:
            raise PactError(f"kl_weight weighs the PACT KL; it has no effect with method {method!r}")
        if not isinstance(pact, PactConfig):
            raise PactError("pact_config must be a pact.trainer.loss.PactConfig")
        if tokenizer is None or getattr(tokenizer, "pad_token_id", None) is None:
            raise PactError(
                "pass processing_class=<the tokenizer the store's targets were computed with>, with a pad token"
            )
        setup = cls(method, kl_weight, pact, tokenizer)
        if method == "sft":
            return setup
        if store is None:
            raise PactError(f"method {method!r} needs store=<the pact store of pact tokens / pact precompute>")
        store = _store(store)
        setup.options = store_encoding(store, tokenizer)
        setup.entry = reference_entry(store.require(), store.root)
        if method == "pact":
            setup.safety = load_safety_set(store)
            if not np.any(setup.safety.weights > 0):
                raise PactError(
                    f"the safety-token set of {store.root} has only zero weights: the PACT target is undefined"
                )
        setup.reader = TargetReader(store, memory_budget_mb=targets_memory_mb)
        return setup

    def check_model(self, model: Any) -> None:
        """The safety ids fit the model's vocabulary; a model loaded from a local directory
        is the reference the store was built from (its fingerprint)."""
        if self.entry is None:
            return
        if self.safety is not None:
            vocab = int(model.get_output_embeddings().weight.shape[0])
            top_id = int(self.safety.token_ids.max())
            if top_id >= vocab:
                raise PactError(f"safety token id {top_id} is outside the model's vocabulary of {vocab}")
        path = str(getattr(model.config, "_name_or_path", "") or "")
        if path and (Path(path) / "config.json").is_file():
            check_reference(self.entry, self.tokenizer, self.options, self.safety, model_fingerprint(path), path)

    def check_rows(self, dataset: Any) -> None:
        """Every example of `dataset` has finite targets computed from the same token ids
        (each rank checks every world_size-th row; a failure stops every rank)."""
        if self.reader is None or dataset is None or not hasattr(dataset, "__len__"):
            return  # an iterable (streaming) dataset: the collator checks each batch
        ranks = distributed.current_ranks()
        with distributed.agreeing():
            encoded = [
                row_encoded(row) for i, row in enumerate(dataset) if i % ranks.world_size == ranks.rank
            ]
            check_examples(encoded, self.reader)

    def safety_tensors(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        if self.safety is None:
            return None, None
        return (
            torch.as_tensor(self.safety.token_ids, device=device),
            torch.as_tensor(self.safety.weights, device=device),
        )


@dataclass
class _LoggedTerms:
    """ce, kl, gate_mean summed over the micro-batches since the last log (each weighed by
    this rank's share of its global micro-batch)."""

    ce: float = 0.0
    kl: float = 0.0
    gate_mean: float = 0.0
    micro_batches: int = 0


class PactLossMixin:
    """Put before a transformers `Trainer` class (`class T(PactLossMixin, Trainer)`):
    `compute_loss` becomes `pact train`'s loss, the store is checked against the
    tokenizer, the model and the data when the trainer is built, the collator attaches
    the cached targets, the data order is `pact train`'s, and ce / kl / gate_mean are
    logged with the loss.

    Keyword arguments on top of the Trainer's: `store` (a pact store directory),
    `method` ("pact", "sft" or "constrained-sft"), `kl_weight` (λ), `pact_config`
    (`PactConfig`: gate and KL temperature), `targets_memory_mb` (the target reader's
    cache). `processing_class` must be the tokenizer the targets were computed with.
    """

    def __init__(
        self,
        *args: Any,
        store: str | Path | Store | None = None,
        method: str = "pact",
        kl_weight: float = DEFAULT_KL_WEIGHT,
        pact_config: PactConfig | None = None,
        targets_memory_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        **kwargs: Any,
    ) -> None:
        tokenizer = kwargs.get("processing_class")
        setup = PactSetup.open(
            store, tokenizer, method, kl_weight, pact_config or PactConfig(), targets_memory_mb
        )
        collator = kwargs.get("data_collator")
        if collator is not None and not isinstance(collator, PactCollator):
            raise PactError(
                "the PACT loss reads batches of pact.integrations.hf.PactCollator (cached targets "
                f"joined by example id), not {type(collator).__name__}: leave data_collator unset"
            )
        if collator is None:
            kwargs["data_collator"] = PactCollator(tokenizer.pad_token_id, setup.reader)
        super().__init__(*args, **kwargs)
        # compute_loss returns a token mean per micro-batch: the Trainer divides it by the
        # micro-batches of the optimizer step, as pact train does (num_items_in_batch unused).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.pact_setup = setup
        self._pact_logged = _LoggedTerms()
        setup.check_model(self.model)
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for dataset in (self.train_dataset, *evals):
            setup.check_rows(dataset)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *PACT_COLUMNS]))

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not hasattr(dataset, "__len__"):
            return None  # an iterable dataset keeps its own order
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochOrderSampler(len(dataset), seed)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """`pact train`'s loss of this micro-batch (`pact.trainer.fused.batch_loss`): a token mean
        over its response tokens. Under DDP (training), times this rank's share of the
        global micro-batch's response tokens x world size, so that DDP's gradient mean is
        the token mean over the global micro-batch, as in `pact train`."""
        setup = self.pact_setup
        batch = inputs_batch(inputs)
        safety_ids, weights = setup.safety_tensors(batch.input_ids.device)
        terms = batch_loss(
            model, batch, method=setup.method, kl_weight=setup.kl_weight, pact=setup.pact,
            safety_ids=safety_ids, weights=weights,
        )  # fmt: skip
        loss = terms.loss
        if model.training:
            share, world_size = _token_share(batch)
            logged = self._pact_logged
            logged.ce += terms.ce * share
            logged.kl += (terms.kl or 0.0) * share
            logged.gate_mean += (terms.gate_mean or 0.0) * share
            logged.micro_batches += 1
            loss = loss * (share * world_size)
        if not return_outputs:
            return loss
        with torch.no_grad():
            outputs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return loss, outputs

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """A training log (it holds `loss`) also gets ce and, for pact, kl and gate_mean:
        means over the micro-batches since the last log, as pact train's metrics."""
        if "loss" in logs and self._pact_logged.micro_batches:
            logs.update(self._pact_metrics())
        super().log(logs, *args, **kwargs)

    def _pact_metrics(self) -> dict[str, float]:
        logged, self._pact_logged = self._pact_logged, _LoggedTerms()
        ce, kl, gate_mean = distributed.all_reduce([logged.ce, logged.kl, logged.gate_mean])
        metrics = {"ce": ce / logged.micro_batches}
        if self.pact_setup.method == "pact":
            metrics |= {"kl": kl / logged.micro_batches, "gate_mean": gate_mean / logged.micro_batches}
        return metrics


def _token_share(batch: Batch) -> tuple[float, int]:
    """(this rank's response tokens / those of every rank, world size); (1.0, 1) in one process."""
    ranks = distributed.current_ranks()
    if not ranks.enabled:
        return 1.0, 1
    local = float(batch.step_mask.sum())
    total = distributed.all_reduce([local])[0]
    return local / total, ranks.world_size


class PactTrainer(PactLossMixin, Trainer):
    """transformers' `Trainer` with `pact train`'s loss (see `PactLossMixin`)."""


@functools.cache
def _sft_trainer_class() -> type:
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        raise PactError("PactSFTTrainer needs TRL: pip install 'pact[trl]'") from None

    class PactSFTTrainer(PactLossMixin, SFTTrainer):
        """TRL's `SFTTrainer` with `pact train`'s loss (see `PactLossMixin`). The dataset is
        `pact_dataset`'s, already encoded: TRL's own preparation (tokenization, truncation
        to `SFTConfig.max_length`, packing) is skipped."""

        def __init__(self, model: Any, args: Any = None, **kwargs: Any) -> None:
            if not isinstance(args, SFTConfig):
                raise PactError("PactSFTTrainer needs args=SFTConfig(...)")
            if args.packing or args.padding_free:
                raise PactError(
                    "PactSFTTrainer trains on right-padded examples joined with their targets: "
                    "set packing=False and padding_free=False"
                )
            if isinstance(args.dataset_kwargs, str):
                args.dataset_kwargs = json.loads(args.dataset_kwargs)
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
            super().__init__(model, args, **kwargs)

    PactSFTTrainer.__qualname__ = "PactSFTTrainer"  # pickled by name through __getattr__ below
    return PactSFTTrainer


def __getattr__(name: str) -> Any:
    if name == "PactSFTTrainer":
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
