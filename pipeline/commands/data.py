"""`pact data FILE`: validate a data file and describe it."""

from __future__ import annotations

import statistics

import click

from pact.core.data import FORMATS, load_examples
from pact.core.models import load_tokenizer
from pact.core.special_text import rows_with_special_text, special_text_warning


def _stats(values: list[int]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"min {ordered[0]}, median {statistics.median(ordered):g}, "
        f"mean {statistics.fmean(ordered):.1f}, p95 {p95}, max {ordered[-1]}"
    )


@click.command("data")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Row shape; detected from the first row when omitted.")
@click.option("--skip-invalid", is_flag=True, help="Drop bad rows and list them instead of failing on the first.")
@click.option("--prompts-only", is_flag=True, help="Rows need no response (evaluation prompts).")
@click.option("--ids", is_flag=True, help="Print every example_id, one per line.")
@click.option(
    "--tokenizer", "tokenizer_dir", default=None, type=click.Path(file_okay=False, path_type=str),
    help="Tokenizer or model directory: count the rows whose text holds its special-token strings "
    "(they encode as control tokens) and warn, naming the first rows.",
)
@click.option("--trust-remote-code", is_flag=True, help="Allow tokenizer code shipped with --tokenizer.")
def data_command(
    file: str, fmt: str | None, skip_invalid: bool, prompts_only: bool, ids: bool,
    tokenizer_dir: str | None, trust_remote_code: bool,
) -> None:  # fmt: skip
    """Validate FILE (JSON, JSONL or Parquet) and print its count, format and lengths.

    With --tokenizer, also count the rows whose text contains the tokenizer's
    special-token strings (a literal `<|im_end|>` in a message becomes the control
    token); `pact precompute` and `pact train` warn about them the same way.
    """
    result = load_examples(file, fmt, skip_invalid=skip_invalid, require_response=not prompts_only)
    examples = result.examples
    click.echo(f"file: {result.path}")
    click.echo(f"format: {result.format}")
    click.echo(f"examples: {len(examples)}")
    click.echo(f"distinct responses: {len({e.response for e in examples})}")
    click.echo(f"identical rows without id (kept, ids suffixed -N): {result.identical_without_id}")
    if result.repeated_with_id:
        click.echo(f"rows repeating an earlier id with the same content (dropped): {result.repeated_with_id}")
    if not prompts_only:
        click.echo("response chars: " + _stats([len(e.response) for e in examples]))
        click.echo("response words: " + _stats([len(e.response.split()) for e in examples]))
    click.echo("prompt chars: " + _stats([sum(len(m["content"]) for m in e.messages) for e in examples]))
    if result.invalid:
        click.echo(f"invalid rows skipped: {len(result.invalid)}")
        for bad in result.invalid:
            label = f" (id {bad.example_id})" if bad.example_id is not None else ""
            click.echo(f"  row {bad.row}{label}: {bad.reason}")
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
        found = rows_with_special_text(examples, tokenizer)
        click.echo(f"rows with special-token strings: {len(found)}")
        warning = special_text_warning(examples, tokenizer)
        if warning:
            click.echo(warning, err=True)
    if ids:
        click.echo("ids:")
        for example in examples:
            click.echo(example.example_id)
