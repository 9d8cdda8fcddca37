"""`pact train`: fine-tune with PACT (or plain / constrained SFT) against a store's cached targets."""

from __future__ import annotations

import click

from pact.core import distributed
from pact.core.data import FORMATS
from pact.core.lm_head import DEFAULT_HEAD_CHUNK_LOGITS
from pact.pipeline.training import run_train
from pact.store.targets import DEFAULT_MEMORY_BUDGET_MB
from pact.trainer.loss import PactConfig
from pact.trainer.train import (
    DEFAULT_LORA_TARGETS,
    FINETUNE_MODES,
    METHODS,
    REFERENCE_MODES,
    SCHEDULES,
    TrainConfig,
    pact_config,
)

_PACT = PactConfig()


@click.command("train")
@click.option(
    "--model",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Local model directory to fine-tune; it is also the reference.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Training data: JSON, JSONL or Parquet.",
)
@click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="pact store with the safety set and targets (optional for --method sft).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=str),
    help="Run directory (model/adapter, checkpoints, metrics).",
)
@click.option("--method", type=click.Choice(METHODS), default="pact", show_default=True)
@click.option(
    "--reference",
    type=click.Choice(REFERENCE_MODES),
    default="cached",
    show_default=True,
    help="Reference statistics from the store, or computed on the fly.",
)
@click.option(
    "--lambda",
    "kl_weight",
    type=float,
    default=1.0,
    show_default=True,
    help="Weight λ of the PACT KL (--method pact).",
)
@click.option(
    "--format",
    "data_format",
    type=click.Choice(FORMATS),
    default=None,
    help="Row shape of --data; detected when omitted.",
)
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Tokens per example; default: the store's, else 1024.",
)
@click.option("--finetune", type=click.Choice(FINETUNE_MODES), default="lora", show_default=True)
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option(
    "--lora-targets",
    default=",".join(DEFAULT_LORA_TARGETS),
    show_default=True,
    help="Comma-separated module names that get adapters.",
)
@click.option("--merge", is_flag=True, help="LoRA: also write the merged model to RUN/model.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps; overrides --epochs.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option(
    "--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True)
@click.option(
    "--max-grad-norm",
    type=float,
    default=1.0,
    show_default=True,
    help="Gradient clipping; 0 disables it.",
)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations in backward to save memory.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--save-every",
    type=int,
    default=500,
    show_default=True,
    help="Checkpoint every N optimizer steps (and at the end); 0 = never.",
)
@click.option(
    "--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out."
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N (under torchrun auto or cuda: cuda:LOCAL_RANK; another index is refused).",
)
@click.option(
    "--targets-memory-mb",
    type=float,
    default=DEFAULT_MEMORY_BUDGET_MB,
    show_default=True,
    help="Memory for target row groups read from the store (an LRU cache; targets stream from disk).",
)
@click.option(
    "--head-chunk-logits",
    type=int,
    default=DEFAULT_HEAD_CHUNK_LOGITS,
    show_default=True,
    help="Logits per LM-head chunk (rows x vocabulary): bounds the head's memory; results do not change.",
)
@click.option(
    "--fsdp",
    is_flag=True,
    help="Under torchrun: shard the model with FSDP instead of replicating it with DDP (full fine-tuning).",
)
@click.option(
    "--probe",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Safety set (prompt, refusal) for the drift probe; cached reference from the store.",
)
@click.option(
    "--probe-every",
    type=int,
    default=0,
    show_default=True,
    help="Run the drift probe every N optimizer steps (metrics probe_kl, probe_mass); 0 = never.",
)
@click.option(
    "--run-id",
    default=None,
    help="Name of the run in the store's metrics table; default: the --out folder name.",
)
@click.option(
    "--top-p", type=float, default=_PACT.top_p, show_default=True, help="Gate: top-p mass p."
)
@click.option(
    "--gate-alpha",
    type=float,
    default=_PACT.alpha,
    show_default=True,
    help="Gate: sigmoid slope α.",
)
@click.option(
    "--gate-bias", type=float, default=_PACT.bias, show_default=True, help="Gate: bias b."
)
@click.option(
    "--gate-temperature",
    type=float,
    default=_PACT.gate_temperature,
    show_default=True,
    help="Gate: softmax temperature T_g.",
)
@click.option(
    "--gate-prefix",
    type=int,
    default=_PACT.prefix_n,
    show_default=True,
    help="Gate: steps N before the decay.",
)
@click.option(
    "--gate-decay",
    type=float,
    default=_PACT.decay_tau,
    show_default=True,
    help="Gate: decay τ_d (<= 0: hard cut at N).",
)
@click.option(
    "--gate-boost", type=float, default=_PACT.boost, show_default=True, help="Gate: boost β."
)
@click.option(
    "--kl-temperature",
    type=float,
    default=_PACT.temperature,
    show_default=True,
    help="KL temperature T.",
)
def train_command(
    model: str,
    data: str,
    store_dir: str | None,
    out: str,
    lora_targets: str,
    top_p: float,
    gate_alpha: float,
    gate_bias: float,
    gate_temperature: float,
    gate_prefix: int,
    gate_decay: float,
    gate_boost: float,
    kl_temperature: float,
    **options: object,
) -> None:
    """Fine-tune --model on --data with the PACT loss (CE + λ·KL on the safety tokens),
    reading the reference's statistics from --store: the reference is never loaded.

    Under torchrun (`torchrun --nproc_per_node N -m pact train ...`) it runs DDP
    (or FSDP with --fsdp); --batch-size is per rank: one optimizer step sees
    batch-size x ranks x grad-accum examples (docs/distributed.md).

    Writes RUN/adapter (LoRA; with --merge also RUN/model) or RUN/model (full),
    RUN/config.json, RUN/metrics.parquet and the store's `metrics` table.
    """
    config = TrainConfig(
        model=model,
        data=data,
        out=out,
        store=store_dir,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
        pact=pact_config(
            top_p=top_p,
            alpha=gate_alpha,
            bias=gate_bias,
            gate_temperature=gate_temperature,
            prefix_n=gate_prefix,
            decay_tau=gate_decay,
            boost=gate_boost,
            temperature=kl_temperature,
        ),
        **options,
    )
    result = run_train(config)
    if not distributed.launch_ranks().is_main:
        return
    click.echo(f"run: {result.run_dir} (run_id {result.run_id})")
    if result.metrics:
        last = result.metrics[-1]
        parts = [f"{k} {last[k]:.4f}" for k in ("loss", "ce", "kl") if last[k] is not None]
        click.echo(f"steps: {result.steps}, last step " + ", ".join(parts))
    for label, path in (("adapter", result.adapter_dir), ("model", result.model_dir)):
        if path is not None:
            click.echo(f"{label}: {path}")
    click.echo(
        f"metrics: {result.run_dir / 'metrics.parquet'}"
        + (" and the store's metrics table" if store_dir else "")
    )
