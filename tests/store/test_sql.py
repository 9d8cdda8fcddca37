"""`pact sql --attach NAME=STORE`: a second store's views as schema NAME (pact.store.sql.query's
`attach`), and its usage errors through the real entry point.

The write/escape attempts through an attached store are in test_security.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cli_helpers import run_pact
from paths import DOCS
from store_fixtures import S, fill, make_safety

from pact.core.errors import PactError
from pact.store import Store, TargetWriter
from pact.store.sql import check_attach_name, query

# Full-context safety-token probabilities per example and step (|S| = 3), chosen so the
# drift can be checked by hand. Run B differs from run A by:
#   e1 step 0: |0.4-0.5|, |0.4-0.3|, |0.2-0.2| = 0.1, 0.1, 0     step 1: equal -> 0, 0, 0
#   e2 step 0: |0.1-0.7|, |0.5-0.2|, |0.4-0.1| = 0.6, 0.3, 0.3
# so e1: mean 0.2/6 = 0.0333..., max 0.1; e2: mean 1.2/3 = 0.4, max 0.6.
RUN_A = {"e1": [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]], "e2": [[0.7, 0.2, 0.1]]}
RUN_B = {"e1": [[0.4, 0.4, 0.2], [0.6, 0.2, 0.2]], "e2": [[0.1, 0.5, 0.4]]}
EXPECTED = [("e2", pytest.approx(0.4), pytest.approx(0.6)), ("e1", pytest.approx(0.2 / 6), pytest.approx(0.1))]

FAST_DRIFT = """
    WITH pairs AS (
        SELECT a.example_id, unnest(a.full_logprobs) AS la, unnest(b.full_logprobs) AS lb
        FROM targets a JOIN {name}.targets b USING (example_id, step))
    SELECT example_id, avg(abs(exp(lb) - exp(la))) AS mean_drift, max(abs(exp(lb) - exp(la))) AS max_drift
    FROM pairs GROUP BY example_id ORDER BY mean_drift DESC
"""
LONG_DRIFT = """
    SELECT a.example_id, avg(abs(b.prob - a.prob)) AS mean_drift, max(abs(b.prob - a.prob)) AS max_drift
    FROM confidences a JOIN {name}.confidences b USING (example_id, step, context, token_id)
    WHERE a.context = 'full' GROUP BY a.example_id ORDER BY mean_drift DESC
"""


def write_run(store: Store, probs: dict[str, list[list[float]]]) -> None:
    make_safety(store)
    writer = TargetWriter(store, S)
    for example_id, rows in probs.items():
        logprobs = np.log(np.array(rows, dtype=np.float32))
        steps = len(rows)
        writer.add_post(f"r-{example_id}", logprobs)
        writer.add_example(
            example_id=example_id, token_hash=f"h-{example_id}", response_hash=f"r-{example_id}",
            token_ids=np.arange(steps), token_logprobs=np.zeros(steps, np.float32),
            entropy=np.ones(steps, np.float32), full_logprobs=logprobs,
        )
    writer.close()


@pytest.fixture
def two_runs(tmp_path) -> tuple[Store, Store]:
    run_a, run_b = Store(tmp_path / "run_a"), Store(tmp_path / "it's [b]")  # a quote and brackets in the path
    write_run(run_a, RUN_A)
    write_run(run_b, RUN_B)
    return run_a, run_b


@pytest.mark.parametrize("form", [FAST_DRIFT, LONG_DRIFT], ids=["per_step", "confidences"])
def test_drift_between_two_attached_stores_is_the_hand_checked_answer(two_runs, form):
    run_a, run_b = two_runs
    columns, rows = query(run_a, form.format(name="run_b"), [("run_b", run_b)])
    assert columns == ["example_id", "mean_drift", "max_drift"]
    assert rows == EXPECTED


def _doc_queries() -> list[str]:
    """The SQL of the 'Comparing two stores' section of docs/store.md, in order (the shell
    example's quoted query included)."""
    text = (DOCS / "store.md").read_text(encoding="utf-8")
    section = text.split("## Comparing two stores / per-example drift", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(sh|sql)\n(.*?)```", section, re.S)
    return [re.search(r'"(.*)"', body, re.S).group(1) if kind == "sh" else body for kind, body in blocks]


def test_the_documented_drift_queries_give_the_hand_checked_answers(two_runs):
    run_a, run_b = two_runs
    attach = [("ref_b", run_b)]
    per_example, same_set, per_token = _doc_queries()
    assert query(run_a, per_example, attach)[1] == EXPECTED
    assert query(run_a, same_set, attach)[1] == [(0,)]
    # mean of p_B - p_A per token over the 3 steps: a +(-0.1 + 0 - 0.6)/3, b +(0.1 + 0 + 0.3)/3, c +(0 + 0 + 0.3)/3
    columns, rows = query(run_a, per_token, attach)
    assert columns == ["token_id", "token", "mean_drift"]
    assert rows == [(3, "a", pytest.approx(-0.7 / 3)), (5, "b", pytest.approx(0.4 / 3)), (7, "c", pytest.approx(0.1))]


def test_attached_views_read_their_own_store(tmp_path, two_runs):
    """Each schema's `confidences` joins its own `targets`, `post_targets` and `safety_tokens`."""
    run_a, run_b = two_runs
    bigger = Store(tmp_path / "bigger")
    make_safety(bigger)
    fill(bigger, count=5)
    attach = [("b", run_b), ("big", bigger)]
    sql = """SELECT (SELECT count(*) FROM confidences), (SELECT count(*) FROM b.confidences),
                    (SELECT count(*) FROM big.confidences), (SELECT count(*) FROM big.post_targets),
                    (SELECT max(prob) FROM b.confidences WHERE example_id = 'e2' AND context = 'full')"""
    [(main_rows, b_rows, big_rows, big_post, b_max)] = query(run_a, sql, attach)[1]
    assert main_rows == b_rows == 3 * S * 2
    big_steps = query(bigger, "SELECT count(*) FROM targets")[1][0][0]
    assert big_rows == big_steps * S * 2 and big_post > 0
    assert b_max == pytest.approx(0.5)
    # the same store attached to itself, and a name in another case, work too
    assert query(run_a, "SELECT count(*) FROM Self.targets", [("SELF", run_a)])[1] == [(3,)]


@pytest.mark.parametrize(
    "name, message",
    [
        ("x-y", "is not a plain SQL identifier"),
        ("1b", "is not a plain SQL identifier"),
        ("b; DROP VIEW targets; --", "is not a plain SQL identifier"),
        ("", "is not a plain SQL identifier"),
        ("main", "is taken by DuckDB"),
        ("Memory", "is taken by DuckDB"),
        ("temp", "is taken by DuckDB"),
        ("targets", "is a view name"),
        ("Confidences", "is a view name"),
        ("select", "is an SQL keyword"),
        ("left", "is an SQL keyword"),
    ],
)
def test_bad_attach_names_are_refused(name, message):
    with pytest.raises(PactError, match=message):
        check_attach_name(name)


def test_good_attach_names():
    for name in ("b", "run_b", "_x", "B2", "year", "base"):
        assert check_attach_name(name) == name


def test_attach_usage_errors_are_one_line_exit_2(tmp_path, two_runs):
    run_a, run_b = two_runs
    cases = [
        (["--attach", f"x-y={run_b.root}"], "error: Invalid value for '--attach': attach name 'x-y' is not a plain SQL identifier"),
        (["--attach", str(run_b.root)], "is not NAME=STORE"),
        (["--attach", f"b={tmp_path / 'nowhere'}"], f"error: attached store b: store {tmp_path / 'nowhere'} does not exist"),
        (["--attach", f"b={run_b.root}", "--attach", f"B={run_a.root}"],
         "attach name 'B' is given twice (as 'b' too; SQL names ignore case)"),
        (["--attach", f"select={run_b.root}"], "attach name 'select' is an SQL keyword"),
    ]
    for args, message in cases:
        result = run_pact("sql", run_a.root, "SELECT 1", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


def test_attach_through_the_cli(two_runs):
    run_a, run_b = two_runs
    result = run_pact("sql", run_a.root, FAST_DRIFT.format(name="b"), "--attach", f"b={run_b.root}", "--format", "json")
    assert result.returncode == 0, result.stderr
    got = [(r["example_id"], r["mean_drift"], r["max_drift"]) for r in json.loads(result.stdout)]
    assert got == EXPECTED
    help_text = run_pact("sql", "--help").stdout
    assert "--attach NAME=STORE" in help_text and "run_b.targets" in help_text
