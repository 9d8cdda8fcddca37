"""Stage 2, `pact train`: fine-tune with PACT, plain SFT or constrained SFT.

`train(config)` reads top to bottom as a recipe in named phases:

    _setup   the process group and the run directory (one writer; --resume's checkpoint)
    prepare_inputs   data, tokenizer, store, safety set: encoded and checked against the
             store before any model is loaded (trainer/inputs.py)
    _load    the model (+ LoRA), the online reference, DDP / FSDP, AdamW + schedule
    _start   the run record (RUN/config.json); step 0, or the state of the checkpoint
    _loop    for each optimizer step: grad_accum micro-batches of
                 forward -> batch_loss -> (loss / micro-batches).backward()
             clip, step, schedule, metrics, a checkpoint every --save-every
    _save    RUN/model (full FT) or RUN/adapter (+ RUN/model with --merge), metrics

PACT loss per micro-batch (docs/loss.md): CE(response) + λ · token mean of KL_t.

Under torchrun (WORLD_SIZE > 1) every rank runs this loop on its share of each global
micro-batch (`--batch-size` x ranks examples), the model wrapped in DDP or sharded
with FSDP, each share's loss weighed so that the gradient is the single-process one;
rank 0 writes (pact/core/distributed.py, docs/distributed.md).

The side jobs live in modules named for them: the options `TrainConfig`
(trainer/config.py), the model's dtypes, loading and saving (trainer/model.py), the
loss (trainer/fused.py, trainer/loss.py), one optimizer step (trainer/steps.py),
where a run starts (trainer/resume.py), what it records (trainer/record.py).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pact.core import distributed, models
from pact.core.distributed import Ranks
from pact.core.errors import PactError
from pact.core.lm_head import check_head_matches_forward
from pact.core.outputs import check_output_dir
from pact.store.lock import run_writer
from pact.trainer import checkpoint
from pact.trainer.batches import epoch_batches
from pact.trainer.checkpoint import TrainerState
from pact.trainer.config import TrainConfig, default_run_id
from pact.trainer.fused import batch_loss
from pact.trainer.inputs import RunInputs, prepare_inputs
from pact.trainer.model import (
    autocast_factory,
    load_student,
    online_reference,
    output_dirs,
    safety_tensors,
    save_outputs,
)
from pact.trainer.record import RunFiles, metrics_row, peak_memory_mb, run_record
from pact.trainer.resume import check_checkpoint, deterministic, fresh_state, resume_point
from pact.trainer.steps import (
    Diverged,
    MicroBatches,
    advance,
    make_scheduler,
    micro_steps,
    optimizer_step,
)

__all__ = ["TrainConfig", "TrainResult", "batch_loss", "load_student", "train"]


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
class Trainee:
    """The model being trained and what updates it (built by `_load`)."""

    model: Any  # the model itself (saved and checkpointed); `micro.model` is its DDP / FSDP wrapper
    micro: MicroBatches
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    full_state: distributed.FullState | None  # FSDP: gathers the full weights and optimizer state
    global_micro: int  # examples per global micro-batch: --batch-size x ranks
    steps_per_epoch: int
    total_steps: int


@dataclass
class Run:
    """Where the run stands (`state`, updated by the loop) and where it writes."""

    files: RunFiles
    record: dict[str, Any]  # RUN/config.json
    state: TrainerState
    probe: Any  # the drift probe (--probe-every), or None


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.data`; see the module docstring and docs/training.md.

    Under torchrun (WORLD_SIZE > 1) every rank calls it: the process group is
    initialised here (gloo on CPU, nccl on CUDA) unless the caller did, the model is
    wrapped in DDP (or sharded with FSDP), and rank 0 writes; see docs/distributed.md.
    """
    with distributed.process_group(config.device) as ranks:
        # The recipe runs in a frame of its own: the DDP / FSDP model, which holds the
        # process group, is freed when it returns, before the group is destroyed
        # (docs/distributed.md, "Shutdown").
        return _recipe(config, ranks)


def _recipe(config: TrainConfig, ranks: Ranks) -> TrainResult:
    """The phases of the module docstring, in order, inside the process group."""
    with contextlib.ExitStack() as held:
        device = models.resolve_device(distributed.rank_device(config.device, ranks))
        resume_from = _setup(config, ranks, held)
        with deterministic(config.seed, device):
            inputs = prepare_inputs(config, ranks)
            trainee = _load(config, inputs, device, ranks)
            run = _start(config, inputs, trainee, resume_from, ranks)
            try:
                _loop(config, trainee, run, device, ranks)
            except Diverged as exc:
                raise run.files.stopped(str(exc), run.state.metrics) from None
            return _save(config, trainee, inputs.tokenizer, run)


def _setup(config: TrainConfig, ranks: Ranks, held: contextlib.ExitStack) -> Path | None:
    """Check the run directory (every rank agrees) and, on rank 0, hold its writer lock in
    `held`; returns the checkpoint --resume continues from (None: start at step 0)."""
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
        return resume_point(run_dir, config.resume)


def _load(config: TrainConfig, inputs: RunInputs, device: str, ranks: Ranks) -> Trainee:
    """The model being trained and, online, the reference; DDP (or FSDP) under torchrun;
    AdamW and the schedule over the optimizer steps of the whole run."""
    model = load_student(config, device)
    check_head_matches_forward(model, torch.as_tensor(inputs.encoded[0].input_ids, device=device)[None])
    autocast = autocast_factory(device)
    safety_ids, weights = safety_tensors(inputs.safety, model, device)
    online = online_reference(config, model, inputs.tokenizer, safety_ids, device, autocast)
    wrapped = distributed.wrap_model(model, ranks, device, fsdp=config.fsdp)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    global_micro = config.batch_size * ranks.world_size
    steps_per_epoch = math.ceil(math.ceil(len(inputs.encoded) / global_micro) / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, total_steps)
    full_state = distributed.FullState(model, optimizer) if config.fsdp else None
    micro = MicroBatches(
        config, inputs.encoded, inputs.tokenizer.pad_token_id, inputs.reader, online, wrapped,
        safety_ids, weights, autocast, device,
    )  # fmt: skip
    return Trainee(
        model, micro, params, optimizer, scheduler, full_state, global_micro, steps_per_epoch, total_steps
    )


def _start(
    config: TrainConfig, inputs: RunInputs, trainee: Trainee, resume_from: Path | None, ranks: Ranks
) -> Run:
    """The run record; the state of `resume_from` (exactly where it stopped) or step 0;
    RUN/config.json written (rank 0) and the drift probe started."""
    run_dir = Path(config.out)
    files = RunFiles(run_dir, inputs.store, config.run_id or default_run_id(run_dir))
    record = run_record(
        config, inputs, files.run_id, trainee.steps_per_epoch, trainee.total_steps, ranks.world_size
    )
    if resume_from is not None:
        check_checkpoint(record, resume_from)
        full_state = trainee.full_state
        state = checkpoint.load_checkpoint(
            resume_from, trainee.model, trainee.optimizer, trainee.scheduler,
            load_weights=full_state.load_weights if full_state else None,
            load_optimizer_state=full_state.load_optimizer_state if full_state else None,
        )  # fmt: skip
    else:
        state = fresh_state(record, run_dir, config.resume, config.seed)
    distributed.on_main(lambda: files.start(record))
    probe = inputs.probe if config.probe_every else None
    if probe is not None:
        probe.start(trainee.model, fresh=resume_from is None)
    return Run(files, record, state, probe)


def _loop(config: TrainConfig, trainee: Trainee, run: Run, device: str, ranks: Ranks) -> None:
    """Optimizer steps until `total_steps`: grad_accum micro-batches, clip, step, one
    metrics row, a checkpoint every --save-every (and at the last step)."""
    state, total_steps = run.state, trainee.total_steps
    started = time.perf_counter() - state.elapsed_s
    batches, batches_epoch = [], None
    with tqdm(
        total=total_steps, initial=state.step, desc=f"train {config.method}", unit="step",
        file=sys.stderr, disable=not ranks.is_main,
    ) as progress:  # fmt: skip
        while state.step < total_steps:
            if batches_epoch != state.epoch:
                batches = epoch_batches(len(trainee.micro.encoded), trainee.global_micro, config.seed, state.epoch)
                batches_epoch = state.epoch
            group = batches[state.batch_index : state.batch_index + config.grad_accum]
            step_started = time.perf_counter()

            totals = micro_steps(group, trainee.micro, state, ranks)
            grad_norm, lr = optimizer_step(
                trainee.params, trainee.optimizer, trainee.scheduler, config.max_grad_norm, state
            )
            epoch = advance(state, len(group), len(batches))

            now = time.perf_counter()
            state.elapsed_s = now - started
            row = metrics_row(
                totals.row(len(group), pact=config.method == "pact"), run_id=run.files.run_id,
                method=config.method, step=state.step, epoch=epoch, lr=lr, grad_norm=grad_norm,
                tokens_per_s=totals.tokens / max(now - step_started, 1e-9),
                peak_memory_mb=peak_memory_mb(device, ranks), time=state.elapsed_s,
            )  # fmt: skip
            if run.probe is not None and state.step % config.probe_every == 0:
                row["probe_kl"], row["probe_mass"] = run.probe.measure(trainee.micro.model)
            state.metrics.append(row)
            progress.set_postfix(
                {k: f"{row[k]:.4g}" for k in ("loss", "ce", "kl", "lr", "probe_kl") if row[k] is not None},
                refresh=False,
            )
            progress.update(1)
            if config.save_every and (state.step % config.save_every == 0 or state.step == total_steps):
                _save_checkpoint(trainee, run)


def _save_checkpoint(trainee: Trainee, run: Run) -> None:
    """RUN/checkpoints/step-N and the metrics so far (rank 0 writes; FSDP first gathers
    the full weights and optimizer state, a collective)."""
    full_state = trainee.full_state
    weights = full_state.weights() if full_state else None
    optimizer_state = full_state.optimizer_state() if full_state else None

    def write() -> None:
        checkpoint.save_checkpoint(
            run.files.run_dir, run.state, trainee.model, trainee.optimizer, trainee.scheduler,
            run.record, weights=weights, optimizer_state=optimizer_state,
        )  # fmt: skip
        run.files.write_metrics(run.state.metrics)

    distributed.on_main(write)


def _save(config: TrainConfig, trainee: Trainee, tokenizer: Any, run: Run) -> TrainResult:
    """RUN/model and / or RUN/adapter (rank 0) and the final metrics."""
    run_dir, state = run.files.run_dir, run.state
    state_dict = trainee.full_state.model_state() if trainee.full_state else None
    outputs = distributed.on_main(
        lambda: save_outputs(config, trainee.model, tokenizer, run_dir, state_dict=state_dict)
    )
    model_dir, adapter_dir = outputs if outputs is not None else output_dirs(config, run_dir)
    distributed.on_main(lambda: run.files.write_metrics(state.metrics))
    return TrainResult(run_dir, run.files.run_id, state.step, state.metrics, model_dir, adapter_dir)
