"""DuckDB views over a store, and a read-only query runner.

Views: `safety_tokens`, `targets`, `post_targets`, `confidences` (long form:
example_id, step, context 'full'|'post', token_id, token, logprob, prob),
`metrics`, `evals`. Only parts registered in the manifest are visible.
Other stores can be attached under a name: their views live in a schema of that
name (`b.targets`), on the same locked-down connection.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import duckdb

from pact.core.errors import PactError
from pact.core.text import message_line, one_line
from pact.store.manifest import Store, repair_advice
from pact.store.safety import TOKENS_FILE, TOKENS_SCHEMA, check_tokens_table
from pact.store.tables import EVALS_SCHEMA, METRICS_SCHEMA, table_files
from pact.store.targets import check_part_schema, post_schema, targets_schema

ALLOWED_STATEMENTS = {"SELECT"}
VIEWS = ("safety_tokens", "targets", "post_targets", "metrics", "evals", "confidences")
# Catalogs and schemas DuckDB already has (`temp` and `system` are both).
TAKEN_NAMES = {"main", "memory", "temp", "system", "pg_catalog", "information_schema"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _duck_type(arrow_type: Any) -> str:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(arrow_type):
        return f"FLOAT[{arrow_type.list_size}]"
    return {
        "string": "VARCHAR",
        "int32": "INTEGER",
        "int64": "BIGINT",
        "float": "FLOAT",
        "halffloat": "FLOAT",
        "double": "DOUBLE",
    }[str(arrow_type)]


def _empty_view(schema: Any) -> str:
    columns = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in schema)
    return f"SELECT {columns} WHERE false"


def literal_path(path: str) -> str:
    """`path` as DuckDB reads it literally: its glob characters `*`, `?`, `[` each in a
    one-character class (`[*]`), so a store named `q?x` never reads `qYx`."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _files_view(paths: list[str], schema: Any) -> str:
    if not paths:
        return _empty_view(schema)
    listing = ", ".join(_quote(literal_path(p)) for p in paths)
    return f"SELECT * FROM read_parquet([{listing}], union_by_name = true)"


def create_views(con: duckdb.DuckDBPyConnection, store: Store, schema: str = "main") -> None:
    """Create the store's views in `schema` of `con` (any connection, in-memory is fine).

    `schema` must exist and be a plain identifier (see `check_attach_name`); `confidences`
    reads the views of its own schema.
    """
    manifest = store.require()
    num_safety = (manifest.get("safety_tokens") or {}).get("count", 1)
    root = store.root.resolve()
    tokens = root / TOKENS_FILE
    if manifest.get("safety_tokens") is not None:  # first: it tells a wrong count
        check_tokens_table(store, manifest["safety_tokens"])
    parts = {"targets": [], "post": []}
    for entry in manifest["parts"]:
        path = store.resolve(entry["path"])
        if not path.is_file():
            raise PactError(
                f"store part {entry['path']} is listed in the manifest but missing; {repair_advice(store.root)}"
            )
        check_part_schema(path, entry["kind"], (manifest.get("safety_tokens") or {}).get("count"), store.root)
        parts[entry["kind"]].append(str(path))
    tables = {}
    for kind in ("metrics", "evals"):
        files, problems = table_files(root, kind)
        for _, problem in problems:
            print(f"warning: {message_line(problem)}; left out of the {kind} view", file=sys.stderr, flush=True)
        tables[kind] = [str(p) for p in files]
    views = {
        "safety_tokens": _files_view([str(tokens)] if tokens.is_file() else [], TOKENS_SCHEMA),
        "targets": _files_view(parts["targets"], targets_schema(num_safety)),
        "post_targets": _files_view(parts["post"], post_schema(num_safety)),
        "metrics": _files_view(tables["metrics"], METRICS_SCHEMA),
        "evals": _files_view(tables["evals"], EVALS_SCHEMA),
    }
    for name, query in views.items():
        con.execute(f"CREATE OR REPLACE VIEW {schema}.{name} AS {query}")
    con.execute(
        f"""
        CREATE OR REPLACE VIEW {schema}.confidences AS
        SELECT t.example_id, t.step, 'full' AS context, s.token_id, s.token,
               CAST(t.full_logprobs[s.idx + 1] AS DOUBLE) AS logprob,
               exp(CAST(t.full_logprobs[s.idx + 1] AS DOUBLE)) AS prob
        FROM {schema}.targets t CROSS JOIN {schema}.safety_tokens s
        UNION ALL
        SELECT t.example_id, t.step, 'post' AS context, s.token_id, s.token,
               CAST(p.post_logprobs[s.idx + 1] AS DOUBLE) AS logprob,
               exp(CAST(p.post_logprobs[s.idx + 1] AS DOUBLE)) AS prob
        FROM {schema}.targets t
        JOIN (SELECT DISTINCT ON (response_hash, step) * FROM {schema}.post_targets) p
          ON p.response_hash = t.response_hash AND p.step = t.step
        CROSS JOIN {schema}.safety_tokens s
        """
    )


@functools.cache
def _keywords() -> frozenset[str]:
    """DuckDB keywords that cannot name a schema written without quotes (all but the
    unreserved ones)."""
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute("SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category <> 'unreserved'").fetchall()
    finally:
        con.close()
    return frozenset(row[0].lower() for row in rows)


def check_attach_name(name: str) -> str:
    """`name` if it can name an attached store's schema; PactError saying why not.

    A plain SQL identifier (letters, digits, `_`, not starting with a digit), usable
    without quotes: not a DuckDB keyword, not a catalog or schema DuckDB has already
    (`main`, `memory`, `temp`, `system`, ...), not one of the view names.
    """
    if not _IDENTIFIER.fullmatch(name):
        raise PactError(
            f"attach name {name[:40]!r} is not a plain SQL identifier (letters, digits and _, not starting with a digit)"
        )
    lowered = name.lower()
    if lowered in TAKEN_NAMES:
        raise PactError(f"attach name {name!r} is taken by DuckDB (as are {', '.join(sorted(TAKEN_NAMES))}); choose another name")
    if lowered in VIEWS:
        raise PactError(f"attach name {name!r} is a view name; choose another name")
    if lowered in _keywords():
        raise PactError(f"attach name {name!r} is an SQL keyword; choose another name")
    return name


def check_attachments(attach: Iterable[tuple[str, Store]]) -> list[tuple[str, Store]]:
    """The (name, store) pairs with every name checked and no name twice (DuckDB names
    ignore case); PactError otherwise. The stores are not opened here."""
    pairs = list(attach)
    seen: dict[str, str] = {}
    for name, _ in pairs:
        check_attach_name(name)
        if name.lower() in seen:
            first = seen[name.lower()]
            also = "" if first == name else f" (as {first!r} too; SQL names ignore case)"
            raise PactError(f"attach name {name!r} is given twice{also}")
        seen[name.lower()] = name
    return pairs


def connect_readonly(store: Store, attach: Iterable[tuple[str, Store]] = ()) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views, able to read only the stores.

    The views of each attached (name, store) are created in a schema `name`
    (`name.targets`, ...). External access is limited to the store directories,
    extensions cannot be installed or loaded, and the configuration is locked.
    """
    pairs = check_attachments(attach)
    con = duckdb.connect(":memory:")
    try:
        create_views(con, store)
        for name, other in pairs:
            con.execute(f"CREATE SCHEMA {name}")
            try:
                create_views(con, other, schema=name)
            except PactError as exc:
                raise PactError(f"attached store {name}: {exc}") from None
        roots = [store.root.resolve()] + [other.root.resolve() for _, other in pairs]
        # DuckDB checks a file name as given (our views give it glob-escaped) and as found.
        folders = {form for root in roots for form in (str(root).rstrip("/") + "/", literal_path(str(root).rstrip("/") + "/"))}
        allowed = ", ".join(_quote(folder) for folder in sorted(folders))
        con.execute("SET temp_directory = ''")
        con.execute("SET enable_progress_bar = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute(f"SET allowed_directories = [{allowed}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list[Any]:
    """The parsed statements of `sql`; PactError unless every one is a SELECT.

    EXPLAIN is refused too: EXPLAIN ANALYZE executes the statement it explains.
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise PactError(f"SQL error: {one_line(str(exc), 500)}") from None
    if not statements:
        raise PactError("no SQL statement given")
    for statement in statements:
        kind = statement.type.name
        if kind not in ALLOWED_STATEMENTS:
            raise PactError(f"pact sql is read-only: {kind} statements are not allowed (only SELECT)")
    return statements


class QueryTimeout(PactError):
    """The query ran past its time limit and was stopped."""


def run_interruptible(con: duckdb.DuckDBPyConnection, work: Callable[[], Any], timeout: float | None = None) -> Any:
    """`work()` (DuckDB calls on `con`) in a worker thread; stopped with `con.interrupt()` on
    Ctrl-C (KeyboardInterrupt re-raised) or after `timeout` seconds (QueryTimeout).

    DuckDB blocks inside `execute` without looking at Python's signals, so the main thread
    only waits, in steps of 0.1 s, and interrupts the connection when told to stop. It
    waits on an Event, not `Thread.join`: a join cut short by Ctrl-C marks a running thread
    as finished (CPython 3.11).
    """
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    deadline = None if timeout is None else time.monotonic() + timeout
    threading.Thread(target=target, name="pact-sql", daemon=True).start()
    try:
        while not done.is_set():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                _stop(con, done)
                raise QueryTimeout(f"the query ran past --timeout {timeout:g} s and was stopped")
            done.wait(left)
    except KeyboardInterrupt:
        _stop(con, done)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _stop(con: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
    """Interrupt the running query, again every 0.1 s (a query that had not started when
    first told, as under load, misses one interrupt), for up to 2 s while its thread unwinds."""
    stop_by = time.monotonic() + 2.0
    while True:
        con.interrupt()
        if done.wait(0.1) or time.monotonic() >= stop_by:
            return


def query(
    store: Store, sql: str, attach: Iterable[tuple[str, Store]] = (), *, timeout: float | None = None
) -> tuple[list[str], list[tuple]]:
    """Run read-only `sql` against the store (and the attached (name, store) pairs, as
    schemas `name`); return (column names, rows).

    Ctrl-C (KeyboardInterrupt) stops the query at once and is re-raised; a query still
    running after `timeout` seconds is stopped with QueryTimeout (a PactError).
    """
    if timeout is not None and not timeout > 0:
        raise PactError(f"--timeout must be a positive number of seconds, got {timeout}")
    store.require()
    con = None
    try:
        con = connect_readonly(store, attach)
        statements = check_read_only(con, sql)

        def run() -> tuple[list[str], list[tuple]]:
            result = None
            for statement in statements:
                result = con.execute(statement)
            columns = [d[0] for d in result.description] if result.description else []
            return columns, result.fetchall()

        return run_interruptible(con, run, timeout)
    except duckdb.Error as exc:
        raise PactError(f"SQL error: {one_line(str(exc), 500)}") from None
    finally:
        if con is not None:
            with contextlib.suppress(duckdb.Error):  # busy: a query that would not stop
                con.close()
