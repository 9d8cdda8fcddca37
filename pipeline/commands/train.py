"""`pact train`: fine-tune with PACT (or plain / constrained SFT) against a store's cached targets."""

from __future__ import annotations

import click

from pact.core import distributed
from pact.core.config import cli_options, take
from pact.store.lock import waiting_for_writers
from pact.trainer.config import TrainConfig
from pact.trainer.loss import PactConfig
from pact.trainer.train import train


@click.command("train")
@cli_options(TrainConfig)
@cli_options(PactConfig)
@click.option("--wait", is_flag=True, help="If another pact train is writing --out, wait for it instead of stopping.")
def train_command(wait: bool, **options: object) -> None:
    """Fine-tune --model on --data with the PACT loss (CE + λ·KL on the safety tokens),
    reading the reference's statistics from --store: the reference is never loaded.

    Under torchrun (`torchrun --nproc_per_node N -m pact train ...`) it runs DDP
    (or FSDP with --fsdp); --batch-size is per rank: one optimizer step sees
    batch-size x ranks x grad-accum examples (docs/distributed.md).

    Writes RUN/adapter (LoRA; with --merge also RUN/model) or RUN/model (full),
    RUN/config.json, RUN/metrics.parquet and the store's `metrics` table.
    """
    config = TrainConfig(pact=PactConfig(**take(PactConfig, options)), **options)
    with waiting_for_writers(wait):
        result = train(config)
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
        + (" and the store's metrics table" if config.store else "")
    )
