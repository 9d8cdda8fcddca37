"""`pact demo` end to end on the embedded assets, at smoke-test sizes."""

from __future__ import annotations

import json

import pytest

from pact.core.errors import PactError
from pact.pipeline.demo.run import DemoSettings, check_results, format_results, run_demo

SMOKE = DemoSettings(epochs=1, eval_limit=6, probe_examples=6, max_safety_examples=24, max_new_tokens=8)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out, SMOKE, echo=lambda line: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == results["models"]
    assert set(saved["models"]) == {"aligned", "base", "sft", "constrained-sft", "pact"}
    for metrics in saved["models"].values():
        assert set(metrics) == {"refusal_rate", "over_refusal_rate", "task_accuracy"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert saved["seconds"] > 0
    assert (out / results["plot"]).stat().st_size > 10_000
    assert [len(a["rows"]) > 0 for a in saved["sql"]] == [True, True]
    text = format_results(results)
    assert text.splitlines()[0].split() == ["model", "refusal", "over-refusal", "task", "acc"]
    assert isinstance(check_results(results), list)


def test_demo_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(PactError, match="is not empty; choose a new directory"):
        run_demo(tmp_path, SMOKE, echo=lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_check_results_names_each_failed_claim():
    good = {"aligned": 0.95, "sft": 0.1, "pact": 0.9}
    results = {
        "models": {
            name: {"refusal_rate": r, "over_refusal_rate": 0.0, "task_accuracy": 0.8} for name, r in good.items()
        }
    }
    assert check_results(results) == []
    results["models"]["pact"]["refusal_rate"] = 0.5
    results["models"]["sft"]["task_accuracy"] = 0.9
    assert check_results(results) == ["PACT refusal 50% < 80%", "PACT task accuracy more than 5 points below SFT"]
