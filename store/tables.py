"""Run metrics and evaluation results: small Parquet tables beside the targets.

`metrics/<run_id>.parquet` (one row per optimizer step of a training run) and
`evals/<eval_id>.parquet` (one row per metric of an evaluation) are written
atomically; the DuckDB views `metrics` and `evals` read every file of each folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pact.core.atomic import atomic_write_with
from pact.core.errors import PactError
from pact.store.manifest import Store

METRICS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("method", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("loss", pa.float64()),
        ("ce", pa.float64()),
        ("kl", pa.float64()),
        ("gate_mean", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("peak_memory_mb", pa.float64()),
        ("time", pa.float64()),
        ("probe_kl", pa.float64()),  # `pact train --probe-every`: mean drift KL, NULL between probes
        ("probe_mass", pa.float64()),  # ... and mean safety-token mass
    ]
)
OPTIONAL_COLUMNS = {"probe_kl", "probe_mass"}

EVALS_SCHEMA = pa.schema(
    [
        ("eval_id", pa.string()),
        ("model", pa.string()),
        ("model_fingerprint", pa.string()),
        ("dataset", pa.string()),
        ("metric", pa.string()),
        ("step", pa.int64()),
        ("value", pa.float64()),
        ("n", pa.int64()),
        ("time", pa.float64()),
    ]
)

SCHEMAS = {"metrics": METRICS_SCHEMA, "evals": EVALS_SCHEMA}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


def check_table_name(name: str, what: str = "table name") -> str:
    """`name` if it can name a `metrics`/`evals` file (`--run-id`, eval ids); PactError otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise PactError(f"{what} {name!r} must start with a letter or digit and hold only letters, digits, '.', '_' or '-' (at most 201)")
    return name


def write_table(store: Store, kind: str, name: str, table: pa.Table) -> str:
    """Write `table` as `<kind>/<name>.parquet` atomically (replacing an older one); return the path."""
    if kind not in SCHEMAS:
        raise PactError(f"unknown table kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    check_table_name(name)
    schema = SCHEMAS[kind]
    for column in sorted(OPTIONAL_COLUMNS & set(schema.names) - set(table.column_names)):
        table = table.append_column(column, pa.nulls(table.num_rows, schema.field(column).type))
    try:
        table = table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid) as exc:
        raise PactError(f"{kind} table does not match its schema: {exc}") from None
    relative = f"{kind}/{name}.parquet"
    atomic_write_with(store.root / relative, lambda p: pq.write_table(table, p))
    return relative


def check_table_file(path: Path, kind: str) -> None:
    """PactError unless `path` is a Parquet file whose columns include `kind`'s schema (the
    optional ones may be absent)."""
    schema = SCHEMAS[kind]
    try:
        names = set(pq.read_schema(path).names)
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise PactError(f"{path} is not a readable Parquet file ({reason}); {STRAY_ADVICE}") from None
    missing = [name for name in schema.names if name not in names and name not in OPTIONAL_COLUMNS]
    if missing:
        raise PactError(f"{path} is not a pact {kind} table (no column {missing[0]}); {STRAY_ADVICE}")


STRAY_ADVICE = "move it out of the store (pact writes only its own tables there)"


def table_files(root: Path, kind: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The `<kind>/*.parquet` files of the store at `root` that `check_table_file` accepts,
    sorted, and (path, message) for each other file (DuckDB would fail every query on it)."""
    files, problems = [], []
    for path in sorted((root / kind).glob("*.parquet")) if (root / kind).is_dir() else []:
        try:
            check_table_file(path, kind)
        except PactError as exc:
            problems.append((path, str(exc)))
            continue
        files.append(path)
    return files, problems
