"""`pact tokens`: stage 0, find the safety tokens and write them to a store."""

from __future__ import annotations

import click
import numpy as np

from pact.core.config import cli_options
from pact.core.errors import PactError
from pact.pipeline.commands.sql import format_table
from pact.pipeline.tokens import TokensOptions, TokensResult, run_tokens
from pact.store.lock import waiting_for_writers

TABLE_COLUMNS = ["rank", "token_id", "token", "aligned_prob", "base_prob", "score", "weight"]


def top_rows(result: TokensResult, show: int) -> list[tuple]:
    """Up to `show` tokens with weight > 0 (largest first), then up to `show` with weight 0
    (largest value first), as rows of TABLE_COLUMNS."""
    records = result.table.to_pylist()
    weighted = sorted((r for r in records if r["weight"] > 0), key=lambda r: -r["weight"])
    zero = sorted((r for r in records if r["weight"] <= 0), key=lambda r: -r["value"])
    chosen = weighted[:show] + zero[:show]
    return [
        (
            r["rank"],
            r["token_id"],
            repr(r["token"]),
            r["aligned_prob"],
            r["base_prob"],
            r["score"],
            r["weight"],
        )
        for r in chosen
    ]


def summary_line(result: TokensResult) -> str:
    """|S|, weight-0 count, examples used, seconds."""
    zero = int(np.count_nonzero(result.safety.weights == 0))
    parts = [
        f"safety tokens |S| = {result.safety.size} ({zero} with weight 0)",
        f"examples used: {result.direction.examples_used}",
    ]
    if result.generated_refusals:
        parts.append(f"refusals generated: {result.generated_refusals}")
    if result.skipped_without_refusal:
        parts.append(f"rows without refusal skipped: {result.skipped_without_refusal}")
    parts.append(f"{result.seconds:.1f}s")
    return ", ".join(parts)


@click.command("tokens")
@click.option("--aligned", "aligned_dir", required=True, type=click.Path(path_type=str),
              help="Aligned model directory (its tokenizer and chat template are used).")
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=str),
              help="Base (pre-alignment) model directory, same vocabulary.")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=str),
              help="Safety set: harmful prompts with refusals (JSON, JSONL or Parquet).")
@click.option("--store", "store_dir", required=True, type=click.Path(path_type=str),
              help="Store directory to write the safety tokens to (created when missing).")
@cli_options(TokensOptions)
@click.option("--wait", is_flag=True, help="If another pact process is writing --store, wait for it instead of stopping.")
@click.option("--show", default=20, show_default=True,
              help="Tokens printed per group (weight > 0, weight 0); 0 prints only the summary.")
def tokens_command(
    aligned_dir: str, base_dir: str, data_path: str, store_dir: str, wait: bool, show: int, **options: object
) -> None:
    """Stage 0: find the safety tokens of an aligned model against its base model.

    Scores every token by how much more probable the aligned model makes it than
    the base model while both read the refusals of --data, keeps the --top-k most
    probable, standardises and normalises their scores, and writes the safety set
    (safety_tokens.safetensors, tokens.parquet, manifest entry) to --store.
    """
    if show < 0:
        raise PactError(f"--show must be 0 or more, got {show}")
    options = TokensOptions(**options)
    with waiting_for_writers(wait):
        result = run_tokens(aligned_dir, base_dir, data_path, store_dir, options)
    if result.stale_parts:
        click.echo(
            f"warning: the store's {result.stale_parts} target parts were computed with the old "
            "safety set and are stale; rerun `pact precompute`",
            err=True,
        )
    if show > 0:
        click.echo(format_table(TABLE_COLUMNS, top_rows(result, show)))
    click.echo(summary_line(result))
