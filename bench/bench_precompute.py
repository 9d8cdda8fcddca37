"""Precompute benchmark: what `pact precompute` costs over the bare forward passes it has to
run, what post-only deduplication saves, and its peak memory as the vocabulary grows.

1. Overhead: `pact.pipeline.precompute.run_precompute` (a fresh store and weight-hash cache each
   round: the whole first-run cost) alternated with the bare forward passes over the same
   batches (`model(input_ids, attention_mask)` over the full-context batches and the
   post-only batches of the distinct responses, the model already in memory).
   Goal: precompute / bare <= 1.15.
2. Post-only deduplication on a classification-style set (the first 1000 rows of
   ../shared/data/sst2_5k_harmful_p0.1.json): post-only forward passes with the dedup (what
   `run_precompute` runs, counted inside it: the distinct responses, queued across example
   batches), with the dedup but run per example batch (the scheme before the queue: each
   example batch's new responses, simulated from the same batches) and without (one per
   example); then the same post-only function timed over the three, alternated.
   Goal: >= 40% fewer sequences.
3. Peak memory against vocabulary x sequence x batch: the chunked LM head of
   `run_precompute` against a naive full-logits pass over the same batches, each in a fresh
   process (`bench.common.ForkedRunner`), measured from the start of the passes: vocab
   8k / 32k / 128k at 4 x 256 tokens, and batch 1 / 4 / 16 at vocab 32k. The chunked head
   must stay flat in batch x sequence beyond one chunk; the naive pass grows with it.

Run: python -m bench.bench_precompute [--quick] [--only overhead|dedup|memory ...] [--out bench/results/precompute.json]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import common

OVERHEAD_GOAL = 1.15
DEDUP_GOAL = 0.40
DEDUP_DATA = common.REPO_ROOT.parent / "shared" / "data" / "sst2_5k_harmful_p0.1.json"

CPU = dict(
    model=common.llama_config(32000, 512, 1376, 4, 8, 8),
    examples=64, seq_len=128, prompt_tokens=64, batch_size=8, repeats=3, dedup_rows=1000,
    memory_body=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4),
    memory_vocabs=(8000, 32000, 128000), memory_batches=(1, 4, 16), memory_seq_len=256,
    memory_prompt_tokens=16, chunk_positions=256,
)
GPU = dict(
    CPU,
    model=common.llama_config(32000, 2048, 5632, 16, 16, 16),
    examples=256, seq_len=512, prompt_tokens=256, batch_size=16,
)
QUICK = dict(
    CPU, model=common.llama_config(300, 32, 64, 2, 4, 2), examples=6, seq_len=32, prompt_tokens=12, batch_size=2,
    repeats=2, dedup_rows=40, memory_body=dict(CPU["memory_body"], hidden_size=32, intermediate_size=64, num_key_value_heads=2),
    memory_vocabs=(300, 600, 1200), memory_batches=(1, 2, 4), memory_seq_len=32, memory_prompt_tokens=8, chunk_positions=8,
)
MEASURES = ("overhead", "dedup", "memory")
DEDUP_MODEL = common.llama_config(300, 64, 128, 2, 4, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser("bench_precompute", __doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run; auto: CUDA when available (then the ~1B overhead model) (default: %(default)s)")
    parser.add_store_shape()
    parser.add_argument("--examples", type=common.positive_int, help="examples of the overhead measure (default: 64 on CPU)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's dynamic mmap threshold on in the memory processes; by default it is pinned "
                             "at 128 KiB so the peak RSS follows the live memory")
    parser.add_argument("--dedup-data", type=Path, default=DEDUP_DATA,
                        help="classification-style set for the dedup measure; skipped with a note when absent (default: %(default)s)")
    parser.add_argument("--dedup-rows", type=common.positive_int, help="first rows of --dedup-data to use (default: 1000)")
    parser.add_argument("--only", action="append", choices=MEASURES,
                        help="run only this measure (repeat for several; default: all three)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else GPU if args.device.startswith("cuda") else CPU
    common.apply_sizes(args, sizes, ("examples", "dedup_rows", "repeats"),
                       ("model", "seq_len", "prompt_tokens", "batch_size", "memory_body", "memory_vocabs",
                        "memory_batches", "memory_seq_len", "memory_prompt_tokens", "chunk_positions"))
    if args.num_safety >= min(args.model["vocab_size"], *args.memory_vocabs):
        parser.error(f"--num-safety {args.num_safety} must be below the smallest vocabulary measured")
    return args


def new_store(root: Path, num_safety: int, vocab_size: int, seed: int) -> Path:
    """An empty store with a random safety set of `num_safety` ids in `vocab_size`."""
    from pact.store.manifest import Store

    common.write_safety_tokens(Store(root), num_safety, seed, vocab_size=vocab_size)
    return root


@contextmanager
def wrapped(module: Any, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Replace `module.name` by `wrapper(original)` for the duration (instrumenting the real code)."""
    original = getattr(module, name)
    setattr(module, name, wrapper(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def encoded_examples(model_dir: Path, data: Path, max_length: int) -> tuple[Any, list[Any], list[int]]:
    """Tokenizer, the examples encoded as precompute encodes them, and the assistant header ids."""
    from pact.core.data import load_examples
    from pact.core.encoding import EncodingOptions, assistant_header_ids, encode_example
    from pact.core.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    options = EncodingOptions(max_length=max_length)
    encoded = [encode_example(tokenizer, e, options) for e in load_examples(data).examples]
    return tokenizer, encoded, assistant_header_ids(tokenizer)


def forward_batches(encoded: list[Any], header: list[int], batch_size: int, pad_id: int, device: str) -> dict[str, list[tuple[Any, Any]]]:
    """The padded (ids, mask) batches precompute runs: full context of every example, and
    post-only context (header + response[:-1]) of every distinct response, as
    `pact.pipeline.precompute.plan_batches` groups them."""
    from pact.core.encoding import post_only_ids
    from pact.pipeline.precompute import pad_batch, plan_batches

    full = [e.input_ids for e in encoded]
    responses = {e.response_hash: e.response_ids for e in encoded}
    post = [post_only_ids(header, ids)[0] for ids in responses.values()]
    return {
        kind: [pad_batch([rows[i] for i in batch], pad_id, device) for batch in plan_batches([len(r) for r in rows], batch_size)]
        for kind, rows in (("full", full), ("post", post))
    }


# ----------------------------------------------------------------------------- 1. overhead


def measure_overhead(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """run_precompute (end to end, fresh store and hash cache) vs the bare forward passes."""
    import torch

    import pact.pipeline.precompute as precompute
    from pact.core.models import load_model

    model_dir = workdir / "overhead-model"
    info = common.save_llama(model_dir, args.model, seed=args.seed, max_positions=max(args.seq_len, 128))
    data = _write_rows(model_dir, workdir / "overhead.jsonl", args.examples, args.prompt_tokens, args.seq_len, args.seed)
    tokenizer, encoded, header = encoded_examples(model_dir, data, args.seq_len)
    options = precompute.PrecomputeOptions(max_length=args.seq_len, batch_size=args.batch_size, device=args.device, progress=False)
    model = load_model(model_dir, dtype=options.dtype, device=args.device)
    batches = forward_batches(encoded, header, args.batch_size, tokenizer.pad_token_id, args.device)
    cuda = args.device.startswith("cuda")
    rounds = iter(range(10**6))
    compute_s: list[float] = []
    summaries: list[Any] = []

    def bare() -> None:
        with torch.inference_mode():
            for kind in ("full", "post"):
                for ids, mask in batches[kind]:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
        if cuda:
            torch.cuda.synchronize()

    def run_precompute() -> None:
        index = next(rounds)
        store = new_store(workdir / f"overhead-store-{index}", args.num_safety, args.model["vocab_size"], args.seed)
        os.environ["PACT_CACHE_DIR"] = str(workdir / f"overhead-cache-{index}")  # hash the weights, as a first run does
        summaries.append(precompute.run_precompute(model_dir, data, store, options, echo=lambda line: None))
        if cuda:
            torch.cuda.synchronize()

    def timed(original: Callable[..., Any]) -> Callable[..., Any]:
        def compute(*a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                compute_s.append(time.perf_counter() - started)

        return compute

    with wrapped(precompute.run, "compute_targets", timed):
        common.alternate({"precompute": run_precompute, "bare": bare}, 1)  # warm-up round, not counted
        compute_s.clear()
        seconds = common.alternate({"precompute": run_precompute, "bare": bare}, args.repeats)
    total, bare_s, loop = common.summarize(seconds["precompute"]), common.summarize(seconds["bare"]), common.summarize(compute_s)
    last = summaries[-1]
    result = {
        "model_parameters": info["parameters"],
        "model_config": info["config"],
        "examples": len(encoded),
        "distinct_responses": last.responses_computed,
        "response_tokens": last.response_tokens,
        "input_tokens": int(sum(len(e.input_ids) for e in encoded)),
        "batch_size": args.batch_size,
        "forward_batches": {kind: len(v) for kind, v in batches.items()},
        "precompute": total,
        "precompute_compute_loop": loop,
        "bare_forward": bare_s,
        "precompute_over_bare": total["median_s"] / bare_s["median_s"],
        "compute_loop_over_bare": loop["median_s"] / bare_s["median_s"],
        "fixed_cost_s": total["median_s"] - loop["median_s"],
        "goal": OVERHEAD_GOAL,
    }
    result["meets_goal"] = result["precompute_over_bare"] <= OVERHEAD_GOAL
    # Linear model: fixed cost + per-example loop time against per-example bare time;
    # from how many examples does precompute / bare stay under the goal?
    loop_per_example = loop["median_s"] / len(encoded)
    room = OVERHEAD_GOAL * bare_s["median_s"] / len(encoded) - loop_per_example
    result["examples_to_meet_goal"] = None if room <= 0 else math.ceil(result["fixed_cost_s"] / room)
    return result


def _write_rows(model_dir: Path, path: Path, count: int, prompt_tokens: int, seq_len: int, seed: int) -> Path:
    """Prompt/completion rows that encode to exactly `seq_len` tokens (the response tail is cut)."""
    from pact.core.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return common.write_jsonl(path, common.synthetic_rows(tokenizer, count, prompt_tokens, seq_len - prompt_tokens, seed))


# ----------------------------------------------------------------------------- 2. dedup


def measure_dedup(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Post-only passes with dedup (recorded inside run_precompute) and without (every example
    of each example batch), counted and replayed through the same function."""
    import json

    import torch

    import pact.pipeline.precompute as precompute
    from pact.core.models import load_model
    from pact.store.manifest import Store
    from pact.store.safety import load_safety_set

    if not args.dedup_data.is_file():
        return {"skipped": f"{args.dedup_data} not found: the dedup measure needs the shared sst2 set"}
    rows = json.loads(args.dedup_data.read_text(encoding="utf-8"))[: args.dedup_rows]
    data = common.write_jsonl(workdir / "dedup.jsonl", rows)
    model_dir = workdir / "dedup-model"
    common.save_llama(model_dir, DEDUP_MODEL, seed=args.seed)
    store = new_store(workdir / "dedup-store", args.num_safety, DEDUP_MODEL["vocab_size"], args.seed)
    options = precompute.PrecomputeOptions(max_length=1024, batch_size=8, device=args.device, progress=False)
    post_calls: list[dict[str, Any]] = []  # the responses of every post-only call run_precompute made
    example_batches: list[list[Any]] = []  # the examples of every full-context call

    def record_post(original: Callable[..., Any]) -> Callable[..., Any]:
        def post_only(model: Any, responses: dict[str, Any], *rest: Any) -> Any:
            if responses:
                post_calls.append(dict(responses))
            return original(model, responses, *rest)

        return post_only

    def record_full(original: Callable[..., Any]) -> Callable[..., Any]:
        def full_context(model: Any, items: list[Any], *rest: Any) -> Any:
            example_batches.append(list(items))
            return original(model, items, *rest)

        return full_context

    os.environ["PACT_CACHE_DIR"] = str(workdir / "dedup-cache")
    with wrapped(precompute.compute, "post_only_targets", record_post), wrapped(precompute.compute, "full_context_targets", record_full):
        summary = precompute.run_precompute(model_dir, data, store, options, echo=lambda line: None)
    tokenizer, _, header = encoded_examples(model_dir, data, options.max_length)
    # Without dedup: every example batch runs the post-only passes of all its examples.
    no_dedup_calls = [{item.example_id: item.response_ids for item in items} for items in example_batches]
    # Dedup per example batch (before the queue): each batch runs its new responses' passes.
    per_batch_calls: list[dict[str, Any]] = []
    seen: set[str] = set()
    for items in example_batches:
        new = {item.response_hash: item.response_ids for item in items if item.response_hash not in seen}
        seen.update(new)
        if new:
            per_batch_calls.append(new)

    def passes(calls: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [[len(header) + len(ids) - 1 for ids in call.values()] for call in calls]
        return {
            "sequences": sum(len(call) for call in calls),
            "tokens": sum(sum(lens) for lens in lengths),
            "calls": len(calls),
            "batches": sum(len(precompute.plan_batches(lens, options.batch_size)) for lens in lengths),
        }

    counted, per_batch, without = passes(post_calls), passes(per_batch_calls), passes(no_dedup_calls)
    # Both sets of calls replayed through the real function, alternated after a warm-up.
    model = load_model(model_dir, dtype=options.dtype, device=args.device)
    safety_ids = torch.from_numpy(load_safety_set(Store(store)).token_ids.astype("int64")).to(args.device)

    def replay(calls: list[dict[str, Any]]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for call in calls:
                    precompute.compute.post_only_targets(model, call, header, safety_ids, tokenizer.pad_token_id, args.device, options)

        return run

    candidates = {"dedup": replay(post_calls), "per_batch": replay(per_batch_calls), "no_dedup": replay(no_dedup_calls)}
    common.alternate(candidates, 1)
    seconds = common.alternate(candidates, args.repeats)
    for name, block in (("dedup", counted), ("per_batch", per_batch), ("no_dedup", without)):
        block["seconds"] = common.summarize(seconds[name])["median_s"]
    result = {
        "data": str(args.dedup_data),
        "rows": len(rows),
        "examples": summary.examples,
        "distinct_responses": summary.responses_computed,
        "full_context_sequences": summary.computed,
        "post_only_with_dedup": counted,
        "post_only_per_example_batch": per_batch,
        "post_only_without_dedup": without,
        # post-only forward calls: now, before the queue, without dedup, and ceil(distinct / batch)
        "forward_calls": {
            "queued": counted["batches"],
            "per_example_batch": per_batch["batches"],
            "no_dedup": without["batches"],
            "full_batches": math.ceil(summary.responses_computed / options.batch_size),
        },
        "goal": DEDUP_GOAL,
    }
    for key in ("sequences", "tokens", "calls", "batches", "seconds"):
        result[f"saving_{key}"] = 1.0 - counted[key] / without[key] if without[key] else 0.0
    result["meets_goal"] = result["saving_sequences"] >= DEDUP_GOAL
    return result


# ----------------------------------------------------------------------------- 3. memory vs vocab


def _memory_start(device: str) -> float:
    """Reset the peak and return the memory in use now (MiB): CUDA allocated, or this process's RSS."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    common.reset_peak_rss()
    return common.process_memory_mb()["rss_mb"]


def _memory_peak(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return common.process_memory_mb()["peak_mb"]


def _naive_pass(model: Any, ids: Any, mask: Any, starts: list[int], lengths: list[int], safety_ids: Any) -> list[Any]:
    """What a reference pass does without the chunked head: full logits [B, L, V], a float32
    log-softmax over them, then the safety log-probs and entropy at the response steps."""
    import torch

    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return [
        (logprobs[row, start : start + n][:, safety_ids], entropy[row, start : start + n])
        for row, (start, n) in enumerate(zip(starts, lengths, strict=True))
    ]


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One (mode, vocab, batch) point in this fresh process: the increase of memory (MiB) over
    the start of the reference passes, chunked (`run_precompute`) or naive (full logits)."""
    import torch
    from transformers.utils import logging as transformers_logging

    import pact.pipeline.precompute as precompute
    from pact.core.encoding import post_only_ids
    from pact.core.lm_head import HEAD_CHECK_TOKENS
    from pact.core.models import load_model

    transformers_logging.disable_progress_bar()
    if spec["pin_mmap_threshold"]:
        common.pin_mmap_threshold()
    os.environ["PACT_CACHE_DIR"] = spec["cache_dir"]
    device, marks = spec["device"], {}
    model_dir, data = Path(spec["model_dir"]), Path(spec["data"])
    if spec["mode"] == "chunked":
        store = new_store(Path(spec["store"]), spec["num_safety"], spec["vocab_size"], spec["seed"])
        options = precompute.PrecomputeOptions(
            max_length=spec["seq_len"], batch_size=spec["batch_size"], chunk_positions=spec["chunk_positions"],
            device=device, progress=False,
        )  # fmt: skip

        def measured(original: Callable[..., Any]) -> Callable[..., Any]:
            def compute(*a: Any, **k: Any) -> Any:
                marks["start"] = _memory_start(device)
                result = original(*a, **k)
                marks["peak"] = _memory_peak(device)
                return result

            return compute

        with wrapped(precompute.run, "compute_targets", measured):
            precompute.run_precompute(model_dir, data, store, options, echo=lambda line: None)
    else:
        tokenizer, encoded, header = encoded_examples(model_dir, data, spec["seq_len"])
        model = load_model(model_dir, device=device)
        safety_ids = torch.arange(1, spec["num_safety"] + 1, device=device)
        pad = tokenizer.pad_token_id
        post = [post_only_ids(header, e.response_ids)[0] for e in encoded]
        full_ids, full_mask = precompute.pad_batch([e.input_ids for e in encoded], pad, device)
        post_ids, post_mask = precompute.pad_batch(post, pad, device)
        lengths = [e.response_length for e in encoded]
        with torch.inference_mode():  # the warm-up precompute's probe gives its passes
            probe = torch.from_numpy(encoded[0].input_ids[None, :HEAD_CHECK_TOKENS]).to(device)
            model(input_ids=probe, use_cache=False)
        marks["start"] = _memory_start(device)
        with torch.inference_mode():
            _naive_pass(model, full_ids, full_mask, [e.response_start - 1 for e in encoded], lengths, safety_ids)
            _naive_pass(model, post_ids, post_mask, [len(header) - 1] * len(encoded), lengths, safety_ids)
        marks["peak"] = _memory_peak(device)
    return {"start_mb": marks["start"], "peak_mb": marks["peak"], "increase_mb": marks["peak"] - marks["start"]}


def memory_points(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(vocab, batch): every vocab at the middle batch, every batch at the middle vocab."""
    middle_vocab, middle_batch = args.memory_vocabs[1], args.memory_batches[1]
    points = [(vocab, middle_batch) for vocab in args.memory_vocabs]
    return points + [(middle_vocab, batch) for batch in args.memory_batches if batch != middle_batch]


def measure_memory(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Chunked vs naive at every point, each in a fresh process, rounds alternated."""
    models = {}
    for vocab in args.memory_vocabs:
        model_dir = workdir / f"memory-model-{vocab}"
        model = dict(args.memory_body, vocab_size=vocab)
        models[vocab] = (model_dir, common.save_llama(model_dir, model, seed=args.seed, max_positions=max(args.memory_seq_len, 128)))
    tokenizer_dir = models[args.memory_vocabs[0]][0]
    data = {
        batch: _write_rows(tokenizer_dir, workdir / f"memory-{batch}.jsonl", batch, args.memory_prompt_tokens,
                           args.memory_seq_len, args.seed)
        for batch in args.memory_batches
    }
    points = memory_points(args)
    candidates = [(point, mode) for point in points for mode in ("chunked", "naive")]
    increases: dict[tuple[tuple[int, int], str], list[float]] = {key: [] for key in candidates}
    runner = common.ForkedRunner()
    counter = iter(range(10**6))
    for round_index in range(args.repeats):
        for (vocab, batch), mode in candidates if round_index % 2 == 0 else reversed(candidates):
            print(f"memory round {round_index + 1}/{args.repeats}: vocab {vocab}, batch {batch}, {mode}", file=sys.stderr, flush=True)
            spec = {
                "mode": mode, "model_dir": str(models[vocab][0]), "data": str(data[batch]),
                "store": str(workdir / f"memory-store-{next(counter)}"), "cache_dir": str(workdir / "memory-cache"),
                "vocab_size": vocab, "batch_size": batch, "seq_len": args.memory_seq_len,
                "chunk_positions": args.chunk_positions, "num_safety": args.num_safety, "seed": args.seed,
                "device": args.device, "pin_mmap_threshold": not args.default_malloc,
            }  # fmt: skip
            increases[((vocab, batch), mode)].append(runner.run(memory_child, spec).value["increase_mb"])
    rows = []
    for vocab, batch in points:
        chunked = statistics.median(increases[((vocab, batch), "chunked")])
        naive = statistics.median(increases[((vocab, batch), "naive")])
        positions = batch * args.memory_seq_len
        rows.append({
            "vocab_size": vocab, "batch_size": batch, "seq_len": args.memory_seq_len, "positions": positions,
            "chunk_positions": args.chunk_positions,
            "one_full_logits_mb": positions * vocab * 4 / 2**20,
            "one_chunk_logits_mb": min(args.chunk_positions, positions) * vocab * 4 / 2**20,
            "weights_mb": models[vocab][1]["parameters"] * 4 / 2**20,
            "chunked_mb": chunked, "naive_mb": naive, "naive_over_chunked": naive / chunked if chunked > 0 else None,
            "chunked_all_mb": [round(v, 1) for v in increases[((vocab, batch), "chunked")]],
            "naive_all_mb": [round(v, 1) for v in increases[((vocab, batch), "naive")]],
        })  # fmt: skip
    by_batch = sorted((r for r in rows if r["vocab_size"] == args.memory_vocabs[1]), key=lambda r: r["batch_size"])
    smallest, largest = by_batch[0], by_batch[-1]
    return {
        "body": args.memory_body,
        "points": rows,
        "measure": "CUDA max allocated" if args.device.startswith("cuda") else (
            "peak RSS (VmHWM, reset at the start of the passes) minus RSS then, glibc "
            + ("default (dynamic mmap threshold)" if args.default_malloc else "mmap threshold pinned at 128 KiB")
        ),
        "batch_growth": {
            "batches": [smallest["batch_size"], largest["batch_size"]],
            "chunked": largest["chunked_mb"] / smallest["chunked_mb"] if smallest["chunked_mb"] > 0 else None,
            "naive": largest["naive_mb"] / smallest["naive_mb"] if smallest["naive_mb"] > 0 else None,
        },
    }


# ----------------------------------------------------------------------------- output


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of the measures in `result` (the summary, then memory)."""
    o, d, m = result.get("overhead"), result.get("dedup"), result.get("memory")
    rows = []
    if o is not None:
        rows += [
            ["pact precompute (end to end)", f"{common.fmt(o['precompute']['median_s'])} s", f"{common.fmt(o['precompute_over_bare'])}x bare",
             f"goal <= {OVERHEAD_GOAL}x: {'met' if o['meets_goal'] else 'MISSED'}"],
            ["  its compute loop", f"{common.fmt(o['precompute_compute_loop']['median_s'])} s", f"{common.fmt(o['compute_loop_over_bare'])}x bare",
             f"fixed cost {common.fmt(o['fixed_cost_s'])} s (load, hash, probe, parts)"],
            ["bare forward passes", f"{common.fmt(o['bare_forward']['median_s'])} s", "1",
             f"{o['examples']} examples, {o['forward_batches']['full']} + {o['forward_batches']['post']} batches"],
        ]  # fmt: skip
    if d is not None and "skipped" in d:
        rows.append(["post-only dedup", "skipped", "", d["skipped"]])
    elif d is not None:
        w, pb, wo, calls = d["post_only_with_dedup"], d["post_only_per_example_batch"], d["post_only_without_dedup"], d["forward_calls"]
        rows.append(["post-only passes, dedup", f"{w['sequences']:,} seq", f"{common.fmt(100 * d['saving_sequences'])}% fewer",
                     f"goal >= {100 * DEDUP_GOAL:.0f}%: {'met' if d['meets_goal'] else 'MISSED'}; {d['rows']:,} rows, "
                     f"{d['distinct_responses']:,} distinct responses"])
        rows.append(["post-only passes, no dedup", f"{wo['sequences']:,} seq", "",
                     f"tokens {common.fmt(100 * d['saving_tokens'])}% fewer; {common.fmt(w['seconds'])} s vs {common.fmt(wo['seconds'])} s"])
        rows.append(["post-only forward calls", f"{calls['queued']:,}", f"{common.fmt(calls['queued'] / calls['per_example_batch'])}x per batch",
                     f"per example batch {calls['per_example_batch']:,} ({common.fmt(pb['seconds'])} s); no dedup {calls['no_dedup']:,}; "
                     f"ceil(distinct / batch) = {calls['full_batches']:,}"])
    summary = common.markdown_table(["measure", "value", "ratio", "note"], rows) if rows else ""
    if m is None:
        return summary
    memory_rows = [
        [f"{p['vocab_size']:,}", f"{p['batch_size']} x {p['seq_len']}", f"{p['one_full_logits_mb']:,.0f}",
         f"{p['chunked_mb']:,.0f}", f"{p['naive_mb']:,.0f}",
         f"{common.fmt(p['naive_over_chunked'])}x" if p["naive_over_chunked"] else "n/a"]
        for p in m["points"]
    ]
    memory = common.markdown_table(["vocab", "batch x seq", "one [B,L,V] fp32 MiB", "chunked +MiB", "naive +MiB", "naive / chunked"], memory_rows)
    return summary + "\n\n" + memory if summary else memory


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All measurements; the JSON payload."""
    parameters = ("device", "num_safety", "examples", "seq_len", "prompt_tokens", "batch_size", "repeats", "dedup_rows",
                  "memory_seq_len", "chunk_positions", "default_malloc", "seed")
    with common.bench_run(args, "precompute", parameters=parameters, torch_threads=True) as (workdir, result):
        measures = {"overhead": measure_overhead, "dedup": measure_dedup, "memory": measure_memory}
        for name in MEASURES:
            if not args.only or name in args.only:
                result[name] = measures[name](args, workdir)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    o = result.get("overhead")
    header = [] if o is None else [
        f"overhead model: {o['model_parameters'] / 1e6:.1f}M parameters, {args.device}; "
        f"{o['examples']} examples x {args.seq_len} tokens, batch {args.batch_size}; median of {args.repeats} alternated rounds"
    ]
    return common.finish("bench_precompute", argv, args.out, result, *header, tables(result))


if __name__ == "__main__":
    sys.exit(main())
