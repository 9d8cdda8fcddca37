"""Batched greedy generation with left padding, for evaluation and guard-model judging.

Prompts are token-id lists (chat template already applied). A batch is left-padded
to its longest prompt, positions count only real tokens, and decoding is pure
argmax with a KV cache until every row hit a stop token or `max_new_tokens`, so a
prompt's generation does not depend on the batch it sits in. Each step computes the
logits of the last position only (the prefill too): `logits_to_keep=1` where the
model's forward takes it, else the decoder body and the LM head on the last row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pact.core.encoding import end_of_turn_ids, render, tokenize
from pact.core.errors import PactError


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `chat_template(messages, add_generation_prompt=True)`, no added specials."""
    return tokenize(tokenizer, render(tokenizer, list(messages), add_generation_prompt=True))


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids that end a generation: `pact.core.encoding.end_of_turn_ids` with the model's
    generation config (the tokenizer's eos, the config's eos, the template's end-of-turn)."""
    return end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def _cache_argument(module: Any) -> str:
    """The forward() keyword for the KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    import inspect

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


HEAD_MODES = ("logits_to_keep", "body", "forward")


def head_mode(model: Any) -> str:
    """How a decoding step gets the last position's logits without the others':
    `logits_to_keep` (the model's forward takes `logits_to_keep=1`), `body` (the decoder
    body, then the LM head on the last row), else `forward` (all positions' logits)."""
    from pact.core.lm_head import accepts_logits_to_keep, find_body

    if accepts_logits_to_keep(model):
        return "logits_to_keep"
    return "body" if find_body(model) is not None else "forward"


def _next_logits(model: Any, mode: str, cache: Any, **inputs: Any) -> tuple[Any, Any]:
    """(next-token logits [B, V] at the last position, the updated KV cache) of one step."""
    from pact.core.lm_head import find_body, last_position_logits

    if mode == "body":
        body = find_body(model)
        argument = _cache_argument(body)
        out = body(use_cache=True, **{argument: cache}, **inputs)
        cache = out[argument] if argument in out else out.get("past_key_values")
        return last_position_logits(model, out.last_hidden_state), cache
    argument = _cache_argument(model)
    keep = {"logits_to_keep": 1} if mode == "logits_to_keep" else {}
    out = model(use_cache=True, **{argument: cache}, **keep, **inputs)
    cache = out[argument] if argument in out else out.get("past_key_values")
    return out.logits[:, -1, :], cache


def _greedy_batch(
    model: Any, prompts: list[list[int]], pad_id: int, stops: Any, max_new_tokens: int, mode: str
) -> list[list[int]]:
    """Greedy continuation ids of one batch (stop token excluded); `mode` from `head_mode`."""
    import torch

    device = _model_device(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    produced: list[torch.Tensor] = []
    cache = None
    step_ids, step_positions = input_ids, positions
    for _ in range(max_new_tokens):
        logits, cache = _next_logits(
            model, mode, cache, input_ids=step_ids, attention_mask=attention, position_ids=step_positions
        )
        next_ids = logits.argmax(dim=-1)
        del logits
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        produced.append(next_ids)
        finished |= torch.isin(next_ids, stops)
        if bool(finished.all()):
            break
        step_ids = next_ids[:, None]
        step_positions = step_positions[:, -1:] + 1
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    tokens = torch.stack(produced, dim=1).tolist()
    stop_set = set(stops.tolist())
    result = []
    for row in tokens:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        result.append(row[:cut])
    return result


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "generating",
) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) of token-id `prompts`.

    Prompts are sorted by length and batched `batch_size` at a time with left
    padding; results come back in the input order. The model's train/eval mode is
    restored afterwards.
    """
    import torch
    from tqdm import tqdm

    if max_new_tokens < 1:
        raise PactError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise PactError(f"batch_size must be at least 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise PactError("a prompt encodes to no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise PactError("the tokenizer has neither a pad nor an eos token")
    stops = torch.tensor(stop_token_ids(model, tokenizer) or [-1], dtype=torch.long, device=_model_device(model))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    mode = head_mode(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = [list(prompts[i]) for i in chunk]
                for i, ids in zip(chunk, _greedy_batch(model, batch, pad_id, stops, max_new_tokens, mode), strict=True):
                    outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return outputs
