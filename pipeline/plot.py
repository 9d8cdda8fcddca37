"""`pact plot`: one PNG of a store's evaluations (and optionally a run's training curves).

Panels: per-step safety-token mass (probe rows), per-step drift KL, bars of refusal /
over-refusal / task accuracy per model, and with `run` the run's CE and KL per step.
For each (model, dataset, metric) only the latest evaluation is drawn.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pact.core.atomic import atomic_write_with
from pact.core.errors import PactError
from pact.pipeline.probe import reference_fingerprint
from pact.store.manifest import Store
from pact.store.sql import query

BAR_METRICS = ("refusal_rate", "over_refusal_rate", "task_accuracy", "task_exact_match")
CURVE_METRICS = ("safety_mass", "drift_kl")

LATEST_EVALS = """
WITH latest AS (
    SELECT model, dataset, metric, arg_max(eval_id, time) AS eval_id
    FROM evals GROUP BY model, dataset, metric
)
SELECT e.model, e.model_fingerprint, e.dataset, e.metric, e.step, e.value, e.n
FROM evals e JOIN latest l USING (model, dataset, metric, eval_id)
ORDER BY e.model, e.dataset, e.metric, e.step
"""


def latest_evals(store: Store) -> list[dict[str, Any]]:
    """Rows of the latest evaluation per (model, dataset, metric); PactError when there are none."""
    columns, rows = query(store, LATEST_EVALS)
    if not rows:
        raise PactError(f"store {store.root} has no evals: run `pact eval` first")
    return [dict(zip(columns, row, strict=True)) for row in rows]


def read_run_metrics(run: str | os.PathLike) -> pa.Table:
    """RUN/metrics.parquet with at least step, ce, kl; a clear error otherwise."""
    path = Path(run) / "metrics.parquet"
    if not Path(run).is_dir():
        raise PactError(f"run directory {run} does not exist")
    if not path.is_file():
        raise PactError(f"{run} has no metrics.parquet (is it a `pact train` run directory?)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise PactError(f"{path} is not a readable Parquet file ({str(exc)[:200]})") from None
    missing = {"step", "ce", "kl"} - set(table.column_names)
    if missing:
        raise PactError(f"{path} lacks columns {sorted(missing)}")
    if table.num_rows == 0:
        raise PactError(f"{path} holds no training steps")
    return table.sort_by("step")


def _label(model: str, fingerprint: str, reference: str | None) -> str:
    return f"{model} (reference)" if reference is not None and fingerprint == reference else model


REFERENCE_COLOR = "0.2"


def _colors(rows: list[dict[str, Any]], reference: str | None) -> dict[str, Any]:
    """One color per model label, the same in every panel; the reference is dark gray."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    labels = sorted({(_label(r["model"], r["model_fingerprint"], reference), r["model_fingerprint"] == reference) for r in rows})
    colors, others = {}, 0
    for label, is_reference in labels:
        if is_reference:
            colors[label] = REFERENCE_COLOR
        else:
            colors[label] = palette[others % len(palette)]
            others += 1
    return colors


def _curve_panel(
    ax: Any, rows: list[dict[str, Any]], metric: str, reference: str | None, colors: dict[str, Any], title: str, ylabel: str
) -> None:
    curves: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    is_reference: dict[tuple[str, str], bool] = {}
    for row in rows:
        if row["metric"] == metric and row["step"] is not None:
            key = (_label(row["model"], row["model_fingerprint"], reference), row["dataset"])
            curves[key].append((row["step"], row["value"]))
            is_reference[key] = reference is not None and row["model_fingerprint"] == reference
    ax.set_title(title)
    ax.set_xlabel("response step")
    ax.set_ylabel(ylabel)
    if not curves:
        ax.text(0.5, 0.5, "no probe rows\n(pact eval --probe)", ha="center", va="center", transform=ax.transAxes)
        return
    several_datasets = len({dataset for _, dataset in curves}) > 1
    for key, points in sorted(curves.items(), key=lambda kv: (not is_reference[kv[0]], kv[0])):
        steps, values = zip(*sorted(points), strict=True)
        name = f"{key[0]} [{key[1]}]" if several_datasets else key[0]
        style = dict(linestyle="--", linewidth=2) if is_reference[key] else dict(linewidth=1.5)
        ax.plot(steps, values, marker="o", markersize=3, label=name, color=colors[key[0]], **style)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _bar_panel(ax: Any, rows: list[dict[str, Any]], reference: str | None, colors: dict[str, Any]) -> None:
    scalars = [r for r in rows if r["step"] is None and r["metric"] in BAR_METRICS]
    ax.set_title("refusal / over-refusal / task accuracy")
    if not scalars:
        ax.text(0.5, 0.5, "no refusal or task rows\n(pact eval --harmful/--benign/--task)",
                ha="center", va="center", transform=ax.transAxes)
        return
    datasets_per_metric: dict[str, set[str]] = defaultdict(set)
    for row in scalars:
        datasets_per_metric[row["metric"]].add(row["dataset"])
    groups = sorted({(r["metric"], r["dataset"]) for r in scalars}, key=lambda g: (BAR_METRICS.index(g[0]), g[1]))
    models = sorted({_label(r["model"], r["model_fingerprint"], reference) for r in scalars})
    values = {(_label(r["model"], r["model_fingerprint"], reference), r["metric"], r["dataset"]): r["value"] for r in scalars}
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs, heights = [], []
        for g, (metric, dataset) in enumerate(groups):
            if (model, metric, dataset) in values:
                xs.append(g - 0.4 + width * (i + 0.5))
                heights.append(values[(model, metric, dataset)])
        bars = ax.bar(xs, heights, width=width, label=model, color=colors[model])
        ax.bar_label(bars, labels=[f"{h:.0%}" for h in heights], fontsize=6, rotation=90, padding=2)
    names = [m if len(datasets_per_metric[m]) == 1 else f"{m}\n[{d}]" for m, d in groups]
    ax.set_xticks(range(len(groups)), [n.replace("_", " ") for n in names], fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("rate")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _run_panel(ax: Any, table: pa.Table, name: str) -> None:
    def column(name: str) -> Any:  # nulls (e.g. no KL in an sft run) become NaN: gaps in the line
        return table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)

    ax.set_title(f"training: {name}")
    ax.set_xlabel("optimizer step")
    ax.plot(column("step"), column("ce"), color="tab:blue", label="ce")
    ax.set_ylabel("cross-entropy", color="tab:blue")
    twin = ax.twinx()
    twin.plot(column("step"), column("kl"), color="tab:red", label="kl")
    twin.set_ylabel("KL term", color="tab:red")
    ax.grid(alpha=0.3)


def plot_store(store_dir: str | os.PathLike, out: str | os.PathLike, run: str | os.PathLike | None = None) -> Path:
    """Draw the store's evals (and `run`'s training curves) into the PNG `out`; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = Store(store_dir)
    rows = latest_evals(store)
    reference = reference_fingerprint(store.require())
    run_table = read_run_metrics(run) if run is not None else None
    out = Path(out)
    if out.is_dir():
        raise PactError(f"--out {out} is a directory; give a .png file path")
    panels = 3 + (run_table is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))
    try:
        colors = _colors(rows, reference)
        _curve_panel(axes[0], rows, "safety_mass", reference, colors, "safety-token mass per step", "sum of p over S")
        _curve_panel(axes[1], rows, "drift_kl", reference, colors, "drift KL(ref_S || model_S) per step", "nats")
        _bar_panel(axes[2], rows, reference, colors)
        if run_table is not None:
            _run_panel(axes[3], run_table, Path(run).resolve().name)
        fig.suptitle(f"pact: evaluations in store {store.root.resolve()}", fontsize=10)
        fig.tight_layout()
        atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return out
