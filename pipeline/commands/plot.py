"""`pact plot STORE --out PNG [--run RUN]`: a PNG of the store's evaluations."""

from __future__ import annotations

import click

from pact.core.outputs import check_output_file
from pact.pipeline.plot import plot_store


@click.command("plot")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str), help="PNG file to write.")
@click.option("--run", default=None, type=click.Path(file_okay=False, path_type=str), help="A `pact train` run directory: adds its CE and KL curves.")
def plot_command(store_dir: str, out: str, run: str | None) -> None:
    """Plot STORE's evals: per-step safety-token mass and drift KL (probe rows) per model,
    refusal / over-refusal / task accuracy bars, and with --run the run's training curves.

    The latest evaluation of each (model, dataset, metric) is drawn.
    """
    check_output_file(out, {"the store": store_dir, "the run directory": run})
    path = plot_store(store_dir, out, run)
    click.echo(f"wrote {path}")
