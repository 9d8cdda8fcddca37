"""The chunked, no-grad LM-head operations (pact.core.lm_head) and the stages built on
them, checked against the naive computation over the model's full [B, L, V] logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import PlainForward

from pact.core.errors import PactError
from pact.core.lm_head import (
    HeadRows,
    last_position_logits,
    logit_chunks,
    rows_per_chunk,
    selected_rows,
    subset_logprobs,
)
from pact.pipeline.generation import HEAD_MODES, _greedy_batch, head_mode
from pact.pipeline.tokens import accumulate_stage_zero, response_rows

VOCAB = 96


def _llama(*, tied: bool, seed: int = 0, vocab: int = VOCAB, model_class=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return (model_class or LlamaForCausalLM)(config).eval()


def _gemma2():
    """Final-logit soft-capping (Gemma 2): the head must apply it as the forward does."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(3)
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def _batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def _positions(spans: list[tuple[int, int]]) -> torch.Tensor:
    """(row, position) of each row's positions start..stop-1, row by row."""
    return torch.tensor([(row, p) for row, (a, b) in enumerate(spans) for p in range(a, b)])


def test_rows_per_chunk_follows_the_element_budget() -> None:
    assert rows_per_chunk(100, 350) == 3
    assert rows_per_chunk(100, 99) == 1  # never zero rows
    assert rows_per_chunk(151_936, 1 << 22) == 27
    with pytest.raises(PactError, match="budget must be at least 1"):
        rows_per_chunk(100, 0)


@pytest.mark.parametrize("make", [lambda: _llama(tied=False), lambda: _llama(tied=True), _gemma2])
@pytest.mark.parametrize("budget", [VOCAB, 5 * VOCAB, 1 << 30])
def test_subset_logprobs_equal_the_full_logits(make, budget: int) -> None:
    model = make()
    ids, mask = _batch([9, 6, 11])
    spans = [(3, 9), (0, 6), (5, 11)]
    positions = _positions(spans)
    subset = torch.tensor([0, 7, 40, VOCAB - 1])
    with torch.no_grad():
        got = subset_logprobs(selected_rows(model, ids, mask, positions), subset, budget)
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    expected = full[positions[:, 0], positions[:, 1]][:, subset]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_chunks_hold_at_most_the_budget() -> None:
    model = _llama(tied=False)
    ids, mask = _batch([10, 10])
    with torch.no_grad():
        rows = selected_rows(model, ids, mask, _positions([(0, 10), (0, 10)]))
        shapes = [logits.shape for _, _, logits in logit_chunks(rows, 3 * VOCAB + 5)]
    assert shapes == [(3, VOCAB)] * 6 + [(2, VOCAB)]
    assert rows.values.shape == (20, 32)  # hidden states, not logits, are what is kept


def test_a_model_without_a_decoder_body_is_run_whole() -> None:
    model = _llama(tied=False)
    ids, mask = _batch([8, 5])
    positions = _positions([(2, 8), (1, 5)])
    subset = torch.arange(VOCAB)
    with torch.no_grad():
        rows = selected_rows(PlainForward(model), ids, mask, positions)
        assert rows.model is None and rows.values.shape == (10, VOCAB)
        got = subset_logprobs(rows, subset, 2 * VOCAB)
        expected = subset_logprobs(selected_rows(model, ids, mask, positions), subset)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_positions_of_the_wrong_shape_are_refused() -> None:
    ids, mask = _batch([4])
    with pytest.raises(PactError, match=r"positions must have shape \[N, 2\]"):
        selected_rows(_llama(tied=False), ids, mask, torch.tensor([0, 1, 2]))


def test_last_position_logits_equal_the_forward() -> None:
    model = _gemma2()
    ids, mask = _batch([7, 7])
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = last_position_logits(model, hidden)
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def _naive_stage_zero(aligned, base, batch, *, temperature: float, diff_mode: str):
    """The former stage-0 batch computation: full [B, R_max, V] float32 log-probs of both
    models, masked, mean over steps per example, summed over examples."""

    def logprobs(model, prompts, refusals):
        width = max(len(p) + len(r) - 1 for p, r in zip(prompts, refusals, strict=True))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, r) in enumerate(zip(prompts, refusals, strict=True)):
            ids[row, : len(p) + len(r) - 1] = torch.tensor(p + r[:-1])
            mask[row, : len(p) + len(r) - 1] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        steps = max(len(r) for r in refusals)
        columns = torch.tensor(
            [[min(len(p) - 1 + t, width - 1) for t in range(steps)] for p in prompts]
        )
        picked = torch.take_along_dim(logits, columns[..., None], dim=1)
        step_mask = torch.tensor([[t < len(r) for t in range(steps)] for r in refusals])
        return torch.log_softmax(picked.float() / temperature, dim=-1), step_mask

    refusals = [r for _, _, r in batch]
    log_a, mask = logprobs(aligned, [a for a, _, _ in batch], refusals)
    log_b, _ = logprobs(base, [b for _, b, _ in batch], refusals)
    p_a, p_b = log_a.exp(), log_b.exp()
    if diff_mode == "p_diff":
        per_step = p_a - p_b
    else:
        per_step = torch.where(p_a > 0, p_a * (log_b - log_a), torch.zeros_like(p_a))
    steps = mask.to(torch.float32)[..., None]
    counts = steps.sum(dim=1)
    return tuple(
        ((x * steps).sum(dim=1) / counts).sum(dim=0) for x in (per_step, p_a, p_b)
    )


@pytest.mark.parametrize("diff_mode", ["p_diff", "pref_logratio"])
@pytest.mark.parametrize("budget", [VOCAB, 4 * VOCAB, 1 << 30])
def test_stage_zero_chunks_equal_the_full_batch_computation(diff_mode: str, budget: int) -> None:
    aligned, base = _llama(tied=False, seed=0), _llama(tied=True, seed=1)
    generator = torch.Generator().manual_seed(5)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    batch = [(ids(a), ids(b), ids(r)) for a, b, r in [(7, 4, 5), (3, 9, 1), (10, 2, 8)]]
    refusals = [r for _, _, r in batch]
    sums = tuple(torch.zeros(VOCAB) for _ in range(3))
    weights = torch.cat([torch.full((len(r),), 1.0 / len(r)) for r in refusals])
    with torch.no_grad():
        rows_a = response_rows(aligned, [a for a, _, _ in batch], refusals, pad_id=0)
        rows_b = response_rows(base, [b for _, b, _ in batch], refusals, pad_id=0)
        assert isinstance(rows_a, HeadRows) and len(rows_a) == 14
        accumulate_stage_zero(
            rows_a, rows_b, weights, sums, temperature=1.7, diff_mode=diff_mode, budget=budget
        )
        expected = _naive_stage_zero(aligned, base, batch, temperature=1.7, diff_mode=diff_mode)
    for name, got, want in zip(("score", "mass", "base mass"), sums, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8, msg=name)


def _naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding of one unpadded prompt from the full logits, no KV cache."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("mode", HEAD_MODES)
@pytest.mark.parametrize("make", [lambda: _llama(tied=False), _gemma2])
def test_generation_keeps_only_the_last_logits_and_the_same_tokens(make, mode: str) -> None:
    model = make()
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 9, 2)]
    no_stop = torch.tensor([-1])
    with torch.no_grad():
        got = _greedy_batch(model, prompts, 0, no_stop, 6, mode)
        expected = [_naive_greedy(model, p, 6) for p in prompts]
    assert got == expected


def test_head_mode_prefers_logits_to_keep_then_the_body() -> None:
    model = _llama(tied=False)
    assert head_mode(model) == "logits_to_keep"
    assert head_mode(PlainForward(model)) == "forward"  # neither logits_to_keep nor a body
    with_body = PlainForward(model)
    with_body.model = model.model
    assert head_mode(with_body) == "body"


WRAPPED_PROBE = """
import sys
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from pact.core import distributed
from pact.core.encoding import Encoded
from pact.pipeline.probe import safety_logprobs

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)
model = LlamaForCausalLM(config)
generator = torch.Generator().manual_seed(4)
encoded = []
for i, (length, start) in enumerate([(9, 4), (6, 1), (12, 7)]):
    ids = torch.randint(3, 96, (length,), generator=generator).numpy()
    encoded.append(Encoded(f"e{i}", ids, ids, start, length - start, "", "", False))
safety = np.array([0, 5, 40, 95])
alone = safety_logprobs(model, encoded, safety, batch_size=2)
with distributed.process_group("cpu") as ranks:
    wrapped = distributed.wrap_model(model, ranks, "cpu", fsdp=sys.argv[1] == "fsdp")
    wrapped.train()
    got = safety_logprobs(wrapped, encoded, safety, batch_size=2)  # before any forward
    assert wrapped.training
    wrapped(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()  # training goes on
for a, b in zip(alone, got, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
print("probe-ok", ranks.rank)
"""


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_the_probe_reads_through_ddp_and_fsdp(wrapper: str, tmp_path) -> None:
    """Under torchrun the probe gets the wrapped model: DDP is unwrapped, and an FSDP root
    is initialised and gathered while its body and head are called apart (at step 0 the
    probe runs before any forward: a layer must not become the root)."""
    from launch import torchrun

    script = tmp_path / "probe.py"
    script.write_text(WRAPPED_PROBE)
    launch = torchrun(tmp_path, str(script), wrapper)
    assert launch.stdout.count("probe-ok") == 2, launch.stdout[-2000:] + launch.stderr[-4000:]
    if launch.returncode != 0:
        # Both ranks finished; only gloo's rare abort at process exit (docs/distributed.md) is accepted.
        assert "terminate called without an active exception" in launch.stderr, launch.stderr[-4000:]
        warnings.warn("a rank aborted at gloo teardown after the probe finished (known, rare)", stacklevel=1)


def test_a_peft_model_goes_through_its_adapted_head() -> None:
    """LoRA on attention and on the LM head itself (non-zero adapters): the body and the
    head found through the peft wrapper give the wrapped model's own log-probs."""
    from peft import LoraConfig, get_peft_model

    adapted = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(_llama(tied=False), adapted).eval()
    ids, mask = _batch([7, 4])
    positions = _positions([(2, 7), (0, 4)])
    with torch.no_grad():
        got = subset_logprobs(selected_rows(model, ids, mask, positions), torch.arange(VOCAB), 2 * VOCAB)
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    torch.testing.assert_close(got, full[positions[:, 0], positions[:, 1]], rtol=1e-6, atol=1e-6)


def test_stage_zero_refuses_a_model_whose_forward_reworks_its_logits(tiny_tokenizer, tmp_path) -> None:
    """Stage 0 runs the head itself: a forward that post-processes the logits in a way the
    head does not reproduce is refused (checked against the forward, as precompute does)."""
    from transformers import LlamaForCausalLM

    from pact.core.data import load_examples
    from pact.pipeline.tokens import TokensOptions, safety_direction

    class Sharpened(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    aligned = _llama(tied=False, vocab=len(tiny_tokenizer), model_class=Sharpened)
    base = _llama(tied=False, seed=1, vocab=len(tiny_tokenizer))
    data = tmp_path / "safety.jsonl"
    data.write_text('{"prompt": "how do I do the thing?", "completion": "I cannot help with that."}\n')
    examples = load_examples(data).examples
    with pytest.raises(PactError, match="post-processes its logits in a way pact does not reproduce"):
        safety_direction(aligned, base, tiny_tokenizer, examples, TokensOptions(top_k=5), progress=False)
