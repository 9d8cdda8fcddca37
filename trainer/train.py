"""Stage 2, `pact train`: fine-tune with PACT, plain SFT or constrained SFT.

One loop, read top to bottom in `train()`:

    check options -> `prepare_inputs`: data, tokenizer, store, safety set -> encode the data
    -> (cached) check the store's record and every example's targets
    -> load the model (+ LoRA) -> (online) the reference -> AdamW + schedule
    -> (--resume) restore the newest checkpoint
    -> for each optimizer step: grad_accum micro-batches of
           forward -> batch_loss -> (loss / micro-batches).backward()
       clip, step, schedule, metrics, checkpoint every --save-every
    -> RUN/model (full FT) or RUN/adapter (+ RUN/model with --merge), metrics

PACT loss per micro-batch (docs/loss.md): CE(response) + λ · token mean of KL_t.

Under torchrun (WORLD_SIZE > 1) every rank runs this loop on its share of each global
micro-batch (`--batch-size` x ranks examples), the model wrapped in DDP or sharded
with FSDP, each share's loss weighed so that the gradient is the single-process one;
rank 0 writes (pact/core/distributed.py, docs/distributed.md).

The options are `TrainConfig` (trainer/config.py); the data, the store checks and the
drift probe are prepared by trainer/inputs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm import tqdm

from pact.core import distributed, models
from pact.core.atomic import (
    TEMP_PREFIX,
    atomic_write_bytes,
    atomic_write_with,
    remove_stale_temporaries,
)
from pact.core.distributed import Ranks
from pact.core.encoding import Encoded, assistant_header_ids, encoding_fingerprints
from pact.core.errors import PactError
from pact.core.lm_head import DEFAULT_HEAD_CHUNK_LOGITS, check_head_matches_forward, head_rows
from pact.core.outputs import check_output_dir
from pact.store.lock import run_writer
from pact.store.manifest import Store
from pact.store.tables import METRICS_SCHEMA, write_table
from pact.trainer import checkpoint
from pact.trainer.batches import (
    Batch,
    cached_batch,
    collate,
    epoch_batches,
    rank_share,
)
from pact.trainer.checkpoint import TrainerState
from pact.trainer.config import (
    RESUMABLE_CHANGES,
    TrainConfig,
    default_run_id,
)
from pact.trainer.fused import fused_batch_loss
from pact.trainer.inputs import RunInputs, prepare_inputs
from pact.trainer.loss import PactConfig
from pact.trainer.reference import OnlineReference
from pact.trainer.resume_check import resume_point


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: Path
    run_id: str
    steps: int  # optimizer steps done in total
    metrics: list[dict[str, Any]]  # one row per optimizer step (METRICS_SCHEMA)
    model_dir: Path | None  # transformers-loadable model (full FT, or LoRA with merge)
    adapter_dir: Path | None  # peft adapter (LoRA)


@dataclass
class StepLoss:
    """One micro-batch: `loss` carries the gradient; the rest are floats for logging."""

    loss: Tensor
    ce: float
    kl: float | None
    gate_mean: float | None


@dataclass
class StepTotals:
    """Sums over the micro-batches of one optimizer step, for the metrics row."""

    loss: float = 0.0
    ce: float = 0.0
    kl: float = 0.0
    gate_mean: float = 0.0
    tokens: int = 0

    def add(self, terms: StepLoss, loss: float, tokens: int) -> None:
        self.loss += loss
        self.ce += terms.ce
        self.kl += terms.kl or 0.0
        self.gate_mean += terms.gate_mean or 0.0
        self.tokens += tokens

    def row(self, micro_batches: int, *, pact: bool) -> dict[str, float | None]:
        """Means over the micro-batches; kl and gate_mean only for PACT."""
        return {
            "loss": self.loss / micro_batches,
            "ce": self.ce / micro_batches,
            "kl": self.kl / micro_batches if pact else None,
            "gate_mean": self.gate_mean / micro_batches if pact else None,
        }


# ----------------------------------------------------------------------------- model


def _compute_dtype(device: str) -> str:
    """bf16 on CUDA, fp32 on CPU: the autocast dtype and that of frozen weights."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def _weights_dtype(finetune: str, device: str) -> str:
    """fp32 master weights for full FT; the frozen LoRA base in the compute dtype."""
    return _compute_dtype(device) if finetune == "lora" else "float32"


def _autocast_factory(device: str) -> Callable[[], contextlib.AbstractContextManager]:
    if device.startswith("cuda"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant): transformers'
    `activation_checkpointing_enable`, or its older name `gradient_checkpointing_enable`
    (deprecated since transformers 5.2x) where the new one does not exist."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_student(config: TrainConfig, device: str) -> Any:
    """The model to fine-tune, loaded with `models.load_model`: full (all weights trainable) or
    wrapped with LoRA adapters."""
    model = models.load_model(
        config.model, dtype=_weights_dtype(config.finetune, device), device=device,
        allow_partial_weights=config.allow_partial_weights,
    )  # fmt: skip
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    if config.finetune == "full":
        return model.train()
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, lora)
    except ValueError as exc:
        raise PactError(
            f"--lora-targets {','.join(config.lora_targets)}: {str(exc).splitlines()[0]}"
        ) from None
    return model.train()


# ----------------------------------------------------------------------------- loss


def batch_loss(
    model: Any,
    batch: Batch,
    *,
    method: str,
    kl_weight: float,
    pact: PactConfig,
    safety_ids: Tensor | None,
    weights: Tensor | None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    head_chunk_logits: int = DEFAULT_HEAD_CHUNK_LOGITS,
) -> StepLoss:
    """Forward `batch` through `model` and return its loss (token means over the batch).

    pact: CE + kl_weight · pact_kl; sft: CE; constrained-sft: the Qi et al. loss on the
    response token log-probs. `batch.reference` must hold the reference targets for
    pact and constrained-sft. The LM head runs only on the label and step rows, in
    chunks of `head_chunk_logits` logits (`trainer/fused.py`).
    """
    terms = fused_batch_loss(
        model, batch, method=method, kl_weight=kl_weight, pact=pact, safety_ids=safety_ids,
        weights=weights, autocast=autocast, head_chunk_logits=head_chunk_logits,
    )  # fmt: skip
    return StepLoss(
        terms.loss,
        float(terms.ce),
        None if terms.kl is None else float(terms.kl),
        None if terms.gate_mean is None else float(terms.gate_mean),
    )


# ----------------------------------------------------------------------------- helpers


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `warmup_steps`, then cosine / linear decay to 0 at
    `total_steps`, or constant (the transformers schedules)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def _deterministic(seed: int, device: str) -> Iterator[None]:
    """Seed python, numpy and torch; on CPU also deterministic kernels (restored on exit)."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    _seed_everything(seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _write_metrics(
    run_dir: Path, store: Store | None, run_id: str, rows: list[dict[str, Any]]
) -> None:
    table = pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)
    atomic_write_with(run_dir / "metrics.parquet", lambda p: pq.write_table(table, p))
    if store is not None:
        write_table(store, "metrics", run_id, table)


def _check_resume(record: dict[str, Any], saved: dict[str, Any], path: Path) -> None:
    """The checkpoint was written by the same run (options, model and data); on another
    world size, --batch-size x ranks (the global micro-batch) is unchanged."""
    world, saved_world = record.get("world_size", 1), saved.get("world_size", 1)
    batch, saved_batch = record["options"]["batch_size"], saved["options"].get("batch_size")
    if world != saved_world and (
        not isinstance(saved_batch, int) or batch * world != saved_batch * saved_world
    ):
        micro = saved_batch * saved_world if isinstance(saved_batch, int) else None
        hint = (
            f"pass --batch-size {micro // world}"
            if micro is not None and micro % world == 0
            else f"run on a number of ranks that divides {micro}"
        )
        raise PactError(
            f"--resume: {path.name} was trained with {saved_world} rank(s) x --batch-size {saved_batch} "
            f"examples per micro-batch, this run has {world} x {batch}; keep the global micro-batch: {hint}"
        )
    for key, value in sorted(record["options"].items()):
        if key == "batch_size" and world != saved_world:
            continue  # checked above
        if key not in RESUMABLE_CHANGES and saved["options"].get(key) != value:
            raise PactError(
                f"--resume: option {key} is {value!r} but {path.name} was trained with "
                f"{saved['options'].get(key)!r}; keep the options or choose another --out"
            )
    for key in ("model", "data"):
        if saved["fingerprints"].get(key) != record["fingerprints"][key]:
            raise PactError(
                f"--resume: the {key} changed since {path.name} was written (fingerprint differs)"
            )


def _data_fingerprint(encoded: list) -> str:
    digest = hashlib.sha256()
    for example in encoded:
        digest.update(f"{example.example_id}\0{example.token_hash}\n".encode())
    return digest.hexdigest()[:16]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _save_pretrained(
    directory: Path, model: Any, tokenizer: Any, state_dict: dict[str, Tensor] | None = None
) -> None:
    with checkpoint.atomic_directory(directory) as tmp:
        if state_dict is None:
            model.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))


def _output_dirs(config: TrainConfig, run_dir: Path) -> tuple[Path | None, Path | None]:
    """(model_dir, adapter_dir) that `save_outputs` writes for `config`."""
    if config.finetune == "full":
        return run_dir / "model", None
    return (run_dir / "model" if config.merge else None), run_dir / "adapter"


def save_outputs(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    run_dir: Path,
    *,
    state_dict: dict[str, Tensor] | None = None,
) -> tuple[Path | None, Path | None]:
    """RUN/model (full FT; LoRA with merge) and RUN/adapter (LoRA); returns (model_dir, adapter_dir).

    `state_dict`: the full weights of a sharded (FSDP, full fine-tuning) model, gathered
    on this rank; default: the model's own."""
    model.eval()
    if config.finetune == "full":
        _save_pretrained(run_dir / "model", model, tokenizer, state_dict)
        return run_dir / "model", None
    _save_pretrained(run_dir / "adapter", model, tokenizer)
    if not config.merge:
        return None, run_dir / "adapter"
    _save_pretrained(run_dir / "model", model.merge_and_unload(), tokenizer)
    return run_dir / "model", run_dir / "adapter"


def _run_record(
    config: TrainConfig,
    inputs: RunInputs,
    run_id: str,
    steps_per_epoch: int,
    total_steps: int,
    world_size: int = 1,
) -> dict[str, Any]:
    """RUN/config.json: every option (paths absolute), fingerprints, versions, world size."""
    options = dataclasses.asdict(config)
    for key in ("model", "data", "out", "store"):
        if options[key] is not None:
            options[key] = str(Path(options[key]).resolve())
    record = {
        "options": options,
        "run_id": run_id,
        "store": options["store"],
        "fingerprints": {
            "model": inputs.model_fingerprint,
            "data": _data_fingerprint(inputs.encoded),
            "safety_tokens": None if inputs.safety is None else inputs.safety.fingerprint,
            "store_reference": inputs.reference_entry,
            **encoding_fingerprints(inputs.tokenizer, inputs.options),
        },
        "num_examples": len(inputs.encoded),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "world_size": world_size,
        "versions": {p: _version(p) for p in ("pact", "torch", "transformers", "peft")},
    }
    return json.loads(json.dumps(record))


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.data`; see the module docstring and docs/training.md.

    Phases: the options (checked when `config` was built), the process group and the run
    directory are checked -> `prepare_inputs` reads, encodes and checks the data against
    the store (trainer/inputs.py), before any model is loaded -> `_train`: load, loop, save.

    Under torchrun (WORLD_SIZE > 1) every rank calls it: the process group is
    initialised here (gloo on CPU, nccl on CUDA) unless the caller did, the model is
    wrapped in DDP (or sharded with FSDP), and rank 0 writes; see docs/distributed.md.
    """
    with distributed.process_group(config.device) as ranks, contextlib.ExitStack() as held:
        device = models.resolve_device(distributed.rank_device(config.device, ranks))
        run_dir = Path(config.out)
        with distributed.agreeing():
            if config.fsdp and not ranks.enabled:
                raise PactError(
                    "--fsdp shards the model over the processes of a torchrun launch; "
                    "this is a single process (WORLD_SIZE unset or 1)"
                )
            if run_dir.exists() and not run_dir.is_dir():
                raise PactError(f"--out {run_dir} exists and is not a directory")
            check_output_dir(run_dir, {"the store": config.store, "the model": config.model})
            if ranks.is_main:  # one writer per run directory; the checks below run under it
                held.enter_context(run_writer(run_dir))
            if not config.resume and (run_dir / "config.json").exists():
                raise PactError(
                    f"{run_dir} already holds a training run (config.json); pass --resume or choose another --out"
                )
            resume_from = resume_point(run_dir) if config.resume else None
            if config.resume and resume_from is None and not (run_dir / "config.json").is_file():
                raise PactError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        with _deterministic(config.seed, device):
            inputs = prepare_inputs(config, ranks)
            return _train(config, inputs, run_dir, resume_from, device, ranks)


@dataclass
class _MicroBatches:
    """How one optimizer step's micro-batches are read and weighed on this rank."""

    make_batch: Callable[[list[int]], Batch]
    loss: Callable[[Batch], StepLoss]


def _local_micro_steps(
    group: list[list[int]], run: _MicroBatches, state: TrainerState, stop: Callable[[str], PactError]
) -> StepTotals:
    """Single process: each micro-batch's loss (a token mean) / the number of micro-batches."""
    totals = StepTotals()
    for micro, indices in enumerate(group):
        batch = run.make_batch(indices)
        terms = run.loss(batch)
        value = float(terms.loss.detach())
        if not math.isfinite(value):
            where = f"epoch {state.epoch}, batch {state.batch_index + micro}, examples {', '.join(batch.example_ids[:3])}"
            raise stop(f"the loss is {value} at step {state.step + 1} ({where})")
        (terms.loss / len(group)).backward()
        totals.add(terms, value, batch.num_tokens)
    return totals


def _distributed_micro_steps(
    group: list[list[int]],
    run: _MicroBatches,
    state: TrainerState,
    stop: Callable[[str], PactError],
    encoded: list[Encoded],
    wrapped: torch.nn.Module,
    ranks: Ranks,
) -> StepTotals:
    """Every rank: its share of each global micro-batch, weighed so that DDP's gradient
    mean equals the single-process gradient of the whole micro-batch.

    Global micro-batch k has N_k response tokens (all-reduced first); this rank's share
    n_k. Its loss is a token mean over n_k (CE over the response labels, KL over the
    valid steps: the same tokens), so loss_k * n_k / N_k is its part of the token mean
    over N_k; times world_size because DDP averages gradients over the ranks; / the
    number of micro-batches as in a single process. A rank with an empty share runs the
    micro-batch's first example with weight 0 (DDP needs every rank in every backward).
    """
    shares = [rank_share(indices, ranks.rank, ranks.world_size) for indices in group]
    local = [sum(encoded[i].response_length for i in share) for share in shares]
    global_tokens = distributed.all_reduce(local)
    sums = [0.0] * 5  # loss, ce, kl, gate_mean (token-weighted), input tokens
    failure = None
    for micro, (indices, share) in enumerate(zip(group, shares, strict=True)):
        weight = local[micro] / global_tokens[micro] if share else 0.0
        batch = run.make_batch(share or indices[:1])
        with distributed.gradient_sync(wrapped, micro == len(group) - 1):
            terms = run.loss(batch)
            (terms.loss * (weight * ranks.world_size / len(group))).backward()
        if not share:
            continue
        value = float(terms.loss.detach())
        if not math.isfinite(value) and failure is None:
            failure = (value, f"epoch {state.epoch}, batch {state.batch_index + micro}, examples {', '.join(batch.example_ids[:3])}")
        for i, part in enumerate((value, terms.ce, terms.kl or 0.0, terms.gate_mean or 0.0)):
            sums[i] += part * weight
        sums[4] += batch.num_tokens
    loss, ce, kl, gate_mean, tokens = distributed.all_reduce(sums)
    if not math.isfinite(loss):
        value, where = next(f for f in distributed.all_gather_objects(failure) if f is not None)
        raise stop(f"the loss is {value} at step {state.step + 1} ({where})")
    return StepTotals(loss, ce, kl, gate_mean, int(tokens))


def _train(
    config: TrainConfig,
    inputs: RunInputs,
    run_dir: Path,
    resume_from: Path | None,
    device: str,
    ranks: Ranks,
) -> TrainResult:
    tokenizer, encoded, store = inputs.tokenizer, inputs.encoded, inputs.store
    run_id = config.run_id or default_run_id(run_dir)

    # The model being trained and, online, the reference.
    model = load_student(config, device)
    check_head_matches_forward(model, torch.as_tensor(encoded[0].input_ids, device=device)[None])
    autocast = _autocast_factory(device)
    safety_ids = weights = None
    if inputs.safety is not None:
        top_id, vocab = int(inputs.safety.token_ids.max()), head_rows(model)
        if top_id >= vocab:
            raise PactError(
                f"safety token id {top_id} is outside the model's vocabulary of {vocab}"
            )
        safety_ids = torch.as_tensor(inputs.safety.token_ids, device=device)
        weights = torch.as_tensor(inputs.safety.weights, device=device)
    online = None
    if config.method != "sft" and config.reference == "online":
        lora = config.finetune == "lora"
        if lora:
            reference = model  # adapters disabled for the reference pass
        else:
            reference = models.load_model(
                config.model, dtype=_compute_dtype(device), device=device,
                allow_partial_weights=config.allow_partial_weights,
            ).requires_grad_(False)  # fmt: skip
        online = OnlineReference(
            reference,
            assistant_header_ids(tokenizer),
            safety_ids,
            tokenizer.pad_token_id,
            adapters_disabled=lora,
            autocast=autocast,
            head_chunk_logits=config.head_chunk_logits,
        )
    # DDP (or FSDP) under torchrun; the model itself in a single process.
    wrapped = distributed.wrap_model(model, ranks, device, fsdp=config.fsdp)

    # Optimizer and schedule over the optimizer steps of the whole run.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    global_micro = config.batch_size * ranks.world_size  # examples per (global) micro-batch
    steps_per_epoch = math.ceil(math.ceil(len(encoded) / global_micro) / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, total_steps)
    full_state = distributed.FullState(model, optimizer) if config.fsdp else None

    # Fresh start or resume from the newest complete checkpoint, exactly where it stopped.
    record = _run_record(config, inputs, run_id, steps_per_epoch, total_steps, ranks.world_size)
    state = TrainerState()
    if resume_from is not None:
        with distributed.agreeing():
            _check_resume(record, checkpoint.read_checkpoint_config(resume_from), resume_from)
        state = checkpoint.load_checkpoint(
            resume_from, model, optimizer, scheduler,
            load_weights=full_state.load_weights if full_state else None,
            load_optimizer_state=full_state.load_optimizer_state if full_state else None,
        )  # fmt: skip
    else:
        if config.resume:  # killed before its first checkpoint: the same run starts over at step 0
            started_config = run_dir / "config.json"
            with distributed.agreeing():
                _check_resume(record, json.loads(started_config.read_text()), started_config)
        _seed_everything(config.seed)  # the same dropout stream whatever was loaded above

    def start_run_dir() -> None:
        checkpoint.remove_stale_directories(run_dir / checkpoint.CHECKPOINTS_DIR)
        checkpoint.remove_stale_directories(run_dir)
        if run_dir.is_dir():
            remove_stale_temporaries(run_dir)
            checkpoint.prune_checkpoints(run_dir)
        if store is not None:
            for stale in (store.root / "metrics").glob(f"{TEMP_PREFIX}{run_id}.parquet.*"):
                stale.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            run_dir / "config.json", json.dumps(record, indent=1, sort_keys=True).encode()
        )

    distributed.on_main(start_run_dir)

    def stop(reason: str) -> PactError:
        distributed.on_main(lambda: _write_metrics(run_dir, store, run_id, state.metrics))
        last = checkpoint.latest_checkpoint(run_dir)
        kept = (
            f"the last checkpoint {last} is intact (--resume continues from it)"
            if last
            else "no checkpoint was written"
        )
        return PactError(f"{reason}; training stopped, {kept}")

    def make_batch(indices: list[int]) -> Batch:
        chosen = [encoded[i] for i in indices]
        if inputs.reader is not None:
            batch = cached_batch(chosen, tokenizer.pad_token_id, inputs.reader).to(device)
        else:
            batch = collate(chosen, tokenizer.pad_token_id).to(device)
        if online is not None:
            batch.reference = online.targets(batch)
        return batch

    def loss(batch: Batch) -> StepLoss:
        return batch_loss(
            wrapped, batch, method=config.method, kl_weight=config.kl_weight,
            pact=config.pact, safety_ids=safety_ids, weights=weights, autocast=autocast,
            head_chunk_logits=config.head_chunk_logits,
        )  # fmt: skip

    def save() -> None:
        # FSDP: gather the full weights and optimizer state on rank 0 (a collective).
        full_weights = full_state.weights() if full_state else None
        optimizer_state = full_state.optimizer_state() if full_state else None

        def write() -> None:
            checkpoint.save_checkpoint(
                run_dir, state, model, optimizer, scheduler, record,
                weights=full_weights, optimizer_state=optimizer_state,
            )  # fmt: skip
            _write_metrics(run_dir, store, run_id, state.metrics)

        distributed.on_main(write)

    probe = inputs.probe if config.probe_every else None
    if probe is not None:
        probe.start(model, fresh=resume_from is None)
    micro_batches = _MicroBatches(make_batch, loss)
    with tqdm(
        total=total_steps,
        initial=state.step,
        desc=f"train {config.method}",
        unit="step",
        file=sys.stderr,
        disable=not ranks.is_main,
    ) as progress:
        started = time.perf_counter() - state.elapsed_s
        batches, batches_epoch = [], None
        while state.step < total_steps:
            if batches_epoch != state.epoch:
                batches, batches_epoch = (
                    epoch_batches(len(encoded), global_micro, config.seed, state.epoch),
                    state.epoch,
                )
            group = batches[state.batch_index : state.batch_index + config.grad_accum]
            step_started = time.perf_counter()

            # grad_accum micro-batches: each loss is a token mean of its micro-batch, divided by their count.
            if ranks.enabled:
                totals = _distributed_micro_steps(
                    group, micro_batches, state, stop, encoded, wrapped, ranks
                )
            else:
                totals = _local_micro_steps(group, micro_batches, state, stop)

            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
            )
            if not math.isfinite(grad_norm):
                raise stop(
                    f"the gradient norm is {grad_norm} at step {state.step + 1} (epoch {state.epoch})"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            epoch = state.epoch
            state.step += 1
            state.batch_index += len(group)
            if state.batch_index >= len(batches):
                state.epoch, state.batch_index = state.epoch + 1, 0
            now = time.perf_counter()
            state.elapsed_s = now - started
            peak_memory = _peak_memory_mb(device)
            if ranks.enabled:
                peak_memory = distributed.all_reduce([peak_memory], "max")[0]
            row = totals.row(len(group), pact=config.method == "pact") | {
                "run_id": run_id,
                "method": config.method,
                "step": state.step,
                "epoch": epoch,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": totals.tokens / max(now - step_started, 1e-9),
                "peak_memory_mb": peak_memory,
                "time": state.elapsed_s,
                "probe_kl": None,
                "probe_mass": None,
            }
            if probe is not None and state.step % config.probe_every == 0:
                row["probe_kl"], row["probe_mass"] = probe.measure(wrapped)
            state.metrics.append(row)
            progress.set_postfix(
                {k: f"{row[k]:.4g}" for k in ("loss", "ce", "kl", "lr", "probe_kl") if row[k] is not None},
                refresh=False,
            )
            progress.update(1)
            if config.save_every and (
                state.step % config.save_every == 0 or state.step == total_steps
            ):
                save()

    state_dict = full_state.model_state() if full_state else None
    outputs = distributed.on_main(
        lambda: save_outputs(config, model, tokenizer, run_dir, state_dict=state_dict)
    )
    model_dir, adapter_dir = outputs if outputs is not None else _output_dirs(config, run_dir)
    distributed.on_main(lambda: _write_metrics(run_dir, store, run_id, state.metrics))
    return TrainResult(run_dir, run_id, state.step, state.metrics, model_dir, adapter_dir)
