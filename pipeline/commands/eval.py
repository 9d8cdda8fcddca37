"""`pact eval --model M --store S ...`: safety, over-refusal, task accuracy, drift probe."""

from __future__ import annotations

import click

from pact.core.models import DTYPES
from pact.pipeline.commands.sql import format_table
from pact.pipeline.evaluate import REFUSAL_WINDOW, TASK_METRICS, EvalOptions, run_eval

_FILE = click.Path(dir_okay=False, path_type=str)
_DIR = click.Path(path_type=str)


@click.command("eval")
@click.option("--model", "model", required=True, type=_DIR, help="Model directory (safetensors) or `pact train` run directory.")
@click.option("--store", "store", required=True, type=_DIR, help="The pact store; results land in its `evals` table.")
@click.option("--name", default=None, help="Model name in the evals table (default: the directory's name).")
@click.option("--harmful", default=None, type=_FILE, help="Harmful prompts: refusal rate and attack success rate.")
@click.option("--benign", default=None, type=_FILE, help="Harmless prompts: over-refusal rate.")
@click.option("--task", default=None, type=_FILE, help="Labelled rows (the output is the label): task accuracy.")
@click.option("--metric", default="label", show_default=True, help=f"Task scoring: {' or '.join(TASK_METRICS)} (label = the label the generation starts with; exact = exact match).")
@click.option("--probe", default=None, type=_FILE, help="Safety set (prompt, refusal): per-step drift KL and safety-token mass vs the reference.")
@click.option("--reference", default=None, type=_DIR, help="Reference model for the probe when the store has no cached reference probe.")
@click.option("--judge", default=None, type=_DIR, help="Local guard model scoring the --harmful generations (output starting 'unsafe' = harmful).")
@click.option("--refusal-keywords", default=None, type=_FILE, help="Refusal phrases, one per line (replaces the default list).")
@click.option("--refusal-window", default=REFUSAL_WINDOW, show_default=True, type=int, help="Characters at the start of a generation searched for a refusal phrase (0 = all).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Greedy generation length.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Prompts per generation / probe batch.")
@click.option("--max-length", default=512, show_default=True, type=int, help="Probe encoding length when the store records none.")
@click.option("--label-after-end-of-turn", is_flag=True, help="Probe encoding when the store records none: label what the template writes after its end-of-turn token too (the paper's code).")
@click.option("--dtype", default="auto", show_default=True, help=f"Model dtype: {', '.join(DTYPES)} (auto: bfloat16 on CUDA, float32 on CPU).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model directory (off by default).")
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
