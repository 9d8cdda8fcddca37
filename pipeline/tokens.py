"""Stage 0: which tokens are safety tokens (`pact tokens`).

For the first K safety examples (harmful prompt, refusal) the aligned model A reads
`chat_template(prompt, add_generation_prompt) + refusal` and the base model B reads
`User: {prompt}\\n\\nAssistant: ` + the same refusal ids. At each refusal step t (the
logits that predict refusal token t) p_A,t = softmax(z_A,t / tau), p_B,t likewise.

- score d: mean over examples of (mean over steps of p_A,t - p_B,t)   [p_diff]
           or of p_A,t * (log p_B,t - log p_A,t)                       [pref_logratio]
- mass P: mean over examples of (mean over steps of p_A,t); base mass likewise for p_B.
- keep the top_k tokens by P, zero d elsewhere, standardise the kept entries
  (|d| > 1e-9) by their mean and unbiased std (+1e-6), divide by the L2 norm (+1e-6) -> v.
- S = ids with v != 0 ascending, w = max(v, 0).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pact.core.atomic import atomic_write_bytes
from pact.core.config import check_choice, check_device, check_int, check_number, setting
from pact.core.data import FORMATS, Example, load_examples
from pact.core.encoding import (
    leading_token_ids,
    render,
    template_fingerprint,
    tokenize,
    tokenizer_fingerprint,
)
from pact.core.errors import PactError
from pact.core.models import DTYPES, PARTIAL_WEIGHTS_HELP, check_dir, file_sha256
from pact.store.lock import store_writer
from pact.store.manifest import Store
from pact.store.safety import TOKENS_SCHEMA, SafetySet, safety_set_from_vector, save_safety_set

DIFF_MODES = ("p_diff", "pref_logratio")
KEPT_THRESHOLD = 1e-9  # |d_j| above this counts as non-zero for the standardisation
STD_EPS = 1e-6
NORM_EPS = 1e-6
REFUSALS_FILE = "refusals.jsonl"
BASE_USER_TURN = "User: {content}\n\n"
BASE_ASSISTANT_PREFIX = "Assistant: "
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TokensOptions:
    """Stage-0 options (defaults as in the paper; the CLI builds its options from these
    fields). batch_size changes speed, never results."""

    top_k: int = setting(50, help="Candidate tokens kept, ranked by mean aligned probability (at least 2).")
    max_examples: int = setting(512, help="Use the first K examples with a non-empty refusal, in file order.")
    max_resp_len: int = setting(64, help="Refusal tokens scored per example (R = min(length, this)).")
    temperature: float = setting(1.0, help="Softmax temperature tau applied to both models' logits.")
    diff_mode: str = setting(
        "p_diff", help="Score: p_A - p_B, or p_A * (log p_B - log p_A).", choices=DIFF_MODES
    )
    batch_size: int = setting(8, help="Examples per forward pass (results do not depend on it).")
    dtype: str = setting(
        "auto",
        help="Model weights dtype; auto = float32 on CPU, bfloat16 on CUDA. Softmax and sums are float32.",
        choices=DTYPES,
    )
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    data_format: str | None = setting(
        None, help="Row shape of --data; detected from the first row when omitted.", flag="--format", choices=FORMATS
    )
    trust_remote_code: bool = setting(False, help="Allow model/tokenizer code from the model directories.")
    allow_partial_weights: bool = setting(False, help=PARTIAL_WEIGHTS_HELP)
    generate_refusals: bool = setting(
        False,
        help="Rows without a refusal get one written by the aligned model (greedy), saved as refusals.jsonl in the store.",
    )
    max_new_tokens: int = setting(64, help="Longest generated refusal (with --generate-refusals).")
    force: bool = setting(False, help="Replace the safety set of a store that already holds targets (they go stale).")
    progress: bool = setting(True, help="Show progress bars.", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k < 2:
            raise PactError(
                f"--top-k must be at least 2 (the std of the kept scores is undefined below), got {self.top_k}"
            )
        check_int(self.top_k, "--top-k", 2)
        check_int(self.max_examples, "--max-examples")
        check_int(self.max_resp_len, "--max-resp-len")
        check_number(self.temperature, "--temperature", minimum=0.0, inclusive=False)
        check_choice(self.diff_mode, DIFF_MODES, "--diff-mode")
        check_int(self.batch_size, "--batch-size")
        check_choice(self.dtype, DTYPES, "--dtype")
        check_device(self.device, "--device")
        if self.data_format is not None:
            check_choice(self.data_format, FORMATS, "--format")
        check_int(self.max_new_tokens, "--max-new-tokens")

    def recorded(self) -> dict[str, Any]:
        """The options that decide the result, as recorded in the manifest."""
        return {
            "top_k": self.top_k,
            "max_examples": self.max_examples,
            "max_resp_len": self.max_resp_len,
            "temperature": self.temperature,
            "diff_mode": self.diff_mode,
        }


@dataclass(frozen=True)
class StageZeroInput:
    """Token ids of one safety example; R = len(refusal_ids) >= 1."""

    example_id: str
    aligned_prompt_ids: list[int]
    base_prompt_ids: list[int]
    refusal_ids: list[int]


@dataclass
class SafetyDirection:
    """Stage-0 result over the model vocabulary V (all float32 [V])."""

    vector: np.ndarray  # v: standardised, normalised top-k scores (0 outside S)
    score: np.ndarray  # d: mean score per token before top-k and standardisation
    aligned_mass: np.ndarray  # P: mean aligned probability
    base_mass: np.ndarray  # mean base probability
    examples_used: int
    example_ids: list[str]


def base_prompt_text(messages: Sequence[dict[str, str]]) -> str:
    """The base model's plain prompt: `User: {c}\\n\\n` per user turn, then `Assistant: `.

    System and assistant turns are dropped.
    """
    turns = [BASE_USER_TURN.format(content=m["content"]) for m in messages if m["role"] == "user"]
    return "".join(turns) + BASE_ASSISTANT_PREFIX


def stage_zero_inputs(
    tokenizer: Any, examples: Sequence[Example], options: TokensOptions
) -> list[StageZeroInput]:
    """The first `max_examples` examples (file order) whose stripped refusal is not empty, encoded."""
    inputs: list[StageZeroInput] = []
    for example in examples:
        if len(inputs) >= options.max_examples:
            break
        refusal = example.response.strip()
        if not refusal:
            continue
        refusal_ids = leading_token_ids(tokenizer, refusal, options.max_resp_len)[0][: options.max_resp_len]
        if not refusal_ids:
            continue
        aligned_prompt = tokenize(
            tokenizer, render(tokenizer, list(example.messages), add_generation_prompt=True)
        )
        if not aligned_prompt:
            raise PactError(
                f"example {example.example_id}: the chat-template prompt encodes to no tokens "
                "(the refusal would start at position 0)"
            )
        base_prompt = tokenize(tokenizer, base_prompt_text(example.messages))
        inputs.append(StageZeroInput(example.example_id, aligned_prompt, base_prompt, refusal_ids))
    return inputs


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def response_rows(
    model: Any,
    prompts: Sequence[Sequence[int]],
    refusals: Sequence[Sequence[int]],
    *,
    pad_id: int,
) -> Any:
    """The rows whose logits predict the refusal tokens of a batch, example by example.

    Sequence i is prompts[i] + refusals[i][:-1] (the last refusal token is never an
    input), right-padded, so its positions are 0..n-1 as in an unpadded pass. Step t
    of sequence i is position len(prompts[i]) - 1 + t; the rows come in the order
    (example 0, steps 0..R_0-1), (example 1, ...), ... (`pact.core.lm_head.HeadRows`).
    """
    import torch

    from pact.core.lm_head import selected_rows

    device = _model_device(model)
    prompt_lengths = [len(p) for p in prompts]
    response_lengths = [len(r) for r in refusals]
    if min(prompt_lengths) < 1 or min(response_lengths) < 1:
        raise PactError("a stage-0 sequence has an empty prompt or refusal")
    width = max(p + r - 1 for p, r in zip(prompt_lengths, response_lengths, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    positions = []
    for row, (prompt, refusal) in enumerate(zip(prompts, refusals, strict=True)):
        ids = list(prompt) + list(refusal)[:-1]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        positions += [(row, len(prompt) - 1 + t) for t in range(len(refusal))]
    return selected_rows(
        model, input_ids.to(device), attention.to(device), torch.tensor(positions, dtype=torch.long)
    )


def accumulate_stage_zero(
    rows_a: Any,
    rows_b: Any,
    step_weights: Any,
    sums: tuple[Any, Any, Any],
    *,
    temperature: float,
    diff_mode: str,
    budget: int,
) -> None:
    """Add one batch's per-example step means to the running sums (score d, mass P, base mass).

    rows_a, rows_b: the aligned and base rows (`pact.core.lm_head.HeadRows`) of the same
    (example, step) pairs, N each; step_weights: float32 [N], 1 / (steps of the row's
    example); sums: float32 [V] each, updated in place. p = softmax(logits / temperature)
    in float32, `budget` elements of [rows, V] logits at a time, so no [N, V] tensor exists.
    """
    import torch

    from pact.core.lm_head import logit_chunks

    score_sum, aligned_sum, base_sum = sums
    device = score_sum.device

    def log_softmax(logits: Any) -> Any:
        logits = logits.to(device)
        return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)

    chunks_b = logit_chunks(rows_b, budget)
    for start, stop, logits_a in logit_chunks(rows_a, budget):
        log_a = log_softmax(logits_a)
        del logits_a  # each [rows, V] temporary goes as soon as it is used
        _, _, logits_b = next(chunks_b)
        log_b = log_softmax(logits_b)
        del logits_b
        weights = step_weights[start:stop].to(device)
        if diff_mode == "p_diff":  # the log-probs are not needed again: exponentiate in place
            p_a, p_b = log_a.exp_(), log_b.exp_()
            aligned_sum += p_a.T.mv(weights)
            base_sum += p_b.T.mv(weights)
            score_sum += p_a.sub_(p_b).T.mv(weights)
        else:
            p_a, p_b = log_a.exp(), log_b.exp()
            aligned_sum += p_a.T.mv(weights)
            base_sum += p_b.T.mv(weights)
            score_sum += torch.where(p_a > 0, p_a * (log_b - log_a), torch.zeros_like(p_a)).T.mv(weights)
        del log_a, log_b, p_a, p_b


def direction_from_scores(score: Any, aligned_mass: Any, top_k: int) -> Any:
    """v from d and P (torch float32 [V]): top-k by P, standardise kept entries, L2-normalise."""
    import torch

    vocab = int(score.shape[0])
    if top_k < 2:
        raise PactError(
            f"top_k must be at least 2 (the std of the kept scores is undefined below), got {top_k}"
        )
    if top_k > vocab:
        raise PactError(f"top_k {top_k} exceeds the vocabulary size {vocab}")
    if not (bool(torch.isfinite(score).all()) and bool(torch.isfinite(aligned_mass).all())):
        raise PactError("stage-0 scores are not finite (try --dtype float32)")
    top = torch.topk(aligned_mass, top_k).indices
    d = torch.zeros_like(score)
    d[top] = score[top]
    kept = d.abs() > KEPT_THRESHOLD
    count = int(kept.sum())
    if count < 2:
        raise PactError(
            f"{'empty' if count == 0 else 'degenerate'} safety set: {count} of the top-{top_k} "
            "tokens by aligned probability score "
            f"|d| > {KEPT_THRESHOLD:g}; at least 2 are needed (are the aligned and base models the same?)"
        )
    values = d[kept]
    d[kept] = (values - values.mean()) / (values.std(unbiased=True) + STD_EPS)
    vector = d / (torch.linalg.vector_norm(d) + NORM_EPS)
    if not bool((vector != 0).any()):
        raise PactError(
            "empty safety set: the kept scores are all equal, so the standardised vector is zero"
        )
    return vector


def safety_direction(
    aligned: Any,
    base: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    options: TokensOptions,
    *,
    progress: bool = True,
) -> SafetyDirection:
    """Stage 0 over the first `options.max_examples` valid examples (see module docstring)."""
    import torch
    from tqdm import tqdm

    from pact.core.lm_head import (
        DEFAULT_HEAD_BUDGET,
        check_head_matches_forward,
        find_body,
        head_rows,
    )

    vocab = head_rows(aligned)
    if head_rows(base) != vocab:
        raise PactError(
            f"aligned and base models have different vocabularies ({vocab} vs {head_rows(base)} output rows)"
        )
    inputs = stage_zero_inputs(tokenizer, examples, options)
    if not inputs:
        raise PactError("no valid safety examples: every refusal is empty after stripping")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise PactError("the tokenizer has neither a pad nor an eos token")
    device = _model_device(aligned)
    score_sum = torch.zeros(vocab, dtype=torch.float32, device=device)
    aligned_sum = torch.zeros(vocab, dtype=torch.float32, device=device)
    base_sum = torch.zeros(vocab, dtype=torch.float32, device=device)
    order = sorted(
        range(len(inputs)),
        key=lambda i: -len(inputs[i].aligned_prompt_ids) - len(inputs[i].refusal_ids),
    )
    with (
        torch.inference_mode(),
        tqdm(
            total=len(inputs), desc="stage 0", unit="ex", file=sys.stderr, disable=not progress
        ) as bar,
    ):
        for model, prompt in ((aligned, inputs[0].aligned_prompt_ids), (base, inputs[0].base_prompt_ids)):
            if find_body(model) is not None:
                ids = torch.tensor([list(prompt) + inputs[0].refusal_ids], device=_model_device(model))
                check_head_matches_forward(model, ids)
        for start in range(0, len(order), options.batch_size):
            batch = [inputs[i] for i in order[start : start + options.batch_size]]
            refusals = [x.refusal_ids for x in batch]
            rows_a = response_rows(
                aligned, [x.aligned_prompt_ids for x in batch], refusals, pad_id=pad_id
            )
            rows_b = response_rows(base, [x.base_prompt_ids for x in batch], refusals, pad_id=pad_id)
            step_weights = torch.cat(
                [torch.full((len(r),), 1.0 / len(r), dtype=torch.float32) for r in refusals]
            )
            accumulate_stage_zero(
                rows_a,
                rows_b,
                step_weights,
                (score_sum, aligned_sum, base_sum),
                temperature=options.temperature,
                diff_mode=options.diff_mode,
                budget=DEFAULT_HEAD_BUDGET,
            )
            bar.update(len(batch))
    count = len(inputs)
    score, aligned_mass, base_mass = score_sum / count, aligned_sum / count, base_sum / count
    vector = direction_from_scores(score, aligned_mass, options.top_k)
    return SafetyDirection(
        vector=vector.cpu().numpy().astype(np.float32),
        score=score.cpu().numpy().astype(np.float32),
        aligned_mass=aligned_mass.cpu().numpy().astype(np.float32),
        base_mass=base_mass.cpu().numpy().astype(np.float32),
        examples_used=count,
        example_ids=[x.example_id for x in inputs],
    )


def decode_token(tokenizer: Any, token_id: int) -> str:
    """The text of one token id (empty for ids the tokenizer does not know)."""
    try:
        return tokenizer.decode([int(token_id)], skip_special_tokens=False)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return ""


def tokens_table(tokenizer: Any, direction: SafetyDirection, safety: SafetySet) -> pa.Table:
    """One row per token of S (pact.store.safety.TOKENS_SCHEMA); rank 1 = largest aligned prob in S."""
    ids = safety.token_ids
    aligned_prob = direction.aligned_mass[ids].astype(np.float64)
    rank = np.empty(len(ids), dtype=np.int32)
    rank[np.argsort(-aligned_prob, kind="stable")] = np.arange(1, len(ids) + 1, dtype=np.int32)
    columns = {
        "token_id": ids.astype(np.int64),
        "idx": np.arange(len(ids), dtype=np.int32),
        "token": [decode_token(tokenizer, i) for i in ids],
        "aligned_prob": aligned_prob,
        "base_prob": direction.base_mass[ids].astype(np.float64),
        "score": direction.score[ids].astype(np.float64),
        "value": direction.vector[ids].astype(np.float64),
        "weight": safety.weights.astype(np.float64),
        "rank": rank,
    }
    return pa.table(columns, schema=TOKENS_SCHEMA)


def generate_refusals(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy refusals of the aligned model for each example's prompt (stripped text)."""
    from pact.pipeline.generation import greedy_generate, prompt_ids

    prompts = [prompt_ids(tokenizer, example.messages) for example in examples]
    texts = greedy_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc="refusals",
    )
    return [text.strip() for text in texts]


def _fill_refusals(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    options: TokensOptions,
    max_new_tokens: int,
) -> tuple[list[Example], list[Example]]:
    """Generate the missing refusals among the first examples until max_examples are valid.

    Returns (examples with generated refusals filled in, the generated ones).
    """
    filled = list(examples)
    generated: list[Example] = []
    valid = 0
    position = 0
    while valid < options.max_examples and position < len(filled):
        window = range(position, min(len(filled), position + options.max_examples - valid))
        position = window.stop
        missing = [i for i in window if not filled[i].response.strip()]
        if missing:
            texts = generate_refusals(
                model,
                tokenizer,
                [filled[i] for i in missing],
                max_new_tokens=max_new_tokens,
                batch_size=options.batch_size,
            )
            for i, text in zip(missing, texts, strict=True):
                filled[i] = dataclasses.replace(filled[i], response=text)
                generated.append(filled[i])
        valid += sum(1 for i in window if filled[i].response.strip())
    return filled, generated


def _config_vocab_size(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    return int(size) if isinstance(size, int) else None


def _check_tokenizer_vocabularies(
    aligned_tokenizer: Any, base_dir: Path, trust_remote_code: bool
) -> None:
    """Compare the base directory's tokenizer (when it has one) with the aligned one."""
    from pact.core.models import load_tokenizer

    if not any((base_dir / name).is_file() for name in _TOKENIZER_FILES):
        return
    base_vocab = load_tokenizer(base_dir, trust_remote_code=trust_remote_code).get_vocab()
    aligned_vocab = aligned_tokenizer.get_vocab()
    if base_vocab != aligned_vocab:
        detail = (
            "same size, different token ids"
            if len(base_vocab) == len(aligned_vocab)
            else "sizes differ"
        )
        raise PactError(
            f"aligned and base tokenizers have different vocabularies ({len(aligned_vocab)} vs "
            f"{len(base_vocab)} tokens, {detail}); stage 0 needs one shared vocabulary"
        )


@dataclass
class TokensResult:
    """What `run_tokens` computed and wrote."""

    safety: SafetySet
    table: pa.Table
    direction: SafetyDirection
    generated_refusals: int
    skipped_without_refusal: int
    stale_parts: int  # target parts already in the store (replaced safety set with --force)
    seconds: float


def run_tokens(
    aligned_dir: str | Path,
    base_dir: str | Path,
    data_path: str | Path,
    store_dir: str | Path,
    options: TokensOptions,
) -> TokensResult:
    """Stage 0 end to end: load, check, compute, then write the safety set (nothing on error).

    Holds the store's writer lock throughout (store/lock.py): no precompute or other
    `pact tokens` writes it meanwhile."""
    from pact.core.lm_head import head_rows
    from pact.core.models import load_model, load_tokenizer, model_fingerprint

    if Path(store_dir).exists() and not Path(store_dir).is_dir():
        raise PactError(f"--store {store_dir} exists and is not a directory")
    with store_writer(store_dir):
        started = time.perf_counter()
        data_format, dtype, device = options.data_format, options.dtype, options.device
        trust_remote_code, force, progress = options.trust_remote_code, options.force, options.progress
        generate_missing_refusals, max_new_tokens = options.generate_refusals, options.max_new_tokens
        aligned_dir, base_dir, data_path = Path(aligned_dir), Path(base_dir), Path(data_path)
        store = Store(store_dir)
        manifest = store.read_manifest()
        if manifest["parts"] and not force:
            raise PactError(
                f"store {store.root} already holds {len(manifest['parts'])} target parts computed with "
                "its current safety set; new safety tokens would make them stale (pass --force to replace "
                "the safety set, then rerun `pact precompute`)"
            )
        check_dir(aligned_dir, "aligned model")
        check_dir(base_dir, "base model")
        loaded = load_examples(data_path, data_format, require_response=False)
        examples = loaded.examples
        without_refusal = sum(1 for e in examples if not e.response.strip())
        if without_refusal == len(examples) and not generate_missing_refusals:
            raise PactError(
                f"{data_path}: none of its {len(examples)} rows has a refusal (empty response); "
                "pass --generate-refusals to have the aligned model write them"
            )
        tokenizer = load_tokenizer(aligned_dir, trust_remote_code=trust_remote_code)
        _check_tokenizer_vocabularies(tokenizer, base_dir, trust_remote_code)
        aligned_size, base_size = _config_vocab_size(aligned_dir), _config_vocab_size(base_dir)
        if aligned_size is not None and base_size is not None and aligned_size != base_size:
            raise PactError(
                f"aligned and base models have different vocabularies (vocab_size {aligned_size} vs {base_size})"
            )
        if aligned_size is not None and options.top_k > aligned_size:  # before the models load
            raise PactError(f"top_k {options.top_k} exceeds the vocabulary size {aligned_size}")
        partial = options.allow_partial_weights
        aligned = load_model(
            aligned_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_partial_weights=partial
        )
        base = load_model(
            base_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_partial_weights=partial
        )
        rows = head_rows(aligned)
        if head_rows(base) != rows:
            raise PactError(
                f"aligned and base models have different vocabularies ({rows} vs {head_rows(base)} output rows)"
            )
        largest_id = max(tokenizer.get_vocab().values())
        if largest_id >= rows:
            raise PactError(
                f"the tokenizer has token id {largest_id} but the aligned model has only {rows} output rows"
            )

        generated: list[Example] = []
        if generate_missing_refusals and without_refusal:
            examples, generated = _fill_refusals(aligned, tokenizer, examples, options, max_new_tokens)
        direction = safety_direction(aligned, base, tokenizer, examples, options, progress=progress)
        safety = safety_set_from_vector(direction.vector)
        table = tokens_table(tokenizer, direction, safety)
        meta = {
            "aligned_model": model_fingerprint(aligned_dir),
            "base_model": model_fingerprint(base_dir),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template": template_fingerprint(tokenizer),
            "data": file_sha256(data_path),
            "examples_used": direction.examples_used,
            "generated_refusals": len(generated),
            "options": options.recorded(),
        }

        refusals_path = store.root / REFUSALS_FILE
        if generated:
            lines = [
                json.dumps(
                    {"id": e.example_id, "prompt": e.prompt_text, "completion": e.response},
                    ensure_ascii=False,
                )
                for e in generated
            ]
            atomic_write_bytes(refusals_path, ("\n".join(lines) + "\n").encode("utf-8"))
        elif refusals_path.is_file():
            refusals_path.unlink()  # stale: written by an earlier run, not used by this one
        save_safety_set(store, safety, table, meta)
        return TokensResult(
            safety=safety,
            table=table,
            direction=direction,
            generated_refusals=len(generated),
            skipped_without_refusal=_skipped_before_last_used(examples, direction.example_ids),
            stale_parts=len(manifest["parts"]),
            seconds=time.perf_counter() - started,
        )


def _skipped_before_last_used(examples: Sequence[Example], used_ids: Sequence[str]) -> int:
    """Rows passed over (no refusal) before the last example stage 0 used."""
    last = max(i for i, e in enumerate(examples) if e.example_id == used_ids[-1])
    return last + 1 - len(used_ids)
