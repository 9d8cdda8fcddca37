"""Peak memory of each pact stage at a real vocabulary size, and how it scales.

Runs `pact tokens`, `pact precompute`, `pact train --probe-every 1` and
`pact eval --harmful ... --probe ...` at their default flags, each in a fresh process,
with the real-vocabulary models of ../shared/tools/make_realtok.py (Qwen2.5 tokenizer,
V = 151,936, hidden 64) on small slices of the real data sets (../shared/data), and
reads each process's peak resident memory (`os.wait4`: the child's own
`ru_maxrss`). Three variants, each in a fresh store: `base`; `batch2x` (every
`--batch-size` doubled, and `--probe-batch-size` where `pact train` has it);
`length2x` (every prompt and response written twice, and `--max-resp-len` doubled
for stage 0). Goal: each stage <= 1.5 GB, and within 10% of `base` when the batch or
the length doubles.

`--pact` and `--cwd` choose the implementation measured, e.g. another checkout:
`--pact "python3 -m pact" --cwd ../main`.

Run: python -m bench.bench_stage_memory --models M [--label after] [--variants base,batch2x,length2x]
     [--stages tokens,precompute,train,eval] [--out bench/results/stage_memory-LABEL.json]
(M from `python ../shared/tools/make_realtok.py M`.)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, machine, markdown_table, write_json

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
STAGES = ("tokens", "precompute", "train", "eval")
VARIANTS = ("base", "batch2x", "length2x")
DEFAULT_BATCH = {"tokens": 8, "precompute": 8, "train": 4, "eval": 16}
DEFAULT_PROBE_BATCH = 16
DEFAULT_MAX_RESP_LEN = 64
TARGET_MB = 1500.0
FLAT_RATIO = 1.10
TEXT_FIELDS = ("instruction", "input", "output")


def doubled(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every non-empty text field written twice (twice the tokens)."""
    return {k: f"{v} {v}" if k in TEXT_FIELDS and isinstance(v, str) and v else v for k, v in row.items()}


def write_slices(data_dir: Path, out: Path, sizes: dict[str, int], *, double: bool) -> dict[str, Path]:
    """JSON slices of the real data sets: safety (stage 0), train, harmful, probe."""
    safety = json.loads((data_dir / "safety_refusals.json").read_text(encoding="utf-8"))
    train = json.loads((data_dir / "sst2_5k_harmful_p0.1.json").read_text(encoding="utf-8"))
    harmful = json.loads((data_dir / "advbench_100_refusals.json").read_text(encoding="utf-8"))
    rows = {
        "safety": safety[: sizes["safety"]],
        "train": train[: sizes["train"]],
        "harmful": harmful[: sizes["harmful"]],
        "probe": safety[len(safety) - sizes["probe"] :],  # rows stage 0 does not read
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in rows.items():
        paths[name] = out / f"{name}.json"
        items = [doubled(r) for r in items] if double else items
        paths[name].write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return paths


def run_measured(command: list[str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run `command`; its exit code, seconds and peak RSS (MiB, the child's own)."""
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": process.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
    }


def has_option(pact: list[str], cwd: Path, command: str, option: str) -> bool:
    """Whether `pact COMMAND --help` lists `option`."""
    result = subprocess.run(pact + [command, "--help"], cwd=cwd, capture_output=True, text=True, check=False)
    return option in result.stdout


def stage_commands(
    pact: list[str], models: Path, paths: dict[str, Path], work: Path, variant: str, probe_batch_option: bool
) -> dict[str, list[str]]:
    """The four commands of one variant (default flags but for what the variant doubles)."""
    scale = 2 if variant == "batch2x" else 1
    store = work / "store"

    def batch(stage: str) -> list[str]:
        return ["--batch-size", str(DEFAULT_BATCH[stage] * scale)] if scale > 1 else []

    tokens = ["tokens", "--aligned", models / "aligned", "--base", models / "base", "--data", paths["safety"]]
    tokens += ["--store", store, *batch("tokens")]
    if variant == "length2x":
        tokens += ["--max-resp-len", str(2 * DEFAULT_MAX_RESP_LEN)]
    precompute = ["precompute", "--reference", models / "aligned", "--data", paths["train"], "--store", store]
    train = ["train", "--model", models / "aligned", "--data", paths["train"], "--store", store]
    train += ["--out", work / "run", "--max-steps", "2", "--probe", paths["probe"], "--probe-every", "1"]
    if scale > 1 and probe_batch_option:
        train += ["--probe-batch-size", str(DEFAULT_PROBE_BATCH * scale)]
    evaluate = ["eval", "--model", models / "aligned", "--store", store, "--harmful", paths["harmful"]]
    evaluate += ["--probe", paths["probe"], *batch("eval")]
    commands = {"tokens": tokens, "precompute": precompute + batch("precompute"), "train": train + batch("train")}
    commands["eval"] = evaluate
    return {stage: pact + [str(part) for part in command] for stage, command in commands.items()}


def summary_table(results: dict[str, dict[str, dict[str, Any]]], variants: list[str], stages: list[str]) -> str:
    """Peak RSS per stage and variant (MiB), with the ratio to `base`."""
    rows = []
    for stage in stages:
        row: list[Any] = [stage]
        base = results.get("base", {}).get(stage, {}).get("peak_rss_mb")
        for variant in variants:
            entry = results.get(variant, {}).get(stage)
            if entry is None or entry["rc"] != 0:
                row.append("failed" if entry else "-")
                continue
            cell = f"{entry['peak_rss_mb']:.0f}"
            if variant != "base" and base:
                cell += f" ({entry['peak_rss_mb'] / base:.2f}x)"
            row.append(cell)
        rows.append(row)
    return markdown_table(["stage", *[f"{v} peak RSS MiB" for v in variants]], rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="make_realtok.py output (aligned/, base/)")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="the real data sets")
    parser.add_argument("--pact", default=f"{shlex.quote(sys.executable)} -m pact", help="how to run pact")
    parser.add_argument("--cwd", type=Path, default=REPO_ROOT, help="where to run it")
    parser.add_argument("--label", default="after", help="name of the implementation measured")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--safety-rows", type=int, default=64)
    parser.add_argument("--train-rows", type=int, default=64)
    parser.add_argument("--harmful-rows", type=int, default=16)
    parser.add_argument("--probe-rows", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="keep stores and logs here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name, known in (("variants", VARIANTS), ("stages", STAGES)):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            parser.error(f"--{name}: expected some of {', '.join(known)}, got {getattr(args, name)!r}")
        setattr(args, name, values)
    if not (args.models / "aligned" / "config.json").is_file():
        parser.error(f"--models {args.models}: no aligned/config.json (run make_realtok.py first)")
    if not (args.data / "safety_refusals.json").is_file():
        parser.error(f"--data {args.data}: the real data sets are missing")
    if args.stages[0] != "tokens" and "tokens" not in args.stages:
        parser.error("--stages must include tokens: the later stages read its store")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    pact = shlex.split(args.pact)
    sizes = {"safety": args.safety_rows, "train": args.train_rows, "harmful": args.harmful_rows, "probe": args.probe_rows}
    probe_batch_option = has_option(pact, args.cwd, "train", "--probe-batch-size")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="pact-stage-memory-") as scratch:
        root = Path(args.workdir or scratch).resolve()
        for variant in args.variants:
            work = root / f"{args.label}-{variant}"
            paths = write_slices(args.data, work / "data", sizes, double=variant == "length2x")
            commands = stage_commands(pact, args.models.resolve(), paths, work, variant, probe_batch_option)
            results[variant] = {}
            for stage in args.stages:
                entry = run_measured(commands[stage], args.cwd, work / f"{stage}.log")
                entry["command"] = shlex.join(commands[stage])
                results[variant][stage] = entry
                print(f"{args.label} {variant:8s} {stage:10s} rc={entry['rc']} "
                      f"{entry['peak_rss_mb']:7.0f} MiB {entry['seconds']:6.1f} s", flush=True)
                if entry["rc"] != 0:
                    print((work / f"{stage}.log").read_text(errors="replace")[-2000:], file=sys.stderr)
                    break
    table = summary_table(results, args.variants, args.stages)
    print(table)
    out = args.out or REPO_ROOT / "bench" / "results" / f"stage_memory-{args.label}.json"
    write_json(out, {
        "benchmark": "stage_memory", "label": args.label, "pact": args.pact, "cwd": str(args.cwd),
        "sizes": sizes, "target_mb": TARGET_MB, "flat_ratio": FLAT_RATIO, "machine": machine(),
        "results": results, "table": table,
    })  # fmt: skip
    failed = any(e["rc"] != 0 for v in results.values() for e in v.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
