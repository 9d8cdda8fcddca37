"""`pact eval --model M --store S ...`: safety, over-refusal, task accuracy, drift probe."""

from __future__ import annotations

import click

from pact.core.config import cli_options
from pact.pipeline.commands.sql import format_table
from pact.pipeline.evaluate import EvalOptions, run_eval


@click.command("eval")
@cli_options(EvalOptions)
def eval_command(**kwargs: object) -> None:
    """Evaluate a model (or a `pact train` run) and record the metrics in the store.

    Give at least one of --harmful, --benign, --task, --probe. Rows go to
    STORE/evals/<eval_id>.parquet (query them with `pact sql STORE "select * from evals"`),
    generations to STORE/evals/<eval_id>.generations.jsonl.
    """
    report = run_eval(EvalOptions(**kwargs))
    scalar = [r for r in report.rows if r["step"] is None]
    table = [(r["metric"], r["dataset"], r["value"], r["n"]) for r in scalar]
    click.echo(f"eval {report.eval_id}: model {report.model} ({report.model_fingerprint})")
    click.echo(format_table(["metric", "dataset", "value", "n"], table))
    for note in report.notes:
        click.echo(note)
    click.echo(f"wrote {report.table_path}")
    if report.generations_path is not None:
        click.echo(f"wrote {report.generations_path}")
