"""How robust is the demo's effect? Train SFT and PACT with several seeds (data order)
on the demo's store and measure held-out refusal and task accuracy for each.

    python -m bench.demo_seeds --store pact-demo/store --seeds 0 1 2 3 --out bench/results/demo_seeds.json

The store must come from `pact demo` (it holds the safety tokens and the targets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from pact.pipeline.demo.run import DemoSettings, asset_paths
from pact.pipeline.evaluate import EvalOptions, run_eval
from pact.trainer.config import TrainConfig
from pact.trainer.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="store written by `pact demo` (OUT/store)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["sft", "pact"])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    settings, paths = DemoSettings(), asset_paths()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for method in args.methods:
                run = Path(work) / f"{method}-{seed}"
                train(
                    TrainConfig(
                        model=str(paths["aligned"]), data=str(paths["finetune"]), out=str(run), store=args.store,
                        method=method, kl_weight=settings.kl_weight if method == "pact" else 1.0, finetune="full",
                        epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
                        save_every=0, run_id=f"seed-{method}-{seed}",
                    )
                )
                report = run_eval(
                    EvalOptions(
                        model=run, store=args.store, name=f"seed-{method}-{seed}", harmful=paths["harmful"],
                        benign=paths["benign"], task=paths["task"], max_new_tokens=settings.max_new_tokens,
                        max_length=settings.max_length,
                    )
                )
                values = {r["metric"]: r["value"] for r in report.rows if r["step"] is None}
                row = {"seed": seed, "method": method, **{k: values.get(k) for k in ("refusal_rate", "over_refusal_rate", "task_accuracy")}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for method in args.methods:
        refusals = [r["refusal_rate"] for r in rows if r["method"] == method]
        summary[method] = {"median_refusal": statistics.median(refusals), "min_refusal": min(refusals), "max_refusal": max(refusals)}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
