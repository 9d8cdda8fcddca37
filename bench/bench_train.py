"""Training-cost benchmark: plain SFT vs PACT with cached targets vs PACT with the reference
computed online, for full fine-tuning and for LoRA: peak memory and median step time.

One model (a Llama config from `LlamaConfig`: ~45M parameters with a 32k vocabulary on CPU,
~1B on a GPU), the same data, the same batches for every variant. The store's targets are
real: `pact precompute` (`pact.pipeline.precompute.run_precompute`) runs the same model over the
data first. Every measure drives the trainer's own pieces (`pact.trainer.inputs.prepare_inputs`,
`load_student`, `batch_loss`, `pact.trainer.batches.cached_batch`,
`pact.trainer.reference.OnlineReference`) through whole optimizer steps.

- Peak memory: each variant alone in a fresh process (`bench.common.ForkedRunner`), set-up
  plus two optimizer steps, the variants alternated round by round (A..F, F..A, ...); median
  over the rounds. CPU: the process's peak RSS, glibc's mmap threshold pinned
  (`bench.common.pin_mmap_threshold`; `--default-malloc` leaves it dynamic); CUDA:
  `torch.cuda.max_memory_allocated`.
- Step time: per fine-tuning mode one fresh process holds the model and takes the variants'
  steps in alternated order (sft, cached, online, online, cached, sft, ...), all variants
  of a round on the same batch, after a warm-up round; median over the rounds.

Goals: PACT-cached / SFT <= 1.05 for peak memory and <= 1.10 for step time. Online pays
for a second copy of the weights (full fine-tuning; LoRA disables its adapters instead)
and two extra forward passes (full and post-only context) per step.

Run: python -m bench.bench_train [--quick] [--out bench/results/train.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common

MEMORY_GOAL = 1.05
BATCHES = 3  # distinct batches of the data, cycled
STEP_GOAL = 1.10
FINETUNES = ("full", "lora")
# name -> (method, reference)
VARIANTS = {"sft": ("sft", "cached"), "pact-cached": ("pact", "cached"), "pact-online": ("pact", "online")}

CPU = dict(
    model=common.llama_config(32000, 512, 1376, 4, 8, 8),
    batch_size=4, seq_len=128, prompt_tokens=64, rounds=4, memory_steps=2, repeats=3,
)
# --model 100m on CPU: the ~100M config the brief asks for (106M parameters)
CPU_100M = dict(CPU, model=common.llama_config(32000, 768, 2048, 8, 12, 12))
GPU = dict(
    model=common.llama_config(32000, 2048, 5632, 16, 16, 16),
    batch_size=8, seq_len=512, prompt_tokens=256, rounds=10, memory_steps=2, repeats=3,
)
QUICK = dict(
    model=common.llama_config(300, 32, 64, 2, 4, 2),
    batch_size=2, seq_len=32, prompt_tokens=12, rounds=2, memory_steps=2, repeats=2,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser("bench_train", __doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train; auto: CUDA when available (then the ~1B config) (default: %(default)s)")
    parser.add_argument("--model", dest="model_size", choices=("45m", "100m"), default="45m",
                        help="CPU model config: 45m (hidden 512, 4 layers) or 100m (hidden 768, 8 layers; "
                             "~3x the time); ignored on CUDA (~1B) and with --quick (default: %(default)s)")
    parser.add_store_shape()
    parser.add_argument("--batch-size", type=common.positive_int, help="examples per step (default: 4 on CPU, 8 on CUDA)")
    parser.add_argument("--seq-len", type=common.positive_int, help="tokens per example (default: 128 on CPU, 512 on CUDA)")
    parser.add_argument("--rounds", type=common.positive_int, help="alternated step-time rounds after one warm-up round (default: 4 on CPU, 10 on CUDA)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's dynamic mmap threshold on in the memory processes (as in a plain `pact train`); "
                             "by default it is pinned at 128 KiB so the peak RSS follows the live memory")
    parser.add_argument("--memory-steps", type=int, help="optimizer steps per memory process, >= 2 (default: 2)")
    args = parser.parse_args(argv)
    cpu = CPU_100M if args.model_size == "100m" else CPU
    sizes = QUICK if args.quick else GPU if args.device.startswith("cuda") else cpu
    common.apply_sizes(args, sizes, ("batch_size", "seq_len", "rounds", "memory_steps", "repeats"), ("model",))
    if args.memory_steps < 2:
        parser.error(f"--memory-steps must be >= 2 (the second step holds the AdamW states too), got {args.memory_steps}")
    args.prompt_tokens = min(sizes["prompt_tokens"], args.seq_len // 2)
    if args.seq_len - args.prompt_tokens < 8:
        parser.error(f"--seq-len {args.seq_len} leaves no room for a response; give at least 16")
    if args.num_safety >= args.model["vocab_size"]:
        parser.error(f"--num-safety {args.num_safety} must be below the vocabulary ({args.model['vocab_size']})")
    return args


# ----------------------------------------------------------------------------- set-up


def build_world(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Model + tokenizer, data, and a store with the safety set and real targets (pact precompute)."""
    from pact.core.models import load_tokenizer
    from pact.pipeline.precompute import PrecomputeOptions, run_precompute
    from pact.store.manifest import Store

    model_dir = workdir / "model"
    info = common.save_llama(model_dir, args.model, seed=args.seed, max_positions=max(args.seq_len, 128))
    tokenizer = load_tokenizer(model_dir)
    examples = args.batch_size * BATCHES
    rows = common.synthetic_rows(tokenizer, examples, args.prompt_tokens, args.seq_len - args.prompt_tokens, args.seed)
    data = common.write_jsonl(workdir / "train.jsonl", rows)
    store = Store(workdir / "store")
    common.write_safety_tokens(store, args.num_safety, args.seed, vocab_size=args.model["vocab_size"])
    options = PrecomputeOptions(max_length=args.seq_len, device=args.device, batch_size=args.batch_size, progress=False)
    summary = run_precompute(model_dir, data, store.root, options, echo=lambda line: None)
    return {
        "model_dir": str(model_dir), "data": str(data), "store": str(store.root),
        "parameters": info["parameters"], "model_config": info["config"], "examples": examples,
        "response_tokens_per_example": summary.response_tokens / summary.examples,
        "precompute_s": summary.seconds,
    }


# ----------------------------------------------------------------------------- the steps


def _memory_mb(device: str) -> dict[str, float]:
    """CUDA: allocated now / max allocated; CPU: RSS now / peak RSS of this process (MiB)."""
    if device.startswith("cuda"):
        import torch

        return {"now_mb": torch.cuda.memory_allocated() / 2**20, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    memory = common.process_memory_mb()
    return {"now_mb": memory["rss_mb"], "peak_mb": memory["peak_mb"]}


class TrainerSteps:
    """The trainer's set-up for one model and `step(variant, examples)`: one optimizer step
    exactly as `pact train` takes it (cached join or online targets, `batch_loss`, backward,
    clipping, AdamW, zero_grad).

    `method`/`reference` decide what `prepare_inputs` loads (the store's reader for cached
    targets, the safety set for pact); `online` also builds the online reference (a frozen
    copy for full fine-tuning, the adapters disabled for LoRA). Construct it inside
    `pact.trainer.resume.deterministic`, as `pact train` does.
    """

    def __init__(self, spec: dict[str, Any], method: str, reference: str, *, online: bool) -> None:
        import torch
        from transformers.utils import logging as transformers_logging

        from pact.core import models
        from pact.core.encoding import assistant_header_ids
        from pact.trainer.config import TrainConfig
        from pact.trainer.inputs import prepare_inputs
        from pact.trainer.model import autocast_factory, compute_dtype, load_student
        from pact.trainer.reference import OnlineReference

        transformers_logging.disable_progress_bar()
        os.environ["PACT_CACHE_DIR"] = spec["cache_dir"]
        self.config = config = TrainConfig(
            model=spec["model_dir"], data=spec["data"], out=spec["out"], store=spec["store"], method=method,
            reference=reference, finetune=spec["finetune"], batch_size=spec["batch_size"], device=spec["device"],
            seed=spec["seed"], save_every=0,
        )  # fmt: skip
        self.device = device = models.resolve_device(config.device)
        self.inputs = inputs = prepare_inputs(config)
        self.model = model = load_student(config, device)
        self.autocast = autocast_factory(device)
        self.safety_ids = self.weights = self.online = None
        if inputs.safety is not None:
            self.safety_ids = torch.as_tensor(inputs.safety.token_ids, device=device)
            self.weights = torch.as_tensor(inputs.safety.weights, device=device)
        if online:
            lora = config.finetune == "lora"
            reference_model = model if lora else models.load_model(
                config.model, dtype=compute_dtype(device), device=device
            ).requires_grad_(False)
            self.online = OnlineReference(
                reference_model, assistant_header_ids(inputs.tokenizer), self.safety_ids,
                inputs.tokenizer.pad_token_id, adapters_disabled=lora, autocast=self.autocast,
            )  # fmt: skip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        order = _epoch_order(len(inputs.encoded), config.batch_size, config.seed)
        self.batches = [[inputs.encoded[i] for i in indices] for indices in order]

    def batch(self, variant: str, examples: list[Any]) -> Any:
        """The batch `pact train` builds for `variant`: joined with the store's targets
        (pact-cached), with targets computed online (pact-online), or plain (sft)."""
        from pact.trainer.batches import cached_batch, collate

        pad_id = self.inputs.tokenizer.pad_token_id
        if variant == "pact-cached":
            return cached_batch(examples, pad_id, self.inputs.reader).to(self.device)
        batch = collate(examples, pad_id).to(self.device)
        if variant == "pact-online":
            batch.reference = self.online.targets(batch)
        return batch

    def step(self, variant: str, examples: list[Any]) -> tuple[float, float]:
        """One optimizer step of `variant` on `examples`; returns (seconds, loss)."""
        import torch

        from pact.trainer.fused import batch_loss

        started = time.perf_counter()
        batch = self.batch(variant, examples)
        terms = batch_loss(
            self.model, batch, method=VARIANTS[variant][0], kl_weight=self.config.kl_weight, pact=self.config.pact,
            safety_ids=self.safety_ids, weights=self.weights, autocast=self.autocast,
        )  # fmt: skip
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started, float(terms.loss.detach())

    def timed(self, action: Callable[[], object]) -> float:
        """Seconds of `action()` (synchronized on CUDA)."""
        import torch

        started = time.perf_counter()
        action()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started


def _epoch_order(count: int, batch_size: int, seed: int) -> list[list[int]]:
    from pact.trainer.batches import epoch_batches

    return epoch_batches(count, batch_size, seed, 0)


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant alone in this fresh process: the trainer's set-up for it and `steps`
    optimizer steps (>= 2: the second one holds weights, gradients and AdamW states at once).
    Returns memory (MiB: CUDA max allocated, or this process's RSS) and the losses."""
    import torch

    from pact.trainer.resume import deterministic

    method, reference = VARIANTS[spec["variant"]]
    if spec["pin_mmap_threshold"]:
        common.pin_mmap_threshold()
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with deterministic(spec["seed"], spec["device"]):
        steps = TrainerSteps(spec, method, reference, online=spec["variant"] == "pact-online")
        loaded = _memory_mb(steps.device)["now_mb"]
        losses = [steps.step(spec["variant"], steps.batches[i % len(steps.batches)])[1] for i in range(spec["steps"])]
    return {
        "memory_loaded_mb": loaded,
        "memory_peak_mb": _memory_mb(steps.device)["peak_mb"],
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in steps.params),
        "device": steps.device,
    }


def timing_child(spec: dict[str, Any]) -> dict[str, Any]:
    """All variants of one fine-tuning mode on one model in this fresh process, step by step
    in alternated rounds (sft, cached, online, then reversed, ...), every variant of a round
    on the same batch, after one warm-up step each. Also times what online adds alone
    (`OnlineReference.targets`) and one no-grad forward of the full-context batch."""
    import torch

    from pact.trainer.resume import deterministic

    names = list(VARIANTS)
    with deterministic(spec["seed"], spec["device"]):
        steps = TrainerSteps(spec, "pact", "cached", online=True)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        losses: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(spec["rounds"] + 1):  # round 0: warm-up
            examples = steps.batches[round_index % len(steps.batches)]
            for name in names if round_index % 2 == 0 else reversed(names):
                took, loss = steps.step(name, examples)
                if round_index > 0:
                    seconds[name].append(took)
                    losses[name].append(loss)
        online_s, forward_s = [], []
        steps.model.eval()
        for round_index in range(1, spec["rounds"] + 1):
            examples = steps.batches[round_index % len(steps.batches)]
            batch = steps.batch("sft", examples)
            online_s.append(steps.timed(lambda b=batch: steps.online.targets(b)))
            with torch.no_grad(), steps.autocast():
                forward_s.append(steps.timed(lambda b=batch: steps.model(
                    input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)))
    return {"step_s": seconds, "losses": losses, "online_targets_s": online_s, "forward_no_grad_s": forward_s}


# ----------------------------------------------------------------------------- the measure


def measure(args: argparse.Namespace, world: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Memory: every (finetune, variant) alone in a fresh process, rounds alternated.
    Step time: per fine-tuning mode, one fresh process alternating the variants step by step."""
    base = {
        "model_dir": world["model_dir"], "data": world["data"], "store": world["store"],
        "out": str(workdir / "unused-run"), "cache_dir": str(workdir / "cache"),
        "batch_size": args.batch_size, "device": args.device, "seed": args.seed,
    }  # fmt: skip
    runner = common.ForkedRunner()
    names = [(finetune, name) for finetune in FINETUNES for name in VARIANTS]
    memory: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in names}
    for round_index in range(args.repeats):
        for finetune, name in names if round_index % 2 == 0 else reversed(names):
            print(f"memory round {round_index + 1}/{args.repeats}: {finetune} {name}", file=sys.stderr, flush=True)
            spec = dict(base, finetune=finetune, variant=name, steps=args.memory_steps,
                        pin_mmap_threshold=not args.default_malloc)
            child = runner.run(memory_child, spec)
            value = child.value
            # CPU: the process's peak RSS (imports + model + training); CUDA: max allocated.
            value["memory_mb"] = value["memory_peak_mb"] if value["device"].startswith("cuda") else child.peak_rss_mb
            memory[(finetune, name)].append(value)
    timing = {}
    for finetune in FINETUNES:
        print(f"step times: {finetune}, {args.rounds} alternated rounds", file=sys.stderr, flush=True)
        timing[finetune] = runner.run(timing_child, dict(base, finetune=finetune, rounds=args.rounds)).value
    return summarize_runs(memory, timing, world, args)


def summarize_runs(
    memory: dict[tuple[str, str], list[dict[str, Any]]], timing: dict[str, dict[str, Any]],
    world: dict[str, Any], args: argparse.Namespace,
) -> dict[str, Any]:
    """Medians per variant; ratios against SFT (goals) and online against cached."""
    cuda = args.device.startswith("cuda")
    weight_bytes = 2 if cuda else 4  # the online copy of full fine-tuning: bf16 on CUDA, fp32 on CPU
    result: dict[str, Any] = {}
    for finetune in FINETUNES:
        block: dict[str, Any] = {}
        times = timing[finetune]
        for name in VARIANTS:
            values = memory[(finetune, name)]
            block[name] = {
                "memory_mb": statistics.median(v["memory_mb"] for v in values),
                "memory_all_mb": [round(v["memory_mb"], 1) for v in values],
                "memory_loaded_mb": statistics.median(v["memory_loaded_mb"] for v in values),
                "step": common.summarize(times["step_s"][name]),
                "trainable_parameters": values[0]["trainable_parameters"],
                "losses_memory_run": values[0]["losses"],
                "losses_timing_run": times["losses"][name],
            }
        sft, cached, online = block["sft"], block["pact-cached"], block["pact-online"]
        for name, entry in (("pact-cached", cached), ("pact-online", online)):
            entry["memory_over_sft"] = entry["memory_mb"] / sft["memory_mb"]
            entry["step_over_sft"] = entry["step"]["median_s"] / sft["step"]["median_s"]
            paired = [a / b for a, b in zip(times["step_s"][name], times["step_s"]["sft"], strict=True)]
            entry["step_over_sft_paired_median"] = statistics.median(paired)  # round by round
            entry["step_over_sft_min"] = entry["step"]["min_s"] / sft["step"]["min_s"]  # fastest steps
        cached["meets_memory_goal"] = cached["memory_over_sft"] <= MEMORY_GOAL
        cached["meets_step_goal"] = cached["step_over_sft"] <= STEP_GOAL
        online["memory_over_cached"] = online["memory_mb"] / cached["memory_mb"]
        online["extra_memory_mb"] = online["memory_mb"] - cached["memory_mb"]
        online["weights_copy_mb"] = world["parameters"] * weight_bytes / 2**20 if finetune == "full" else 0.0
        online["step_over_cached"] = online["step"]["median_s"] / cached["step"]["median_s"]
        online["extra_step_s"] = online["step"]["median_s"] - cached["step"]["median_s"]
        block["online_targets"] = common.summarize(times["online_targets_s"])
        block["forward_no_grad"] = common.summarize(times["forward_no_grad_s"])
        online["online_targets_over_forward"] = block["online_targets"]["median_s"] / block["forward_no_grad"]["median_s"]
        result[finetune] = block
    result["memory_measure"] = "torch.cuda.max_memory_allocated" if cuda else (
        "peak RSS (VmHWM) of the process, glibc "
        + ("default (dynamic mmap threshold)" if args.default_malloc else "mmap threshold pinned at 128 KiB")
    )
    return result


def table(result: dict[str, Any]) -> str:
    rows = []
    for finetune in FINETUNES:
        block = result["variants"][finetune]
        for name in VARIANTS:
            entry = block[name]
            memory_ratio = "1" if name == "sft" else f"{common.fmt(entry['memory_over_sft'])}x"
            step_ratio = "1" if name == "sft" else f"{common.fmt(entry['step_over_sft'])}x"
            if name == "pact-cached":
                note = (f"memory {'met' if entry['meets_memory_goal'] else 'MISSED'} (<= {MEMORY_GOAL}x), "
                        f"step {'met' if entry['meets_step_goal'] else 'MISSED'} (<= {STEP_GOAL}x); "
                        f"step ratio per round {common.fmt(entry['step_over_sft_paired_median'])}x, of the fastest {common.fmt(entry['step_over_sft_min'])}x")
            elif name == "pact-online":
                note = (f"{entry['extra_memory_mb']:+,.0f} MiB vs cached (weights {entry['weights_copy_mb']:,.0f} MiB); "
                        f"{common.fmt(entry['step_over_cached'])}x cached step; online targets = "
                        f"{common.fmt(entry['online_targets_over_forward'])} forward passes")
            else:
                note = f"one no-grad forward {common.fmt(block['forward_no_grad']['median_s'])} s"
            rows.append([finetune, name, f"{entry['memory_mb']:,.0f}", memory_ratio, common.fmt(entry["step"]["median_s"]), step_ratio, note])
    return common.markdown_table(["finetune", "variant", "peak MiB", "x SFT", "step s", "x SFT", "note"], rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All measurements; the JSON payload."""
    parameters = ("device", "num_safety", "batch_size", "seq_len", "prompt_tokens", "rounds", "memory_steps", "repeats",
                  "default_malloc", "seed")
    with common.bench_run(args, "train", hash_cache=True, parameters=parameters, torch_threads=True) as (workdir, result):
        result["world"] = build_world(args, workdir)
        result["variants"] = measure(args, result["world"], workdir)
    return result


def summary(args: argparse.Namespace, world: dict[str, Any]) -> str:
    """The line above the table: the model, the batch and how many rounds."""
    return (f"model: {world['parameters'] / 1e6:.1f}M parameters, {args.device}; batch {args.batch_size} x {args.seq_len} tokens "
            f"({common.fmt(world['response_tokens_per_example'])} response tokens each); memory: median of {args.repeats} processes; "
            f"step time: median of {args.rounds} alternated steps")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    return common.finish("bench_train", argv, args.out, result, summary(args, result["world"]), table(result))


if __name__ == "__main__":
    sys.exit(main())
