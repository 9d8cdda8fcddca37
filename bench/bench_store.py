"""Store benchmark: bytes per response step, cache size, write/read throughput, and the
trainer's target join against the rate a training loop consumes examples.

Measured in one run, on synthetic stores written with the real writer (|S| = 50,
response lengths uniform in 1..64, random log-probs):

1. float32 vs float16 values, alternated: bytes per step, write throughput.
2. A float32 cache of `--cache-examples` examples (default 100k): its size, against
   the size predicted from (1).
3. `TargetReader` on that cache: index build time, `get` in random order (a fresh
   reader each round, so every part is decoded on first touch), and the peak RSS of a
   process doing the same.
4. The trainer's join (`pact.trainer.batches.cached_batch`: `TargetReader.get` + padding
   into [B, T, S] tensors) alternated with a training step (forward + backward of a
   ~25M-parameter Llama, batch 8, 128 tokens): join rate / consumption rate, goal >= 50.

Run: python -m bench.bench_store [--quick] [--out bench/results/store.json]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench import common

JOIN_GOAL = 50.0
MIB = 1024.0**2

FULL = dict(ab_examples=2000, cache_examples=100_000, read_examples=20_000, join_batches=25, batch_size=8, seq_len=128,
            repeats=5, model=common.llama_config(12000, 512, 1376, 4, 8, 8))
QUICK = dict(ab_examples=12, cache_examples=40, read_examples=20, join_batches=2, batch_size=2, seq_len=16, repeats=2,
             model=common.llama_config(260, 32, 64, 2, 4, 2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser("bench_store", __doc__.split("\n\n")[0])
    parser.add_store_shape(max_steps=True)
    parser.add_argument("--ab-examples", type=common.positive_int, help="examples per float32/float16 store (default 2000)")
    parser.add_argument("--cache-examples", type=common.positive_int, help="examples of the big cache (default 100000)")
    parser.add_argument("--read-examples", type=common.positive_int, help="random gets per read round (default 20000)")
    parser.add_argument("--join-batches", type=common.positive_int, help="batches joined per round (default 25)")
    parser.add_argument("--batch-size", type=common.positive_int, help="training batch size (default 8)")
    parser.add_argument("--seq-len", type=common.positive_int, help="training sequence length (default 128)")
    args = parser.parse_args(argv)
    common.apply_sizes(args, QUICK if args.quick else FULL,
                       ("ab_examples", "cache_examples", "read_examples", "join_batches", "batch_size", "seq_len", "repeats"),
                       ("model",))
    if args.read_examples > args.cache_examples:
        parser.error(f"--read-examples {args.read_examples} exceeds --cache-examples {args.cache_examples}")
    if args.batch_size > args.cache_examples:
        parser.error(f"--batch-size {args.batch_size} exceeds --cache-examples {args.cache_examples}")
    return args


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, leave=False, mininterval=1.0)


def measure_dtypes(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """float32 vs float16 stores of the same examples, written in alternated rounds."""
    written: dict[str, common.StoreStats] = {}
    write_s: dict[str, list[float]] = {"float32": [], "float16": []}
    counter = iter(range(10**9))

    def write(dtype: str) -> None:
        root = workdir / f"ab-{dtype}-{next(counter)}"
        with _progress(args.ab_examples, f"write {dtype}") as bar:
            written[dtype] = common.synthetic_store(
                root, num_safety=args.num_safety, examples=args.ab_examples, max_steps=args.max_steps,
                value_dtype=dtype, seed=args.seed, progress=bar.update,
            )
        write_s[dtype].append(written[dtype].write_s)
        shutil.rmtree(root)

    common.alternate({"float32": lambda: write("float32"), "float16": lambda: write("float16")}, args.repeats)
    result: dict[str, Any] = {}
    for dtype in ("float32", "float16"):
        store_stats = written[dtype]
        timing = common.summarize(write_s[dtype])
        result[dtype] = {
            "examples": store_stats.examples,
            "steps": store_stats.steps,
            "targets_bytes": store_stats.targets_bytes,
            "post_bytes": store_stats.post_bytes,
            "bytes_per_step": store_stats.total_bytes / store_stats.steps,
            "targets_bytes_per_step": store_stats.targets_bytes / store_stats.steps,
            "post_bytes_per_step": store_stats.post_bytes / store_stats.steps,
            "raw_value_bytes_per_step": 2 * args.num_safety * (4 if dtype == "float32" else 2),
            "write": timing,
            "write_examples_per_s": store_stats.examples / timing["median_s"],
            "write_mb_per_s": store_stats.total_bytes / MIB / timing["median_s"],
        }
    result["float16_over_float32_bytes"] = result["float16"]["bytes_per_step"] / result["float32"]["bytes_per_step"]
    result["float16_over_float32_write_time"] = (
        result["float16"]["write"]["median_s"] / result["float32"]["write"]["median_s"]
    )
    return result


def build_cache(args: argparse.Namespace, workdir: Path, dtypes: dict[str, Any]) -> tuple[Path, dict[str, Any], dict[str, int]]:
    """The big float32 cache; its size against the size predicted from bytes per step."""
    root = workdir / "cache"
    with _progress(args.cache_examples, "write cache") as bar:
        stats = common.synthetic_store(
            root, num_safety=args.num_safety, examples=args.cache_examples, max_steps=args.max_steps,
            seed=args.seed + 1, progress=bar.update,
        )
    result = {
        "examples": stats.examples,
        "steps": stats.steps,
        "bytes": stats.total_bytes,
        "predicted_float32_bytes": dtypes["float32"]["bytes_per_step"] * stats.steps,
        "predicted_float16_bytes": dtypes["float16"]["bytes_per_step"] * stats.steps,
        "write_s": stats.write_s,
        "write_examples_per_s": stats.examples / stats.write_s,
        "write_mb_per_s": stats.total_bytes / MIB / stats.write_s,
    }
    result["actual_over_predicted"] = result["bytes"] / result["predicted_float32_bytes"]
    return root, result, stats.lengths


def measure_reads(args: argparse.Namespace, cache: Path) -> tuple[dict[str, Any], Any]:
    """Index build and random-order gets, a fresh (cold) reader per round; returns the last reader."""
    from pact.store.manifest import Store
    from pact.store.targets import TargetReader

    index_s, get_s = [], []
    reader = None
    for round_index in range(args.repeats):
        reader = None  # drop the previous reader and the parts it decoded
        start = time.perf_counter()
        reader = TargetReader(Store(cache))
        index_s.append(time.perf_counter() - start)
        ids = reader.example_ids()
        random.Random(args.seed + round_index).shuffle(ids)
        start = time.perf_counter()
        for example_id in ids[: args.read_examples]:
            reader.get(example_id)
        get_s.append(time.perf_counter() - start)
    gets = common.summarize(get_s)
    return {
        "index_build": common.summarize(index_s),
        "get_random_cold": gets,
        "get_examples_per_s": args.read_examples / gets["median_s"],
        "examples_per_round": args.read_examples,
    }, reader


def measure_memory(args: argparse.Namespace, cache: Path, cache_bytes: int) -> dict[str, Any]:
    """Peak RSS of a fresh process that imports the reader, then of one that also reads."""
    setup = "from store.manifest import Store; from store.targets import TargetReader; import random\n"
    read = (
        f"r = TargetReader(Store({str(cache)!r})); ids = r.example_ids(); random.Random(0).shuffle(ids)\n"
        f"for i in ids[:{args.read_examples}]: r.get(i)\n"
    )
    baseline = common.peak_rss_mb(setup)
    reading = common.peak_rss_mb(setup + read)
    return {
        "baseline_mb": baseline,
        "reader_mb": reading,
        "reader_minus_baseline_mb": reading - baseline,
        "cache_mb_on_disk": cache_bytes / MIB,
        "examples_read": args.read_examples,
    }


def build_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(max_position_embeddings=max(args.seq_len, 128), tie_word_embeddings=False, **args.model)
    return LlamaForCausalLM(config)


def measure_join(args: argparse.Namespace, reader: Any, lengths: dict[str, int]) -> dict[str, Any]:
    """Alternate one training step (forward + backward) with `join_batches` joined batches."""
    import torch

    from pact.core.encoding import IGNORE_INDEX, Encoded
    from pact.trainer.batches import cached_batch

    model = build_model(args)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    input_ids = torch.randint(0, args.model["vocab_size"], (args.batch_size, args.seq_len))

    def train_step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def encoded(example_id: str) -> Encoded:
        steps = lengths[example_id]
        length = max(args.seq_len, steps + 1)
        ids = np.zeros(length, np.int64)
        labels = np.full(length, IGNORE_INDEX, np.int64)
        labels[length - steps :] = 0
        return Encoded(example_id, ids, labels, length - steps, steps, "", "", False)

    order = list(lengths)
    random.Random(args.seed).shuffle(order)
    batches = [
        [encoded(i) for i in order[k : k + args.batch_size]]
        for k in range(0, args.batch_size * args.join_batches * args.repeats, args.batch_size)
        if k + args.batch_size <= len(order)
    ]
    position = iter(range(10**9))

    def join() -> None:
        for _ in range(args.join_batches):
            batch = batches[next(position) % len(batches)]
            cached_batch(batch, 0, reader)

    train_step()
    seconds = common.alternate({"train_step": train_step, "join": join}, args.repeats)
    step, joined = common.summarize(seconds["train_step"]), common.summarize(seconds["join"])
    consumption = args.batch_size / step["median_s"]
    join_rate = args.batch_size * args.join_batches / joined["median_s"]
    return {
        "join_path": "trainer.batches.cached_batch (TargetReader.get + padding into [B, T, S])",
        "model_parameters": params,
        "model_config": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "train_step": step,
        "join_per_round": joined,
        "batches_per_join_round": args.join_batches,
        "consumption_examples_per_s": consumption,
        "join_examples_per_s": join_rate,
        "join_over_consumption": join_rate / consumption,
        "goal": JOIN_GOAL,
        "meets_goal": join_rate / consumption >= JOIN_GOAL,
    }


def table(result: dict[str, Any]) -> str:
    d, c, r, j, m = (result[k] for k in ("bytes_per_step", "cache", "read", "join", "memory"))
    f32, f16 = d["float32"], d["float16"]
    rows = [
        ["bytes per step, float32", common.fmt(f32["bytes_per_step"]), f"targets {common.fmt(f32['targets_bytes_per_step'])} + post {common.fmt(f32['post_bytes_per_step'])}; raw values {f32['raw_value_bytes_per_step']}"],
        ["bytes per step, float16", common.fmt(f16["bytes_per_step"]), f"{common.fmt(d['float16_over_float32_bytes'])}x float32"],
        [f"cache of {c['examples']:,} examples, float32", f"{c['bytes'] / MIB:,.0f} MiB", f"{c['steps']:,} steps; {common.fmt(c['actual_over_predicted'])}x the prediction"],
        [f"cache of {c['examples']:,} examples, float16", f"{c['predicted_float16_bytes'] / MIB:,.0f} MiB", "extrapolated from bytes per step"],
        ["write, float32", f"{common.fmt(f32['write_examples_per_s'])} ex/s", f"{common.fmt(f32['write_mb_per_s'])} MiB/s (median of {f32['write']['runs']})"],
        ["write, float16", f"{common.fmt(f16['write_examples_per_s'])} ex/s", f"{common.fmt(f16['write_mb_per_s'])} MiB/s; time {common.fmt(d['float16_over_float32_write_time'])}x float32"],
        ["write, big cache", f"{common.fmt(c['write_examples_per_s'])} ex/s", f"{common.fmt(c['write_mb_per_s'])} MiB/s (one run)"],
        ["reader index build", f"{common.fmt(r['index_build']['median_s'])} s", f"max {common.fmt(r['index_build']['max_s'])} s, {c['examples']:,} examples"],
        ["get, random order, cold reader", f"{common.fmt(r['get_examples_per_s'])} ex/s", f"{r['examples_per_round']:,} gets per round"],
        ["peak RSS reading", f"{m['reader_mb']:,.0f} MiB", f"{m['reader_minus_baseline_mb']:,.0f} MiB over imports; cache {m['cache_mb_on_disk']:,.0f} MiB on disk"],
        ["training consumption", f"{common.fmt(j['consumption_examples_per_s'])} ex/s", f"{j['model_parameters'] / 1e6:.1f}M params, batch {j['batch_size']}x{j['seq_len']}, fwd+bwd {common.fmt(j['train_step']['median_s'])} s"],
        ["trainer join (warm reader)", f"{common.fmt(j['join_examples_per_s'])} ex/s", "pact.trainer.batches.cached_batch"],
        ["join / consumption", f"{common.fmt(j['join_over_consumption'])}x", f"goal >= {JOIN_GOAL:g}x: {'met' if j['meets_goal'] else 'MISSED'}"],
    ]
    return common.markdown_table(["measure", "value", "note"], rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All measurements; the JSON payload."""
    parameters = ("num_safety", "max_steps", "ab_examples", "cache_examples", "read_examples", "join_batches",
                  "batch_size", "seq_len", "repeats", "seed")
    with common.bench_run(args, "store", parameters=parameters) as (workdir, result):
        result["parameters"]["examples_per_part"] = 256
        result["bytes_per_step"] = measure_dtypes(args, workdir)
        cache, result["cache"], lengths = build_cache(args, workdir, result["bytes_per_step"])
        result["read"], reader = measure_reads(args, cache)
        result["join"] = measure_join(args, reader, lengths)
        del reader
        result["memory"] = measure_memory(args, cache, result["cache"]["bytes"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    return common.finish("bench_store", argv, args.out, result, table(result))


if __name__ == "__main__":
    sys.exit(main())
