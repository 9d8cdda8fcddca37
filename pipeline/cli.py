"""The `pact` command line: parse options, call the library, print one clear line on error."""

from __future__ import annotations

import sys

import click

from pipeline.commands.data import data_command
from pipeline.commands.demo import demo_command
from pipeline.commands.eval import eval_command
from pipeline.commands.plot import plot_command
from pipeline.commands.precompute import precompute_command
from pipeline.commands.sql import sql_command
from pipeline.commands.tokens import tokens_command
from pipeline.commands.train import train_command
from store.errors import PactError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pact")
def cli() -> None:
    """pact: fine-tune aligned language models without losing their safety alignment (PACT).

    Stage 0 `pact tokens` finds the safety tokens, stage 1 `pact precompute` runs the
    aligned model once and caches its safety-token statistics in a store, stage 2
    `pact train` fine-tunes against that cache without the reference model in memory.
    `pact sql` queries the store with DuckDB.
    """


cli.add_command(data_command)
cli.add_command(sql_command)
cli.add_command(tokens_command)
cli.add_command(precompute_command)
cli.add_command(train_command)
cli.add_command(eval_command)
cli.add_command(plot_command)
cli.add_command(demo_command)


def main() -> None:
    """Console entry point: PactError -> `error: ...` on stderr, exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except PactError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
