"""`pact tokens`: stage 0, find the safety tokens and write them to a store."""

from __future__ import annotations

import click
import numpy as np

from pact.core.data import FORMATS
from pact.core.errors import PactError
from pact.core.models import DTYPES
from pact.pipeline.commands.sql import format_table
from pact.pipeline.tokens import DIFF_MODES, TokensOptions, TokensResult, run_tokens
from pact.store.lock import waiting_for_writers

_DEFAULTS = TokensOptions()
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
@click.option(
    "--aligned",
    "aligned_dir",
    required=True,
    type=click.Path(path_type=str),
    help="Aligned model directory (its tokenizer and chat template are used).",
)
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(path_type=str),
    help="Base (pre-alignment) model directory, same vocabulary.",
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=str),
    help="Safety set: harmful prompts with refusals (JSON, JSONL or Parquet).",
)
@click.option(
    "--store",
    "store_dir",
    required=True,
    type=click.Path(path_type=str),
    help="Store directory to write the safety tokens to (created when missing).",
)
@click.option(
    "--top-k",
    default=_DEFAULTS.top_k,
    show_default=True,
    help="Candidate tokens kept, ranked by mean aligned probability (at least 2).",
)
@click.option(
    "--max-examples",
    default=_DEFAULTS.max_examples,
    show_default=True,
    help="Use the first K examples with a non-empty refusal, in file order.",
)
@click.option(
    "--max-resp-len",
    default=_DEFAULTS.max_resp_len,
    show_default=True,
    help="Refusal tokens scored per example (R = min(length, this)).",
)
@click.option(
    "--temperature",
    default=_DEFAULTS.temperature,
    show_default=True,
    help="Softmax temperature tau applied to both models' logits.",
)
@click.option(
    "--diff-mode",
    type=click.Choice(DIFF_MODES),
    default=_DEFAULTS.diff_mode,
    show_default=True,
    help="Score: p_A - p_B, or p_A * (log p_B - log p_A).",
)
@click.option(
    "--batch-size",
    default=_DEFAULTS.batch_size,
    show_default=True,
    help="Examples per forward pass (results do not depend on it).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="Model weights dtype; auto = float32 on CPU, bfloat16 on CUDA. Softmax and sums are float32.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--format",
    "data_format",
    type=click.Choice(FORMATS),
    default=None,
    help="Row shape of --data; detected from the first row when omitted.",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow model/tokenizer code from the model directories.",
)
@click.option(
    "--generate-refusals",
    is_flag=True,
    help="Rows without a refusal get one written by the aligned model (greedy), saved as refusals.jsonl in the store.",
)
@click.option(
    "--max-new-tokens",
    default=64,
    show_default=True,
    help="Longest generated refusal (with --generate-refusals).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the safety set of a store that already holds targets (they go stale).",
)
@click.option(
    "--show",
    default=20,
    show_default=True,
    help="Tokens printed per group (weight > 0, weight 0); 0 prints only the summary.",
)
@click.option("--wait", "wait", is_flag=True, help="If another pact process is writing --store, wait for it instead of stopping.")
def tokens_command(
    aligned_dir: str,
    base_dir: str,
    data_path: str,
    store_dir: str,
    top_k: int,
    max_examples: int,
    max_resp_len: int,
    temperature: float,
    diff_mode: str,
    batch_size: int,
    dtype: str,
    device: str,
    data_format: str | None,
    trust_remote_code: bool,
    generate_refusals: bool,
    max_new_tokens: int,
    force: bool,
    show: int,
    wait: bool,
) -> None:
    """Stage 0: find the safety tokens of an aligned model against its base model.

    Scores every token by how much more probable the aligned model makes it than
    the base model while both read the refusals of --data, keeps the --top-k most
    probable, standardises and normalises their scores, and writes the safety set
    (safety_tokens.safetensors, tokens.parquet, manifest entry) to --store.
    """
    if show < 0:
        raise PactError(f"--show must be 0 or more, got {show}")
    options = TokensOptions(
        top_k=top_k,
        max_examples=max_examples,
        max_resp_len=max_resp_len,
        temperature=temperature,
        diff_mode=diff_mode,
        batch_size=batch_size,
    )
    with waiting_for_writers(wait):
        result = run_tokens(
            aligned_dir,
            base_dir,
            data_path,
            store_dir,
            options,
            data_format=data_format,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            generate_missing_refusals=generate_refusals,
            max_new_tokens=max_new_tokens,
            force=force,
        )
    if result.stale_parts:
        click.echo(
            f"warning: the store's {result.stale_parts} target parts were computed with the old "
            "safety set and are stale; rerun `pact precompute`",
            err=True,
        )
    if show > 0:
        click.echo(format_table(TABLE_COLUMNS, top_rows(result, show)))
    click.echo(summary_line(result))
