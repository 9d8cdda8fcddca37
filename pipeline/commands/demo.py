"""`pact demo`: the whole story on the embedded tiny models, on a laptop CPU."""

from __future__ import annotations

import click

from pact.pipeline.demo.run import DemoSettings, check_results, format_results, run_demo


@click.command("demo")
@click.option("--out", "out_dir", default="pact-demo", show_default=True, type=click.Path(file_okay=False, path_type=str), help="New directory for the store, runs, results.json and the PNG.")
@click.option("--quick", is_flag=True, help="Fewer epochs and evaluation rows (a smoke run; the numbers are not the demo's).")
def demo_command(out_dir: str, quick: bool) -> None:
    """Run tokens -> precompute -> train SFT / constrained-SFT / PACT -> eval -> plot on the
    embedded tiny models and data, print the table and two SQL queries, write
    OUT/results.json and OUT/pact-demo.png."""
    settings = DemoSettings(epochs=1, eval_limit=24, probe_examples=16, max_safety_examples=64) if quick else DemoSettings()
    results = run_demo(out_dir, settings, echo=lambda line: click.echo(line, err=True))
    click.echo(format_results(results))
    failures = check_results(results)
    if quick:
        click.echo("(quick run: the demo's claims are not checked)")
    elif failures:
        click.echo("claims that did not hold this run: " + "; ".join(failures))
    else:
        click.echo("all demo claims held (see docs/demo.md)")
    click.echo(f"results: {out_dir}/results.json, plot: {out_dir}/{results['plot']}, {results['seconds']:.0f} s")
