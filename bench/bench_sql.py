"""SQL benchmark: three typical queries over a store with >= 10 million `confidences` rows.

Two synthetic stores are written with the real writer (|S| = 50, response lengths
uniform in 1..64): run A, and run B over the same examples with its log-probs
perturbed (a second reference/fine-tuned model's pass). `confidences` holds one row
per example x step x token x context ('full', 'post'), so run A has >= `--rows` rows.

Queries (each timed end to end like `pact sql`: open the read-only connection, create
the views, run, fetch), in alternated rounds after one warm-up round:

- mean_prob_per_step: mean safety-token probability per response step and context.
- top_tokens_subset: the 10 safety tokens with the most mass in the full context over a
  quarter of the examples (ids starting with 0-3).
- drift_two_runs: per-example drift between run A and run B (mean and max |p_B - p_A|
  over steps and tokens, full context), written over the long `confidences` view (joins
  50 rows per step on each side). Run B is attached the way `pact sql A --attach run_b=B`
  does it (`store.sql.connect_readonly(A, [("run_b", B)])`), so its views are `run_b.*`.
- drift_two_runs_steps: the same numbers, joined per step on `targets` and unnested
  after the join (50x fewer rows through the join): the form docs/store.md recommends.
- scan (reference point): count and sum over every `confidences` row of run A.

Goal: median < 2 s per query. Run: python -m bench.bench_sql [--quick] [--out bench/results/sql.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import duckdb
from tqdm import tqdm

from bench import common
from pact.store.manifest import Store
from pact.store.sql import connect_readonly

GOAL_S = 2.0
RUN_B_SCHEMA = "run_b"

QUERIES = {
    "mean_prob_per_step": """
        SELECT context, step, avg(prob) AS mean_prob
        FROM confidences
        GROUP BY context, step
        ORDER BY context, step
    """,
    "top_tokens_subset": """
        SELECT token_id, token, sum(prob) AS mass
        FROM confidences
        WHERE context = 'full' AND example_id < '4'
        GROUP BY token_id, token
        ORDER BY mass DESC
        LIMIT 10
    """,
    "drift_two_runs": f"""
        SELECT a.example_id,
               avg(abs(b.prob - a.prob)) AS mean_abs_drift,
               max(abs(b.prob - a.prob)) AS max_abs_drift
        FROM confidences a
        JOIN {RUN_B_SCHEMA}.confidences b USING (example_id, step, context, token_id)
        WHERE a.context = 'full'
        GROUP BY a.example_id
        ORDER BY mean_abs_drift DESC
        LIMIT 20
    """,
    "drift_two_runs_steps": f"""
        WITH pairs AS (
            SELECT a.example_id, unnest(a.full_logprobs) AS logprob_a, unnest(b.full_logprobs) AS logprob_b
            FROM targets a
            JOIN {RUN_B_SCHEMA}.targets b USING (example_id, step)
        )
        SELECT example_id,
               avg(abs(exp(logprob_b) - exp(logprob_a))) AS mean_abs_drift,
               max(abs(exp(logprob_b) - exp(logprob_a))) AS max_abs_drift
        FROM pairs
        GROUP BY example_id
        ORDER BY mean_abs_drift DESC
        LIMIT 20
    """,
    "scan": "SELECT count(*) AS rows, sum(prob) AS total_prob FROM confidences",
}
TWO_STORE_QUERIES = {"drift_two_runs", "drift_two_runs_steps"}


def connect(name: str, run_a: Store, run_b: Store) -> duckdb.DuckDBPyConnection:
    """The read-only connection `pact sql` opens for query `name`: run A, plus run B as
    schema `run_b` (`pact sql A --attach run_b=B`) for the two-store queries."""
    attach = [(RUN_B_SCHEMA, run_b)] if name in TWO_STORE_QUERIES else []
    return connect_readonly(run_a, attach)


def run_query(name: str, run_a: Store, run_b: Store) -> list[tuple]:
    """Open the connection, run query `name`, fetch every row, close."""
    con = connect(name, run_a, run_b)
    try:
        return con.execute(QUERIES[name]).fetchall()
    finally:
        con.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser("bench_sql", __doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=common.positive_int, default=None, help="minimum confidences rows of run A (default 10000000)")
    parser.add_store_shape(max_steps=True)
    parser.add_argument("--profile", action="store_true", help="also store each query's EXPLAIN ANALYZE operator timings in the JSON")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = 20_000 if args.quick else 10_000_000
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    return args


def build_runs(args: argparse.Namespace, workdir: Path) -> tuple[Store, Store, dict[str, Any]]:
    """Run A (>= args.rows confidences rows) and run B (same examples, perturbed log-probs)."""
    min_steps = math.ceil(args.rows / (2 * args.num_safety))
    info: dict[str, Any] = {}
    for name, perturb in (("run_a", 0.0), ("run_b", 0.1)):
        with tqdm(desc=f"write {name}", unit="ex", file=sys.stderr, leave=False, mininterval=1.0) as bar:
            stats = common.synthetic_store(
                workdir / name, num_safety=args.num_safety, min_steps_total=min_steps,
                max_steps=args.max_steps, seed=args.seed, perturb=perturb, progress=bar.update,
            )
        info[name] = {
            "examples": stats.examples,
            "steps": stats.steps,
            "confidences_rows": 2 * args.num_safety * stats.steps,
            "bytes": stats.total_bytes,
            "perturb_sd": perturb,
        }
    return Store(workdir / "run_a"), Store(workdir / "run_b"), info


def profile(name: str, run_a: Store, run_b: Store) -> dict[str, Any]:
    """`EXPLAIN ANALYZE` of query `name`, flattened: wall and CPU seconds, then every
    operator (depth in the plan, name, rows out, CPU seconds summed over threads)."""
    con = connect(name, run_a, run_b)
    try:
        plan = json.loads(con.execute("EXPLAIN (ANALYZE, FORMAT json) " + QUERIES[name]).fetchall()[0][1])
    finally:
        con.close()
    operators: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        if node.get("type") not in ("RESULT_COLLECTOR", "EXPLAIN_ANALYZE"):
            operators.append(
                {"depth": depth, "operator": node.get("name"), "rows": node.get("intermediate_rows"),
                 "cpu_s": round(node.get("timing", 0.0), 4)}
            )
            depth += 1
        for child in node.get("children", []):
            walk(child, depth)

    for root in plan.get("operator", []):
        walk(root, 0)
    query = plan.get("query", {})
    return {"wall_s": query.get("total_time"), "cpu_s": query.get("cpu_time"), "operators": operators}


def query_memory(name: str, run_a: Store, run_b: Store) -> float:
    """Peak RSS (MiB) of a fresh process running query `name` once."""
    code = (
        "from bench.bench_sql import run_query\nfrom pact.store.manifest import Store\n"
        f"run_query({name!r}, Store({str(run_a.root)!r}), Store({str(run_b.root)!r}))\n"
    )
    return common.peak_rss_mb(code)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both runs, time every query; the JSON payload."""
    parameters = ("rows", "num_safety", "max_steps", "repeats", "seed")
    with common.bench_run(args, "sql", parameters=parameters) as (workdir, result):
        run_a, run_b, result["stores"] = build_runs(args, workdir)
        result["duckdb_threads"] = duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0]
        counted = run_query("scan", run_a, run_b)[0][0]
        if counted != result["stores"]["run_a"]["confidences_rows"]:
            raise RuntimeError(f"confidences has {counted} rows, expected {result['stores']['run_a']['confidences_rows']}")
        candidates = {name: (lambda name=name: run_query(name, run_a, run_b)) for name in QUERIES}
        common.alternate(candidates, 1)
        seconds = common.alternate(candidates, args.repeats)
        result["queries"] = {}
        for name, sql in QUERIES.items():
            timing = common.summarize(seconds[name])
            result["queries"][name] = {
                "sql": " ".join(sql.split()),
                **timing,
                "result_rows": len(run_query(name, run_a, run_b)),
                "peak_rss_mb": query_memory(name, run_a, run_b),
                "over_scan": timing["median_s"] / common.summarize(seconds["scan"])["median_s"],
                "goal_s": GOAL_S,
                "meets_goal": timing["median_s"] < GOAL_S,
            }
            if args.profile:
                result["queries"][name]["profile"] = profile(name, run_a, run_b)
    return result


def table(result: dict[str, Any]) -> str:
    rows = []
    for name, q in result["queries"].items():
        goal = "reference" if name == "scan" else ("met" if q["meets_goal"] else "MISSED")
        rows.append([name, common.fmt(q["median_s"]), common.fmt(q["max_s"]), f"{common.fmt(q['over_scan'])}x", f"{q['peak_rss_mb']:,.0f}", goal])
    return common.markdown_table(["query", "median s", "max s", "/ scan", "peak RSS MiB", f"goal < {GOAL_S:g} s"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    a = result["stores"]["run_a"]
    header = (f"run A: {a['examples']:,} examples, {a['steps']:,} steps, {a['confidences_rows']:,} confidences rows; "
              f"{result['parameters']['repeats']} alternated rounds after a warm-up\n")
    return common.finish("bench_sql", argv, args.out, result, header, table(result))


if __name__ == "__main__":
    sys.exit(main())
