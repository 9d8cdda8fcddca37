"""`pact plot`: PNG from the evals view, latest eval per model, run curves, bad inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pact.core.errors import PactError
from pact.pipeline.commands.plot import plot_command
from pact.pipeline.plot import latest_evals, plot_store
from pact.store import Store
from pact.store.tables import EVALS_SCHEMA, METRICS_SCHEMA, write_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(eval_id: str, model: str, fingerprint: str, when: float, scale: float) -> list[dict]:
    rows = []
    for step in range(6):
        rows.append(dict(metric="safety_mass", step=step, value=0.8 - scale * step / 10, n=3, dataset="safety.jsonl"))
        rows.append(dict(metric="drift_kl", step=step, value=scale * step / 5, n=3, dataset="safety.jsonl"))
    rows += [
        dict(metric="safety_mass", step=None, value=0.6, n=3, dataset="safety.jsonl"),
        dict(metric="drift_kl", step=None, value=scale, n=3, dataset="safety.jsonl"),
        dict(metric="refusal_rate", step=None, value=1 - scale / 2, n=10, dataset="harmful.jsonl"),
        dict(metric="attack_success_rate", step=None, value=scale / 2, n=10, dataset="harmful.jsonl"),
        dict(metric="over_refusal_rate", step=None, value=0.1, n=8, dataset="benign.jsonl"),
        dict(metric="task_accuracy", step=None, value=0.5 + scale / 4, n=20, dataset="task.jsonl"),
    ]
    for row in rows:
        row.update(eval_id=eval_id, model=model, model_fingerprint=fingerprint, time=when)
    return rows


def write_eval(store: Store, eval_id: str, model: str, fingerprint: str, when: float, scale: float) -> None:
    table = pa.Table.from_pylist(_rows(eval_id, model, fingerprint, when, scale), schema=EVALS_SCHEMA)
    write_table(store, "evals", eval_id, table)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "store")
    store.update_manifest(lambda m: m.update(reference={"model": "fp-ref"}))
    write_eval(store, "ref-1", "aligned", "fp-ref", 1.0, 0.0)
    write_eval(store, "sft-1", "sft", "fp-sft", 2.0, 5.0)  # superseded by sft-2
    write_eval(store, "sft-2", "sft", "fp-sft", 3.0, 1.0)
    write_eval(store, "pact-1", "pact", "fp-pact", 4.0, 0.2)
    return store


def test_latest_eval_per_model(store):
    rows = latest_evals(store)
    sft = {r["metric"]: r["value"] for r in rows if r["model"] == "sft" and r["step"] is None}
    assert sft["drift_kl"] == 1.0 and sft["refusal_rate"] == 0.5  # sft-2, not sft-1
    assert {r["model"] for r in rows} == {"aligned", "sft", "pact"}
    assert len([r for r in rows if r["model"] == "sft" and r["metric"] == "drift_kl"]) == 7


def test_plot_writes_png(store, tmp_path):
    out = plot_store(store.root, tmp_path / "evals.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    assert not list(tmp_path.glob(".tmp-*"))


def test_plot_with_run_panel_is_wider(store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    steps = np.arange(1, 21)
    rows = [
        dict(run_id="r", method="pact", step=int(s), epoch=0, loss=3.0 / s + 0.2, ce=3.0 / s, kl=None if s == 3 else 0.01 * s,
             gate_mean=0.5, lr=1e-4, grad_norm=1.0, tokens_per_s=100.0, peak_memory_mb=10.0, time=float(s))
        for s in steps
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), run / "metrics.parquet")
    plain = plot_store(store.root, tmp_path / "plain.png")
    wide = plot_store(store.root, tmp_path / "wide.png", run)
    assert _png_size(wide)[0] > _png_size(plain)[0]
    result = CliRunner().invoke(plot_command, [str(store.root), "--out", str(tmp_path / "cli.png"), "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.png").read_bytes().startswith(PNG_MAGIC)


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_plot_without_probe_rows(tmp_path):
    store = Store(tmp_path / "s")
    store.update_manifest(lambda m: None)
    rows = [dict(eval_id="e", model="m", model_fingerprint="f", dataset="h.jsonl", metric="refusal_rate",
                 step=None, value=0.4, n=5, time=1.0)]
    write_table(store, "evals", "e", pa.Table.from_pylist(rows, schema=EVALS_SCHEMA))
    assert plot_store(store.root, tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_bad_inputs(store, tmp_path):
    empty = Store(tmp_path / "empty")
    empty.update_manifest(lambda m: None)
    with pytest.raises(PactError, match="has no evals: run `pact eval` first"):
        plot_store(empty.root, tmp_path / "x.png")
    with pytest.raises(PactError, match="does not exist"):
        plot_store(tmp_path / "nostore", tmp_path / "x.png")
    with pytest.raises(PactError, match="has no metrics.parquet"):
        plot_store(store.root, tmp_path / "x.png", run=tmp_path)
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"step": [1], "ce": [1.0]}), tmp_path / "bad" / "metrics.parquet")
    with pytest.raises(PactError, match=r"lacks columns \['kl'\]"):
        plot_store(store.root, tmp_path / "x.png", run=tmp_path / "bad")
    with pytest.raises(PactError, match="is a directory"):
        plot_store(store.root, tmp_path)
    assert not (tmp_path / "x.png").exists()


def test_cli_error_is_one_line(tmp_path):
    from cli_helpers import run_pact

    empty = Store(tmp_path / "empty")
    empty.update_manifest(lambda m: None)
    result = run_pact("plot", empty.root, "--out", tmp_path / "x.png")
    if "No such command 'plot'" in result.stderr:
        pytest.skip("`pact plot` is not registered in pipeline/cli.py yet")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: store {empty.root} has no evals: run `pact eval` first"
