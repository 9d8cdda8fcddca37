"""The chunked LM head (`pact.core.lm_head`) and training through it (`trainer/fused.py`).

The reference for every value and gradient is the naive path: the model's full
`[B, L, V]` logits from its own forward, and the loss functions of trainer/loss.py on
them (what `batch_loss` did before the head was chunked). Float32, 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from pact.core.errors import PactError
from pact.core.lm_head import (
    HeadLoss,
    LMHead,
    LogitTransform,
    check_head_matches_forward,
    fused_head_loss,
    head_stats,
)
from pact.trainer.batches import Batch, ReferenceTargets, gather_steps, response_token_logprobs
from pact.trainer.fused import batch_loss
from pact.trainer.loss import (
    PactConfig,
    constrained_sft_loss,
    pact_kl_terms,
    response_cross_entropy,
)

VOCAB = 97
SAFETY = torch.tensor([3, 8, 20, 41, 42, 77, 90])
WEIGHTS = torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0, 0.3, 0.0])
BUDGET = 3 * VOCAB  # three rows per chunk: every batch takes several chunks


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6, what: str = "") -> None:
    """max |actual - expected| <= rel * max |expected| (relative to the tensor's scale)."""
    scale = float(expected.abs().max())
    gap = float((actual.float() - expected.float()).abs().max())
    assert gap <= rel * max(scale, 1e-30), f"{what}: max gap {gap:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------- models and batches


def tiny_model(kind: str, *, tied: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if kind == "gemma2":  # final-logit soft-capping
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=3.0, **common))
    elif kind == "cohere":  # logit scale
        model = CohereForCausalLM(CohereConfig(logit_scale=0.25, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # logits large enough that the soft-cap and scale matter
        model.get_output_embeddings().weight.mul_(8)
    return model.float().train()


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return peft_model


def make_batch(prompts: list[int], responses: list[int], seed: int = 0) -> Batch:
    """Right-padded batch with random tokens and random reference targets."""
    generator = torch.Generator().manual_seed(seed)
    width = max(p + r for p, r in zip(prompts, responses, strict=True))
    steps = max(responses)
    size = len(prompts)
    input_ids = torch.zeros(size, width, dtype=torch.long)
    attention = torch.zeros(size, width, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, : p + r] = torch.randint(3, VOCAB, (p + r,), generator=generator)
        attention[i, : p + r] = 1
        labels[i, p : p + r] = input_ids[i, p : p + r]
    lengths = torch.tensor(responses)
    mask = (torch.arange(steps)[None, :] < lengths[:, None]).float()
    full = torch.log_softmax(torch.randn(size, steps, len(SAFETY), generator=generator) * 2, -1) * mask[..., None]
    post = torch.log_softmax(torch.randn(size, steps, len(SAFETY), generator=generator) * 2, -1) * mask[..., None]
    tokens = -torch.rand(size, steps, generator=generator) * 5 * mask
    return Batch(
        example_ids=[f"ex-{i}" for i in range(size)],
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        response_start=torch.tensor(prompts),
        response_length=lengths,
        step_mask=mask,
        reference=ReferenceTargets(tokens, full, post),
    )


def naive_loss(model: torch.nn.Module, batch: Batch, method: str, kl_weight: float = 0.7) -> torch.Tensor:
    """The full-logits path: model(...).logits [B, L, V] and trainer/loss.py on them."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    if method == "constrained-sft":
        student = response_token_logprobs(logits, batch.input_ids, batch.response_start, batch.step_mask)
        return constrained_sft_loss(student, batch.reference.token_logprobs, batch.step_mask)
    ce = response_cross_entropy(logits, batch.labels)
    if method == "sft":
        return ce
    u = gather_steps(logits, batch.response_start, batch.num_steps)[..., SAFETY]
    terms = pact_kl_terms(u, batch.reference.full, batch.reference.post, WEIGHTS, batch.step_mask, PactConfig())
    return ce + kl_weight * terms.kl


def fused_loss(model: torch.nn.Module, batch: Batch, method: str, kl_weight: float = 0.7) -> torch.Tensor:
    return batch_loss(
        model, batch, method=method, kl_weight=kl_weight, pact=PactConfig(),
        safety_ids=SAFETY, weights=WEIGHTS, head_chunk_logits=BUDGET,
    ).loss  # fmt: skip


def loss_and_grads(model: torch.nn.Module, loss_fn, batch: Batch, method: str) -> tuple[float, dict]:  # noqa: ANN001
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, method)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


# ----------------------------------------------------------------------------- training == naive path


@pytest.mark.parametrize("method", ["pact", "sft", "constrained-sft"])
@pytest.mark.parametrize(
    ("kind", "tied", "lora"),
    [("llama", False, False), ("llama", True, False), ("llama", False, True), ("llama", True, True),
     ("gemma2", True, False), ("cohere", True, True)],
)  # fmt: skip
def test_fused_training_equals_the_full_logits_path(method: str, kind: str, tied: bool, lora: bool) -> None:
    model = tiny_model(kind, tied=tied)
    if lora:
        model = with_lora(model)
    batch = make_batch([5, 9, 3], [12, 4, 15])
    naive_value, naive_grads = loss_and_grads(model, naive_loss, batch, method)
    fused_value, fused_grads = loss_and_grads(model, fused_loss, batch, method)
    assert fused_value == pytest.approx(naive_value, rel=1e-6)
    assert naive_grads and fused_grads.keys() == naive_grads.keys()
    for name, grad in naive_grads.items():
        assert grad.abs().max() > 0, name
        assert_rel(fused_grads[name], grad, what=name)


def test_fused_logs_ce_kl_and_gate_of_the_naive_path() -> None:
    model = tiny_model("llama")
    batch = make_batch([4, 7], [10, 6], seed=3)
    terms = batch_loss(
        model, batch, method="pact", kl_weight=0.0, pact=PactConfig(),
        safety_ids=SAFETY, weights=WEIGHTS, head_chunk_logits=BUDGET,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        u = gather_steps(logits, batch.response_start, batch.num_steps)[..., SAFETY]
        expected = pact_kl_terms(u, batch.reference.full, batch.reference.post, WEIGHTS, batch.step_mask)
        ce = response_cross_entropy(logits, batch.labels)
    assert terms.loss.item() == pytest.approx(float(ce), rel=1e-6)  # λ = 0: the KL is logged, not added
    assert terms.ce == pytest.approx(float(ce), rel=1e-6)
    assert terms.kl == pytest.approx(float(expected.kl), rel=1e-6) and terms.kl > 0
    assert terms.gate_mean == pytest.approx(float(expected.gate.sum() / batch.step_mask.sum()), rel=1e-6)


@pytest.mark.parametrize("method", ["pact", "sft", "constrained-sft"])
def test_training_keeps_no_vocabulary_sized_activation(method: str) -> None:
    """Nothing the backward pass keeps with a vocabulary dimension is larger than the
    [V, H] weight (the naive path keeps [B, L, V] logits)."""
    model = tiny_model("gemma2", tied=True)
    batch = make_batch([30, 2], [8, 40])
    hidden = model.config.hidden_size

    def largest(loss_fn) -> int:  # noqa: ANN001
        kept: list[int] = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            kept.append(tensor.numel() if VOCAB in tensor.shape else 0)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_fn(model, batch, method).backward()
        return max(kept)

    assert largest(fused_loss) <= VOCAB * hidden
    assert largest(naive_loss) >= batch.input_ids.numel() * VOCAB  # the test sees [B, L, V]


def test_lora_on_the_lm_head_is_refused() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(PactError, match=r"^LoRA adapters on the LM head are not supported .*leave lm_head out of --lora-targets$"):
        fused_loss(model, make_batch([3], [4]), "sft")


def test_a_batch_without_labels_is_refused() -> None:
    batch = make_batch([3, 4], [2, 2])
    batch.labels.fill_(-100)
    with pytest.raises(PactError, match="the batch has no response tokens"):
        fused_loss(tiny_model("llama"), batch, "sft")


# ----------------------------------------------------------------------------- the head itself


def random_head(*, bias: bool, transform: LogitTransform, seed: int = 0) -> tuple[LMHead, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(VOCAB, 16, generator=generator) * 2).requires_grad_(True)
    b = torch.randn(VOCAB, generator=generator).requires_grad_(True) if bias else None
    hidden = torch.randn(11, 16, generator=generator).requires_grad_(True)
    return LMHead(weight, b, transform), hidden


def naive_logits(head: LMHead, hidden: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, head.weight, head.bias) * head.transform.scale
    if head.transform.cap is not None:
        logits = torch.tanh(logits / head.transform.cap) * head.transform.cap
    return logits


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(0.5), LogitTransform(2.0, 5.0)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_head_loss_values_and_gradients(transform: LogitTransform, bias: bool) -> None:
    head, hidden = random_head(bias=bias, transform=transform)
    targets = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(1))
    ce_weights = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.float32) / 8
    reference = -torch.rand(11)

    def token_loss(logprob: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (logprob - reference[rows]).square().sum()

    def subset_loss(subset: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(subset / 2, -1)[:, 2].sum() * 0.3

    spec = HeadLoss(targets, ce_weights, token_loss, SAFETY, subset_loss)
    params = [hidden, head.weight] + ([head.bias] if bias else [])

    result = fused_head_loss(head, hidden, spec, budget=2 * VOCAB)
    fused_grads = torch.autograd.grad(result.loss * 1.5, params)  # the incoming gradient scales

    logits = naive_logits(head, hidden)
    logprobs = torch.log_softmax(logits, -1)
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    expected = -(ce_weights * picked).sum() + token_loss(picked, torch.arange(11)) + subset_loss(logits[:, SAFETY])
    naive_grads = torch.autograd.grad(expected * 1.5, params)
    assert float(result.loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert_rel(result.token_logprob, picked.detach(), what="token_logprob")
    assert_rel(result.subset, logits[:, SAFETY].detach(), what="subset")
    for name, fused, naive in zip(("hidden", "weight", "bias"), fused_grads, naive_grads, strict=False):
        assert_rel(fused, naive, what=name)


def test_head_stats_chunks_change_nothing() -> None:
    head, hidden = random_head(bias=True, transform=LogitTransform(1.0, 4.0))
    hidden = hidden.detach()
    targets = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(2))
    logprobs = torch.log_softmax(naive_logits(head, hidden).detach(), -1)
    for budget in (1, VOCAB, 4 * VOCAB, 100 * VOCAB):  # 1 logit still means one row per chunk
        stats = head_stats(head, hidden, budget=budget, safety_ids=SAFETY, target_ids=targets, entropy=True, top_k=5)
        assert_rel(stats["safety_logprobs"], logprobs[:, SAFETY])
        assert_rel(stats["token_logprob"], logprobs.gather(1, targets[:, None])[:, 0])
        assert_rel(stats["entropy"], -(logprobs.exp() * logprobs).sum(-1))
        assert_rel(stats["lse"], torch.logsumexp(naive_logits(head, hidden).detach(), -1))
        top = logprobs.topk(5, -1)
        assert torch.equal(stats["top_k_ids"], top.indices)
        assert_rel(stats["top_k_logprobs"], top.values)


def test_a_bad_chunk_budget_is_one_line() -> None:
    head, hidden = random_head(bias=False, transform=LogitTransform())
    with pytest.raises(PactError, match=r"^the LM-head chunk budget must be a positive number of logits, got 0$"):
        head_stats(head, hidden.detach(), budget=0)


def test_transform_from_config() -> None:
    assert LogitTransform.of(tiny_model("gemma2").config) == LogitTransform(1.0, 3.0)
    assert LogitTransform.of(tiny_model("cohere").config) == LogitTransform(0.25, None)
    assert LogitTransform.of(tiny_model("llama").config).identity


def test_a_model_whose_forward_ignores_its_configured_transform_is_refused() -> None:
    model = with_lora(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    check_head_matches_forward(model, ids)  # the head pact resolves is the forward's
    assert model.training  # train mode is restored
    model.config.final_logit_softcapping = 0.5  # Llama's forward does not soft-cap
    with pytest.raises(PactError, match=r"^LlamaForCausalLM post-processes its logits in a way pact does not reproduce"):
        check_head_matches_forward(model, ids)


def test_bf16_weights_accumulate_in_float32() -> None:
    head, hidden = random_head(bias=False, transform=LogitTransform(1.0, 5.0))
    low = LMHead(head.weight.detach().bfloat16().requires_grad_(True), None, head.transform)
    rows = hidden.detach().bfloat16().requires_grad_(True)
    targets = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(4))
    spec = HeadLoss(targets, torch.full((11,), 1 / 11))
    result = fused_head_loss(low, rows, spec, budget=VOCAB)
    result.loss.backward()
    exact = F.cross_entropy(naive_logits(LMHead(low.weight.detach().float(), None, head.transform), rows.detach().float()), targets)
    assert result.loss.dtype == torch.float32
    assert float(result.loss.detach()) == pytest.approx(float(exact), rel=2e-2)
    assert rows.grad.dtype == low.weight.grad.dtype == torch.bfloat16


def head_in(dtype: torch.dtype, *, bias: bool, transform: LogitTransform) -> tuple[LMHead, torch.Tensor]:
    """`random_head` with its weight, bias and hidden rows in `dtype`, without gradients."""
    head, hidden = random_head(bias=bias, transform=transform)
    bias_values = None if head.bias is None else head.bias.detach().to(dtype)
    return LMHead(head.weight.detach().to(dtype), bias_values, transform), hidden.detach().to(dtype)


# Every (transform, bias, dtype) of a head.
HEAD_VARIANTS = pytest.mark.parametrize(
    ("transform", "bias", "dtype"),
    [
        (transform, bias, dtype)
        for transform in (LogitTransform(), LogitTransform(0.5, 5.0))
        for bias in (False, True)
        for dtype in (torch.float32, torch.bfloat16)
    ],
)


@HEAD_VARIANTS
def test_subset_logits_are_the_head_logits_of_those_ids(transform: LogitTransform, bias: bool, dtype: torch.dtype) -> None:
    head, rows = head_in(dtype, bias=bias, transform=transform)
    ids = torch.tensor([5, 0, VOCAB - 1, 17, 5])
    subset = head.subset_logits(rows, ids)
    assert subset.shape == (11, 5) and subset.dtype == torch.float32
    assert_rel(subset, naive_logits(head, rows).float()[:, ids], rel=1e-6 if dtype == torch.float32 else 1e-2)


@HEAD_VARIANTS
def test_logits_into_writes_the_head_logits_into_the_buffer(transform: LogitTransform, bias: bool, dtype: torch.dtype) -> None:
    head, rows = head_in(dtype, bias=bias, transform=transform)
    buffer = torch.full((20, VOCAB), float("nan"))
    out = head.logits_into(rows, buffer[:11])
    assert out.data_ptr() == buffer.data_ptr()  # no new [rows, V] block
    assert out.dtype == torch.float32
    assert_rel(out, head.logits(rows), rel=1e-6 if dtype == torch.float32 else 1e-2)
    assert buffer[11:].isnan().all()
