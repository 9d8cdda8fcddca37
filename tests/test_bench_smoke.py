"""Smoke runs of the benchmark scripts with tiny sizes (`--quick`), and their helpers.

Nothing here checks a wall-clock time: only that the scripts run, write consistent
JSON and print their table, and that bad options fail with a clear message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_sql, bench_store  # noqa: E402
from bench.common import (  # noqa: E402
    alternate,
    markdown_table,
    peak_rss_mb,
    summarize,
    synthetic_store,
)
from store.manifest import Store  # noqa: E402
from store.targets import TargetReader  # noqa: E402


def test_alternate_runs_rounds_in_abba_order():
    calls = []
    seconds = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in seconds.values()] == [3, 3]
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        alternate({"a": lambda: None}, 0)


def test_summarize_and_table():
    stats = summarize([3.0, 1.0, 2.0, 10.0])
    assert (stats["median_s"], stats["min_s"], stats["max_s"], stats["runs"]) == (2.5, 1.0, 10.0, 4)
    text = markdown_table(["name", "x"], [["long name", 1], ["b", 22]])
    assert text.splitlines() == ["| name      | x  |", "|-----------|----|", "| long name | 1  |", "| b         | 22 |"]


def test_peak_rss_sees_the_child_allocation_and_reports_failures():
    small = peak_rss_mb("print('100% progress bar 42')")  # the snippet's own output is ignored
    big = peak_rss_mb("import numpy as np; a = np.ones(40_000_000)")  # 305 MiB
    assert big - small > 250
    with pytest.raises(RuntimeError, match="exit 1.*ValueError: boom"):
        peak_rss_mb("raise ValueError('boom')")


def test_synthetic_store_is_readable_and_reproducible(tmp_path):
    first = synthetic_store(tmp_path / "a", num_safety=5, min_steps_total=100, seed=3)
    second = synthetic_store(tmp_path / "b", num_safety=5, min_steps_total=100, seed=3, perturb=0.5)
    assert first.steps >= 100 and first.lengths == second.lengths
    reader_a, reader_b = TargetReader(Store(tmp_path / "a")), TargetReader(Store(tmp_path / "b"))
    example_id = next(iter(first.lengths))
    got_a, got_b = reader_a.get(example_id), reader_b.get(example_id)
    assert got_a.full_logprobs.shape == (first.lengths[example_id], 5)
    assert (got_a.full_logprobs <= 0).all() and (got_b.full_logprobs <= 0).all()
    assert not (got_a.full_logprobs == got_b.full_logprobs).all()
    with pytest.raises(ValueError, match="exactly one of"):
        synthetic_store(tmp_path / "c", examples=2, min_steps_total=10)


def test_store_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "store.json"
    assert bench_store.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "join / consumption" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    sizes = result["bytes_per_step"]
    assert sizes["float16"]["bytes_per_step"] < sizes["float32"]["bytes_per_step"]
    assert sizes["float32"]["steps"] == sizes["float16"]["steps"] > 0
    assert sizes["float32"]["write"]["runs"] == 2
    cache = result["cache"]
    assert cache["examples"] == 40 and 0.5 < cache["actual_over_predicted"] < 2
    join = result["join"]
    assert join["join_over_consumption"] == pytest.approx(join["join_examples_per_s"] / join["consumption_examples_per_s"])
    assert join["meets_goal"] == (join["join_over_consumption"] >= 50)
    assert result["read"]["index_build"]["runs"] == 2 and result["read"]["get_examples_per_s"] > 0
    assert result["memory"]["reader_mb"] > 0 and result["machine"]["nproc"] >= 1


def test_sql_benchmark_quick_and_drift_formulations_agree(tmp_path, capsys):
    out, workdir = tmp_path / "sql.json", tmp_path / "work"
    assert bench_sql.main(["--quick", "--profile", "--out", str(out), "--workdir", str(workdir)]) == 0
    assert "drift_two_runs" in capsys.readouterr().out
    result = json.loads(out.read_text())
    run_a = result["stores"]["run_a"]
    assert run_a["confidences_rows"] >= 20_000 and run_a["confidences_rows"] == 100 * run_a["steps"]
    assert result["stores"]["run_b"]["confidences_rows"] == run_a["confidences_rows"]
    assert set(result["queries"]) == set(bench_sql.QUERIES)
    for query in result["queries"].values():
        assert query["runs"] == 2 and query["min_s"] <= query["median_s"] <= query["max_s"]
    assert "HASH_JOIN" in [op["operator"] for op in result["queries"]["drift_two_runs"]["profile"]["operators"]]
    stores = Store(workdir / "run_a"), Store(workdir / "run_b")
    long_form = bench_sql.run_query("drift_two_runs", *stores)
    step_form = bench_sql.run_query("drift_two_runs_steps", *stores)
    assert len(long_form) == min(20, run_a["examples"]) and long_form[0][1] > 0
    assert [r[0] for r in long_form] == [r[0] for r in step_form]
    flat = [value for row in long_form for value in row[1:]]
    assert flat == pytest.approx([value for row in step_form for value in row[1:]], rel=1e-6)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (bench_store, ["--repeats", "0"], "argument --repeats: 0 must be >= 1"),
        (bench_store, ["--cache-examples", "10", "--read-examples", "11"], "--read-examples 11 exceeds --cache-examples 10"),
        (bench_sql, ["--rows", "many"], "argument --rows: 'many' is not an integer"),
    ],
)
def test_bad_options_fail_with_one_clear_line(script, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_non_empty_workdir_is_refused(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit):
        bench_sql.main(["--quick", "--workdir", str(tmp_path)])
    assert f"--workdir {tmp_path} is not an empty directory" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["bench.bench_store", "bench.bench_sql"])
def test_help_runs_as_a_script(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout
