"""Shared helpers of the benchmark scripts.

- `alternate`: time several candidates in alternated rounds (A B, B A, A B, ...) so a
  load change on the machine hits all of them alike; `summarize` gives median/max.
- `peak_rss_mb`: peak resident memory of a snippet run in a fresh subprocess.
- `synthetic_store`: a store written with the real writer (`pact.store.targets.TargetWriter`),
  random log-probs, response lengths drawn uniformly in [1, max_steps].
- `machine`, `markdown_table`, `write_json`, `finish`: what every script prints/writes;
  `base_parser` (a `BenchParser`) and `apply_sizes`: the options and checks the scripts
  share; `bench_run`: a run's work directory (`bench_workdir`) and the payload's frame
  (the run's parameters included).
- `ForkedRunner`: a function in a fresh process per call, forked from a server that has
  already imported torch/transformers (seconds of start-up saved per process);
  `process_memory_mb` / `reset_peak_rss` read and reset a process's peak RSS,
  `pin_mmap_threshold` makes it follow the live memory (glibc).
- `llama_config`, `save_llama`, `synthetic_rows`, `write_jsonl`: a model shape, a random
  Llama with the local test tokenizer, and prompt/completion data of given token lengths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pact.store.manifest import Store
from pact.store.safety import TOKENS_SCHEMA, safety_set_from_vector, save_safety_set
from pact.store.targets import TargetWriter

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


# -- timing ---------------------------------------------------------------------------


def alternate(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Call every candidate once per round; even rounds in the given order, odd rounds reversed.

    Returns seconds per call: {name: [round 0, round 1, ...]}.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(candidates)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            candidates[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median, min and max of repeated timings (seconds), plus the raw list."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "runs": len(seconds),
        "all_s": [round(s, 6) for s in seconds],
    }


# -- memory ---------------------------------------------------------------------------


_MARKER = "__VMHWM_KIB__"
_RSS_PROBE = """
import sys
exec(compile(sys.argv[1], "<bench snippet>", "exec"), {"__name__": "__bench__"})
with open("/proc/self/status") as status:
    print("\\n__VMHWM_KIB__", next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def peak_rss_mb(code: str, *, timeout_s: float = 600.0) -> float:
    """Peak resident set size (MiB) of the snippet `code` run in a fresh Python process
    started from the repo root.

    Read from the child's own `/proc/self/status` (VmHWM, Linux) once the snippet is
    done: the high-water mark of the process image after exec, so neither the parent's
    memory (shared before exec) nor other processes count. A failing snippet raises
    RuntimeError with the last line of its stderr.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, code], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no stderr)"]
        raise RuntimeError(f"peak-RSS probe failed (exit {done.returncode}): {lines[-1]}")
    found = re.findall(rf"^{_MARKER} (\d+)$", done.stdout, flags=re.MULTILINE)
    if not found:
        raise RuntimeError("peak-RSS probe printed no VmHWM (not Linux?)")
    return int(found[-1]) / 1024.0


# -- synthetic stores -------------------------------------------------------------------

VOCAB_SIZE = 32000


@dataclass
class StoreStats:
    """What writing a synthetic store cost: sizes in bytes, time in seconds (writer calls only)."""

    examples: int
    steps: int
    targets_bytes: int
    post_bytes: int
    write_s: float
    lengths: dict[str, int]  # example_id -> response steps

    @property
    def total_bytes(self) -> int:
        return self.targets_bytes + self.post_bytes


def write_safety_tokens(
    store: Store, num_safety: int, seed: int = 0, vocab_size: int = VOCAB_SIZE
) -> np.ndarray:
    """Save a random safety set of `num_safety` ids in a `vocab_size` vocabulary (32k by
    default); return the ids [S]."""
    rng = np.random.default_rng(seed)
    vector = np.zeros(vocab_size, np.float32)
    ids = np.sort(rng.choice(np.arange(1, vocab_size), num_safety, replace=False))
    vector[ids] = rng.standard_normal(num_safety).astype(np.float32) + 1e-3
    safety = safety_set_from_vector(vector)
    values = vector[safety.token_ids].astype(float)
    table = pa.table(
        {
            "token_id": safety.token_ids,
            "idx": np.arange(safety.size, dtype=np.int32),
            "token": [f"tok{i}" for i in safety.token_ids.tolist()],
            "aligned_prob": rng.random(safety.size),
            "base_prob": rng.random(safety.size),
            "score": values,
            "value": values,
            "weight": safety.weights.astype(float),
            "rank": (np.argsort(np.argsort(-values)) + 1).astype(np.int32),
        },
        schema=TOKENS_SCHEMA,
    )
    save_safety_set(store, safety, table, {"aligned_model": "synthetic"})
    return safety.token_ids


def _logprobs(rng: np.random.Generator, steps: int, num_safety: int) -> np.ndarray:
    """Full-vocabulary log-probs of S [steps, S]: a softmax over S times a random in-S mass."""
    logits = rng.normal(0.0, 3.0, (steps, num_safety))
    top = logits.max(axis=1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return (log_softmax + np.log(rng.uniform(0.01, 1.0, (steps, 1)))).astype(np.float32)


def synthetic_store(
    root: str | os.PathLike,
    *,
    num_safety: int = 50,
    examples: int | None = None,
    min_steps_total: int | None = None,
    max_steps: int = 64,
    value_dtype: str = "float32",
    seed: int = 0,
    perturb: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> StoreStats:
    """Write a store of random targets with the real writer; one distinct response per example.

    Give `examples` (a count) or `min_steps_total` (add examples until the response steps
    reach it). Response lengths are uniform in [1, max_steps]. The same `seed` gives the
    same example ids, hashes and lengths; `perturb` > 0 adds N(0, perturb) noise to the
    log-probs (capped at 0), i.e. a second "run" over the same examples.
    """
    if (examples is None) == (min_steps_total is None):
        raise ValueError("give exactly one of examples / min_steps_total")
    store = Store(root)
    write_safety_tokens(store, num_safety, seed)
    rng = np.random.default_rng(seed)
    noise = np.random.default_rng(seed + 1_000_003)
    writer = TargetWriter(store, num_safety, value_dtype=value_dtype)
    write_s = 0.0
    count = steps_total = 0
    lengths: dict[str, int] = {}
    while (count < examples) if examples is not None else (steps_total < min_steps_total):
        steps = int(rng.integers(1, max_steps + 1))
        example_id, token_hash, response_hash = (rng.bytes(8).hex() for _ in range(3))
        token_ids = rng.integers(0, VOCAB_SIZE, steps).astype(np.int64)
        token_logprobs = -rng.exponential(1.0, steps).astype(np.float32)
        entropy = rng.uniform(0.0, 5.0, steps).astype(np.float32)
        full = _logprobs(rng, steps, num_safety)
        post = _logprobs(rng, steps, num_safety)
        if perturb > 0:
            full = np.minimum(full + noise.normal(0, perturb, full.shape), 0).astype(np.float32)
            post = np.minimum(post + noise.normal(0, perturb, post.shape), 0).astype(np.float32)
        start = time.perf_counter()
        writer.add_post(response_hash, post)
        writer.add_example(example_id, token_hash, response_hash, token_ids, token_logprobs, entropy, full)
        write_s += time.perf_counter() - start
        count += 1
        steps_total += steps
        lengths[example_id] = steps
        if progress is not None:
            progress(1)
    start = time.perf_counter()
    writer.close()
    write_s += time.perf_counter() - start
    sizes = {"targets": 0, "post": 0}
    for part in store.read_manifest()["parts"]:
        sizes[part["kind"]] += part["bytes"]
    return StoreStats(count, steps_total, sizes["targets"], sizes["post"], write_s, lengths)


# -- output ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    versions = {}
    for package in ("numpy", "pyarrow", "duckdb", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": mem_total_gib,
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": versions,
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (pipes aligned), ready to paste into docs/benchmarks.md."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON to `path` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


class BenchParser(argparse.ArgumentParser):
    """A benchmark script's parser (made by `base_parser`): `add_store_shape` adds the shape
    options of the synthetic stores, and `parse_args` runs the checks every script shares."""

    def add_store_shape(self, *, max_steps: bool = False) -> None:
        """--num-safety (|S| of the synthetic safety set, default 50) and, with `max_steps`,
        --max-steps (the longest synthetic response, default 64)."""
        self.add_argument("--num-safety", type=positive_int, default=50, help="|S| (default: %(default)s)")
        if max_steps:
            self.add_argument("--max-steps", type=positive_int, default=64, help="longest response (default: %(default)s)")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """Parse, then refuse a --workdir that holds files (`check_workdir`) and, where the
        script has a --device option, resolve it with `pact.core.models.resolve_device`
        ("auto": CUDA when available); a device it refuses is a usage error."""
        parsed = super().parse_args(args, namespace)
        check_workdir(self, parsed.workdir)
        if "device" in vars(parsed):
            from pact.core.errors import PactError
            from pact.core.models import resolve_device

            try:
                parsed.device = resolve_device(parsed.device)
            except PactError as exc:
                self.error(str(exc))
        return parsed


def base_parser(name: str, description: str) -> BenchParser:
    """The options every benchmark script has: --quick, --out, --repeats, --workdir, --seed."""
    parser = BenchParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test); numbers mean nothing")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / f"{name.removeprefix('bench_')}.json",
        help="where to write the JSON results (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=positive_int, default=None, help="alternated rounds per measurement (>= 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="empty directory to build the synthetic stores in, kept afterwards (default: a temporary directory, deleted at the end)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    return parser


def check_workdir(parser: argparse.ArgumentParser, workdir: Path | None) -> None:
    """Refuse a --workdir that holds files: the stores are built from scratch there (and kept)."""
    if workdir is None:
        return
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        parser.error(f"--workdir {workdir} is not an empty directory; give a new or empty one")


def apply_sizes(args: argparse.Namespace, sizes: dict[str, Any], defaults: tuple[str, ...], fixed: tuple[str, ...] = ()) -> None:
    """Take the size preset `sizes` (quick/CPU/GPU): every name of `defaults` the command line
    left unset (None), and every name of `fixed` whatever it says."""
    for name in defaults:
        if getattr(args, name) is None:
            setattr(args, name, sizes[name])
    for name in fixed:
        setattr(args, name, sizes[name])


@contextlib.contextmanager
def bench_workdir(workdir: Path | None, prefix: str, *, hash_cache: bool) -> Iterator[Path]:
    """The benchmark's work directory (a temporary one, removed after, when `workdir` is
    None). PACT_CACHE_DIR is restored afterwards; with `hash_cache` it points into the
    work directory meanwhile, so weight hashes stay out of the user's ~/.cache."""
    path = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    path.mkdir(parents=True, exist_ok=True)
    previous_cache = os.environ.get("PACT_CACHE_DIR")
    if hash_cache:
        os.environ["PACT_CACHE_DIR"] = str(path / "cache")
    try:
        yield path
    finally:
        if previous_cache is None:
            os.environ.pop("PACT_CACHE_DIR", None)
        else:
            os.environ["PACT_CACHE_DIR"] = previous_cache
        if workdir is None:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def bench_run(
    args: argparse.Namespace, benchmark: str, *, hash_cache: bool = False, parameters: tuple[str, ...] = (),
    torch_threads: bool = False,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A run of benchmark `benchmark`: yields its work directory (`bench_workdir` of
    --workdir, prefix `pact-bench-<benchmark>-`) and the JSON payload, begun with the
    benchmark's name, --quick, `machine()` and `parameters`: the options named in
    `parameters` (from `args`), plus torch's thread count with `torch_threads`. On a
    normal exit the payload's last key `seconds_total` is the time since entry."""
    started = time.time()
    with bench_workdir(args.workdir, f"pact-bench-{benchmark}-", hash_cache=hash_cache) as workdir:
        result: dict[str, Any] = {"benchmark": benchmark, "quick": args.quick, "machine": machine()}
        result["parameters"] = {name: getattr(args, name) for name in parameters}
        if torch_threads:
            import torch

            result["parameters"]["torch_threads"] = torch.get_num_threads()
        yield workdir, result
        result["seconds_total"] = time.time() - started


def finish(name: str, argv: list[str] | None, out: Path, result: dict[str, Any], *texts: str) -> int:
    """The end of every script's `main`: record the command line in `result`, print `texts`
    (a summary line, the table), write the JSON to `out` and say where. Returns 0 (the exit status)."""
    result["command"] = f"python -m bench.{name} " + " ".join(sys.argv[1:] if argv is None else argv)
    for text in texts:
        print(text)
    path = write_json(out, result)
    print(f"\nwrote {path}")
    return 0


def fmt(value: float, digits: int = 3) -> str:
    """A number with `digits` significant digits, thousands separated when large."""
    if value >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


# -- fresh processes without the import cost -------------------------------------------


def process_memory_mb() -> dict[str, float]:
    """This process's resident set now (`rss_mb`) and its high-water mark (`peak_mb`), MiB
    (VmRSS / VmHWM of /proc/self/status, Linux)."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                found[key] = int(value.split()[0]) / 1024.0
    return {"rss_mb": found["VmRSS"], "peak_mb": found["VmHWM"]}


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (writes 5 to /proc/self/clear_refs), so
    `process_memory_mb()["peak_mb"]` afterwards is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
DEFAULT_MMAP_THRESHOLD = 128 * 1024


def pin_mmap_threshold(threshold: int = DEFAULT_MMAP_THRESHOLD) -> None:
    """Fix glibc's mmap threshold for this process (mallopt M_MMAP_THRESHOLD).

    By default glibc raises the threshold to the size of each freed mmapped block (up to
    32 MiB), so later blocks of that size come from the heap and stay resident after
    they are freed: the peak RSS then depends on the order of earlier frees, by 10% and
    more for a training step. Pinned, every block >= `threshold` is mapped and unmapped
    with its tensor, and the peak RSS follows the live memory (as CUDA's max allocated
    does). RuntimeError where mallopt is unavailable or refuses (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, threshold):
        raise RuntimeError("cannot pin the mmap threshold: glibc mallopt is unavailable")


@dataclass
class ChildResult:
    """What a function returned in a fresh process, and that process's memory (MiB)."""

    value: Any
    start_rss_mb: float  # resident set when the function started (the preloaded imports)
    peak_rss_mb: float  # VmHWM of the process when the function returned


def _child_entry(function: Callable[..., Any], args: tuple, connection: Any) -> None:
    try:
        start = process_memory_mb()["rss_mb"]
        value = function(*args)
        connection.send(("ok", value, start, process_memory_mb()["peak_mb"]))
    except BaseException as exc:  # reported to the parent as one line
        connection.send(("error", f"{type(exc).__name__}: {exc}", 0.0, 0.0))
    finally:
        connection.close()


# A forked child re-imports the parent's `python -m bench.x` module as __mp_main__; runpy
# then warns that the module is already in sys.modules. Harmless here: keep the log clean.
warnings.filterwarnings("ignore", message=r".*found in sys\.modules after import of package", category=RuntimeWarning)


# What the forkserver imports once; every ForkedRunner of a process shares one server.
TORCH_PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama", "peft",
                 "pact.pipeline.precompute", "pact.trainer.train")


class ForkedRunner:
    """Runs a function in a fresh process per call, forked from a server that imported
    `preload` once (multiprocessing's forkserver).

    Each call is a new process with its own peak RSS, like `peak_rss_mb`, but starts in
    well under a second instead of paying the Python start and the torch/transformers
    imports (10-20 s on a loaded 2-core machine). The server runs nothing but imports, so
    no torch thread pool or CUDA context is inherited. `function` must be a module-level
    function and its arguments and result picklable. The forkserver is per Python process:
    `preload` only applies if no forkserver is running yet (so all runners use the default).
    """

    def __init__(self, preload: tuple[str, ...] = TORCH_PRELOAD) -> None:
        import multiprocessing

        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(preload))

    def run(self, function: Callable[..., Any], *args: Any, timeout_s: float = 600.0) -> ChildResult:
        """`function(*args)` in a fresh process; RuntimeError with the child's exception line
        when it raised, died, or ran past `timeout_s`."""
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_child_entry, args=(function, args, send))
        process.start()
        send.close()
        try:
            if not receive.poll(timeout_s):
                process.kill()
                raise RuntimeError(f"{function.__name__} ran past {timeout_s:g} s in its child process")
            try:
                status, value, start, peak = receive.recv()
            except EOFError:
                process.join()
                raise RuntimeError(f"{function.__name__}: child process died (exit {process.exitcode})") from None
        finally:
            receive.close()
            process.join()
        if status != "ok":
            raise RuntimeError(f"{function.__name__} failed in its child process: {value}")
        return ChildResult(value, start, peak)


# -- local models and data -------------------------------------------------------------

WORDS = (
    "the a movie film review great terrible story cat dog fox quick brown lazy jumps over "
    "sure here is how to do it first you take thing and then other cannot help with that "
    "request sorry hello world how are you today tell me about positive negative neutral"
).split()


def llama_config(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, int]:
    """The `LlamaConfig` keyword arguments of a model's shape (for `save_llama`)."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads)


def save_llama(directory: str | os.PathLike, model: dict[str, Any], *, seed: int = 0, max_positions: int = 512) -> dict[str, Any]:
    """A LlamaForCausalLM with random weights from `LlamaConfig(**model)` (untied head) and
    the local byte-level BPE tokenizer of tests/tiny.py, saved (safetensors) to `directory`.

    The model's vocabulary may be larger than the tokenizer's (~260 tokens): the extra
    rows are never fed as input but take part in every softmax, so the compute and
    memory are those of a `vocab_size` model. Returns parameters, vocab size, config.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_tokenizer

    directory = Path(directory)
    tokenizer = make_tokenizer(directory)
    if model["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {model['vocab_size']} is below the tokenizer's {len(tokenizer)} tokens")
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=max_positions, tie_word_embeddings=False, **model)
    llama = LlamaForCausalLM(config)
    llama.save_pretrained(str(directory), safe_serialization=True)
    return {"parameters": sum(p.numel() for p in llama.parameters()), "vocab_size": model["vocab_size"], "config": dict(model)}


def _words_of_tokens(tokenizer: Any, rng: np.random.Generator, tokens: int) -> str:
    """Random words from WORDS cut to `tokens` tokens of `tokenizer` (re-encoding may shift it by one or two)."""
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words += list(rng.choice(WORDS, 16))
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids).strip()


def synthetic_rows(tokenizer: Any, count: int, prompt_tokens: int, response_tokens: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct prompt/completion rows of random words, about `prompt_tokens` and
    `response_tokens` tokens long; with max_length = prompt + response (+ template tokens)
    the shared encoding cuts each response to fill the sequence exactly."""
    rng = np.random.default_rng(seed)
    return [
        {
            "id": f"ex-{index}",
            "prompt": _words_of_tokens(tokenizer, rng, prompt_tokens),
            "completion": _words_of_tokens(tokenizer, rng, response_tokens),
        }
        for index in range(count)
    ]


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSON lines; returns the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
