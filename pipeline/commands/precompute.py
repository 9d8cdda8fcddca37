"""`pact precompute`: the reference pass (stage 1) into the store."""

from __future__ import annotations

import os

import click

from pact.core import distributed
from pact.core.data import FORMATS
from pact.core.errors import PactError
from pact.core.models import DTYPES
from pact.pipeline.precompute import PrecomputeOptions, run_precompute, torchrun_defaults
from pact.store.lock import waiting_for_writers
from pact.store.targets import VALUE_DTYPES


@click.command("precompute")
@click.option("--reference", "reference", required=True, type=click.Path(path_type=str), help="Aligned (reference) model directory: safetensors weights + tokenizer.")
@click.option("--data", "data", required=True, type=click.Path(path_type=str), help="Fine-tuning set (JSON, JSONL or Parquet).")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False, path_type=str), help="Store directory (holds the safety tokens from `pact tokens`).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Examples per forward pass (batches are length-bucketed).")
@click.option("--max-batch-tokens", default=None, type=int, help="Cap on rows x padded length per batch.")
@click.option("--max-length", default=1024, show_default=True, type=int, help="Max prompt + response tokens (the response tail is cut); must match training.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES), help="Compute dtype; auto = float32 on CPU, bfloat16 on CUDA.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:<index> (under torchrun auto or cuda: cuda:LOCAL_RANK; another index is refused).")
@click.option("--chunk-positions", default=256, show_default=True, type=int, help="Response positions per LM-head chunk (bounds the [chunk, vocab] logits in memory).")
@click.option("--shard", "shard", default=None, help="Compute shard i of N (i/N): examples with sha256(example_id) % N == i, for machines started without torchrun. Default 0/1; under torchrun each rank computes RANK/WORLD_SIZE.")
@click.option("--value-dtype", default="float32", show_default=True, type=click.Choice(list(VALUE_DTYPES)), help="Stored dtype of the safety-token log-probs.")
@click.option("--part-size", "part_size", default=256, show_default=True, type=int, help="Examples per Parquet part, rounded up to whole batches (a killed run loses at most one part of work).")
@click.option("--format", "data_format", default=None, type=click.Choice(FORMATS), help="Row shape of --data; detected when omitted.")
@click.option("--skip-invalid", is_flag=True, help="Drop invalid rows and examples whose prompt does not fit --max-length (reported) instead of failing.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the reference directory.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--wait", "wait", is_flag=True, help="If another pact process is writing this shard of --store, wait for it instead of stopping.")
def precompute_command(
    reference: str,
    data: str,
    store_dir: str,
    batch_size: int,
    max_batch_tokens: int | None,
    max_length: int,
    dtype: str,
    device: str,
    chunk_positions: int,
    shard: str | None,
    value_dtype: str,
    part_size: int,
    data_format: str | None,
    skip_invalid: bool,
    trust_remote_code: bool,
    no_progress: bool,
    wait: bool,
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
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            max_length=max_length,
            dtype=dtype,
            device=rank_device,
            chunk_positions=chunk_positions,
            shard=shard_of_run,
            value_dtype=value_dtype,
            examples_per_part=part_size,
            data_format=data_format,
            skip_invalid=skip_invalid,
            trust_remote_code=trust_remote_code,
            progress=not no_progress and ranks.is_main,
        )
        with waiting_for_writers(wait):
            summary = run_precompute(reference, data, store_dir, options, echo=lambda m: click.echo(m, err=True))
        if ranks.is_main:
            click.echo(summary.line())
