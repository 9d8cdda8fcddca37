"""The `pact` command line: parse options, call the library, print one clear line on error.

Commands are imported only when used, so `pact data` and `pact sql` start without
loading torch.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from pact.core.errors import PactError
from pact.core.text import message_line

COMMANDS = {
    "data": "pact.pipeline.commands.data:data_command",
    "tokens": "pact.pipeline.commands.tokens:tokens_command",
    "precompute": "pact.pipeline.commands.precompute:precompute_command",
    "train": "pact.pipeline.commands.train:train_command",
    "eval": "pact.pipeline.commands.eval:eval_command",
    "plot": "pact.pipeline.commands.plot:plot_command",
    "sql": "pact.pipeline.commands.sql:sql_command",
    "store": "pact.pipeline.commands.store:store_group",
    "demo": "pact.pipeline.commands.demo:demo_command",
}

# The commands that run as several processes under torchrun (docs/distributed.md); the
# others would run once per process, writing the same files or eval rows N times.
DISTRIBUTED_COMMANDS = ("precompute", "train")
ASKS_HELP = "pact.asks_help"  # ctx.meta key: the command line holds -h/--help


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ASKS_HELP] = any(arg in ctx.help_option_names for arg in args)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C: `aborted` alone (click would print a blank line first)
            raise click.exceptions.Abort() from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pact")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """pact: fine-tune aligned language models without losing their safety alignment (PACT).

    Stage 0 `pact tokens` finds the safety tokens, stage 1 `pact precompute` runs the
    aligned model once and caches its safety-token statistics in a store, stage 2
    `pact train` fine-tunes against that cache without the reference model in memory.
    `pact eval` measures refusals, over-refusal, task accuracy and drift; `pact sql`
    queries the store with DuckDB; `pact demo` runs the whole story on tiny models.
    """
    world = os.environ.get("WORLD_SIZE", "1").strip()
    asks_help = ctx.meta.get(ASKS_HELP, False)
    if ctx.invoked_subcommand not in (None, *DISTRIBUTED_COMMANDS) and world not in ("", "1") and not asks_help:
        raise PactError(
            f"pact {ctx.invoked_subcommand} runs in one process, not under torchrun (WORLD_SIZE={world}): "
            f"only {' and '.join(f'pact {name}' for name in DISTRIBUTED_COMMANDS)} run distributed"
        )


def main() -> None:
    """Console entry point: PactError, OSError and usage errors -> one `error: ...` line on
    stderr, exit code 2."""
    try:
        cli.main(standalone_mode=False, prog_name="pact")
    except PactError as exc:
        click.echo(f"error: {message_line(str(exc))}", err=True)
        sys.exit(2)
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        click.echo(f"error: {message_line(f'{exc.strerror or exc}{where}')}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("\naborted" if sys.stderr.isatty() else "aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `pact`: the help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        help_hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        message = " ".join(exc.format_message().split())
        click.echo(f"error: {message_line(message + help_hint)}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
