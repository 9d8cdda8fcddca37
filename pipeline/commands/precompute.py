"""`pact precompute`: the reference pass (stage 1) into the store."""

from __future__ import annotations

import os

import click

from pact.core import distributed
from pact.core.config import cli_options
from pact.core.errors import PactError
from pact.pipeline.precompute import PrecomputeOptions, run_precompute, torchrun_defaults
from pact.store.lock import waiting_for_writers


@click.command("precompute")
@click.option("--reference", required=True, type=click.Path(path_type=str),
              help="Aligned (reference) model directory: safetensors weights + tokenizer.")
@click.option("--data", required=True, type=click.Path(path_type=str), help="Fine-tuning set (JSON, JSONL or Parquet).")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Store directory (holds the safety tokens from `pact tokens`).")
@cli_options(PrecomputeOptions)
@click.option("--shard", default=None,
              help="Compute shard i of N (i/N): examples with sha256(example_id) % N == i, for machines started "
              "without torchrun. Default 0/1; under torchrun each rank computes RANK/WORLD_SIZE.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--wait", is_flag=True, help="If another pact process is writing this shard of --store, wait for it instead of stopping.")
def precompute_command(
    reference: str, data: str, store_dir: str, shard: str | None, no_progress: bool, wait: bool, device: str,
    **options: object,
) -> None:
    """Run the reference model once over --data and cache its safety-token targets in --store.

    Resumable: examples already stored with the same token hash are skipped, so a rerun
    after a crash computes only what is missing; a rerun also recomputes stored targets
    holding NaN or inf (the repair when `pact train` refuses them). Shards (--shard i/N) may run at the same
    time into one store. Under torchrun every rank computes its shard; rank 0 prints the
    summary once every rank's examples are stored (docs/distributed.md).
    """
    ranks = distributed.launch_ranks(os.environ)
    if shard is not None and ranks.enabled:
        raise PactError(
            f"--shard {shard} under torchrun (WORLD_SIZE={ranks.world_size}): each rank already "
            "computes shard RANK/WORLD_SIZE; drop --shard, or run without torchrun"
        )
    shard_of_run, rank_device = torchrun_defaults(shard, device, os.environ)
    with distributed.process_group(device) as ranks:
        options = PrecomputeOptions(
            device=rank_device, shard=shard_of_run, progress=not no_progress and ranks.is_main, **options
        )
        with waiting_for_writers(wait):
            summary = run_precompute(reference, data, store_dir, options, echo=lambda m: click.echo(m, err=True))
        if ranks.is_main:
            click.echo(summary.line())
