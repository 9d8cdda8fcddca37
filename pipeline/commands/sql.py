"""`pact sql STORE "SELECT ..." [--attach NAME=STORE ...]`: read-only DuckDB queries over
a store, and over other stores attached as schemas."""

from __future__ import annotations

import csv
import io
import json
import math

import click

from pact.core.errors import PactError
from pact.core.text import display_width, escape_control, pad
from pact.store.manifest import Store
from pact.store.sql import check_attachments, query


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + "]"
    return str(value)


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """A plain aligned text table: one line per row (control characters escaped),
    columns aligned by display width (pact/core/text.py)."""
    heads = [escape_control(c) for c in columns]
    cells = [[escape_control(_cell(v)) for v in row] for row in rows]
    widths = [max([display_width(c)] + [display_width(r[i]) for r in cells]) for i, c in enumerate(heads)]
    lines = [" | ".join(pad(c, w) for c, w in zip(heads, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(pad(v, w) for v, w in zip(r, widths, strict=True)) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _json_value(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _attachments(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, Store]]:
    """`--attach NAME=STORE` values as checked (name, Store) pairs."""
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value[:60]!r} is not NAME=STORE", ctx, param)
        pairs.append((name, Store(path)))
    try:
        return check_attachments(pairs)
    except PactError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.command("sql")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False, path_type=str))
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option(
    "--attach", "attach", metavar="NAME=STORE", multiple=True, callback=_attachments,
    help="Also read another store; its views become NAME.targets, NAME.confidences, ... "
    "NAME: letters, digits and _ (not main, memory, temp, system, a view name or an SQL keyword). Repeatable.",
)
@click.option(
    "--timeout", "timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Stop the query after SECONDS (exit code 2). Ctrl-C stops it at any time (exit code 130).",
)
def sql_command(store_dir: str, sql: str, fmt: str, attach: list[tuple[str, Store]], timeout: float | None) -> None:
    """Run a read-only SQL query against STORE (and the stores given with --attach).

    Views: safety_tokens, targets, post_targets, confidences (example_id, step,
    context 'full'|'post', token_id, token, logprob, prob), metrics, evals.
    Only SELECT statements run (EXPLAIN ANALYZE would execute its statement, so it is refused too); the stores cannot be changed.

    \b
    Per-example drift between stores A and B (join per step, then unnest; fast):
      pact sql A --attach run_b=B "WITH pairs AS (SELECT a.example_id,
        unnest(a.full_logprobs) AS la, unnest(b.full_logprobs) AS lb
        FROM targets a JOIN run_b.targets b USING (example_id, step))
        SELECT example_id, avg(abs(exp(lb) - exp(la))) AS drift FROM pairs
        GROUP BY example_id ORDER BY drift DESC LIMIT 10"
    Both stores must hold the same safety-token set (see docs/store.md).
    """
    columns, rows = query(Store(store_dir), sql, attach, timeout=timeout)
    if fmt == "table":
        click.echo(format_table(columns, rows))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        click.echo(buffer.getvalue(), nl=False)
    else:
        records = [{c: _json_value(v) for c, v in zip(columns, row, strict=True)} for row in rows]
        click.echo(json.dumps(records, indent=1))
