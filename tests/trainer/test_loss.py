"""Tests for trainer/loss.py: hand cases, a loop transcription, invariances, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pact.core.errors import PactError
from pact.trainer.loss import (
    PactConfig,
    PactTerms,
    constrained_sft_betas,
    constrained_sft_loss,
    cross_entropy_and_subset,
    pact_gate,
    pact_kl,
    pact_kl_terms,
    pact_target,
    response_cross_entropy,
    token_logprobs,
    top_p_count,
)


def _logits(probs: list[float], scale: float = 1.0) -> torch.Tensor:
    """[1, 1, S] tensor holding scale * log(probs)."""
    return torch.tensor([[[scale * math.log(p) for p in probs]]], dtype=torch.float32)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- config


def test_config_defaults() -> None:
    c = PactConfig()
    assert (c.top_p, c.alpha, c.bias, c.gate_temperature) == (0.9, 2.0, 0.0, 1.0)
    assert (c.prefix_n, c.decay_tau, c.boost, c.temperature) == (8, 8.0, 1.0, 2.0)
    with pytest.raises(AttributeError):
        c.top_p = 0.5  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_p": 0.0}, r"^PactConfig\.top_p \(--top-p\) must be a finite number > 0 and <= 1, got 0\.0$"),
        ({"top_p": 1.5}, r"^PactConfig\.top_p \(--top-p\) must be .* got 1\.5$"),
        ({"gate_temperature": 0.0}, r"^PactConfig\.gate_temperature \(--gate-temperature\) must be a finite number > 0"),
        ({"temperature": -1.0}, r"^PactConfig\.temperature \(--kl-temperature\) must be a finite number > 0"),
        ({"prefix_n": -1}, r"^PactConfig\.prefix_n \(--gate-prefix\) must be an integer >= 0, got -1$"),
        ({"prefix_n": 2.5}, r"^PactConfig\.prefix_n \(--gate-prefix\) must be an integer >= 0, got 2\.5$"),
        ({"boost": -0.1}, r"^PactConfig\.boost \(--gate-boost\) must be a finite number >= 0"),
        ({"alpha": float("nan")}, r"^PactConfig\.alpha \(--gate-alpha\) must be a finite number, got nan$"),
        ({"decay_tau": float("inf")}, r"^PactConfig\.decay_tau \(--gate-decay\) must be a finite number, got inf$"),
        ({"bias": "0"}, r"^PactConfig\.bias \(--gate-bias\) must be a finite number, got '0'$"),
        ({"bias": True}, r"^PactConfig\.bias \(--gate-bias\) must be a finite number, got True$"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(PactError, match=match):
        PactConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"top_p": 1.0}, {"prefix_n": 0}, {"boost": 0.0}, {"decay_tau": 0.0}, {"decay_tau": -1.0}, {"bias": -3}],
)
def test_config_edge_values_allowed(kwargs: dict) -> None:
    """Edge values docs/loss.md allows (decay_tau <= 0 is a hard cut) build a config that keeps them."""
    config = PactConfig(**kwargs)
    assert all(getattr(config, name) == value for name, value in kwargs.items())


# ----------------------------------------------------------------------------- top_p_count


def test_top_p_count_hand() -> None:
    # p = [0.5, 0.3, 0.2] -> sorted cdf = [0.5, 0.8, 1.0]
    x = _logits([0.2, 0.5, 0.3])  # order does not matter: sorted inside
    # p=0.4: no cdf < 0.4 -> 0 + 1 = 1
    assert top_p_count(x, 0.4, 1.0).item() == 1.0
    # p=0.75: 0.5 < 0.75 -> 1 + 1 = 2
    assert top_p_count(x, 0.75, 1.0).item() == 2.0
    # p=0.9: 0.5, 0.8 < 0.9 -> 2 + 1 = 3
    assert top_p_count(x, 0.9, 1.0).item() == 3.0
    # T=2 flattens: p ∝ sqrt([0.5, 0.3, 0.2]) = [.7071, .5477, .4472] / 1.7020
    #   = [.4155, .3218, .2628]; cdf = [.4155, .7373, 1.0]; p=0.75 -> 2 + 1 = 3
    assert top_p_count(x, 0.75, 2.0).item() == 3.0


def test_top_p_count_shape_and_dtype() -> None:
    x = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    n = top_p_count(x, 0.9, 1.0)
    assert n.shape == (2, 5) and n.dtype == torch.float32
    assert bool((n >= 1).all()) and bool((n <= 7).all())


def test_top_p_count_errors() -> None:
    with pytest.raises(ValueError, match="top_p must be in"):
        top_p_count(torch.zeros(1, 3), 0.0, 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        top_p_count(torch.zeros(1, 3), 0.9, 0.0)
    with pytest.raises(ValueError, match="empty safety set"):
        top_p_count(torch.zeros(1, 0), 0.9, 1.0)


# ----------------------------------------------------------------------------- gate


def _gate_inputs(steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # S=4. student u uniform: cdf = [.25, .5, .75, 1] -> 3 below 0.9 -> n(u) = 4.
    # post-only o peaked [10, 0, 0, 0]: p0 = 0.99986 > 0.9 -> n(o) = 1.
    u = torch.zeros(1, steps, 4)
    o = torch.tensor([10.0, 0.0, 0.0, 0.0]).expand(1, steps, 4).clone()
    mask = torch.ones(1, steps)
    return u, o, mask


def test_gate_hand_values_and_decay() -> None:
    u, o, mask = _gate_inputs(12)
    c = pact_gate(u, o, mask, PactConfig())
    # c_0 = sigmoid(2 * (4 - 1) / 4) = sigmoid(1.5) = 0.8175744762
    c0 = _sigmoid(1.5)
    assert c[0, 0].item() == pytest.approx(0.8175744762, abs=1e-7)
    # no decay before N = 8 (t = 0..8 all equal: clamp(t - 8, 0) = 0 up to t = 8)
    assert torch.allclose(c[0, :9], torch.full((9,), c0))
    # t = N + 3 = 11: decay exp(-3 / 8) = 0.6872892788 -> c = 0.5619096 (approx)
    assert c[0, 11].item() == pytest.approx(c0 * math.exp(-3 / 8), abs=1e-7)
    assert c[0, 11].item() == pytest.approx(0.5619096, abs=1e-6)


def test_gate_bias_boost_hard_cut() -> None:
    u, o, mask = _gate_inputs(10)
    # bias 0.25: sigmoid(2 * (0.75 - 0.25)) = sigmoid(1) = 0.7310585786
    c = pact_gate(u, o, mask, PactConfig(bias=0.25))
    assert c[0, 0].item() == pytest.approx(0.7310585786, abs=1e-7)
    # boost 0.5 halves everything
    c = pact_gate(u, o, mask, PactConfig(boost=0.5))
    assert c[0, 0].item() == pytest.approx(0.5 * _sigmoid(1.5), abs=1e-7)
    # hard cut: decay_tau <= 0, N = 3 -> steps 0..2 keep c, steps >= 3 are 0
    c = pact_gate(u, o, mask, PactConfig(prefix_n=3, decay_tau=0.0))
    assert torch.allclose(c[0, :3], torch.full((3,), _sigmoid(1.5)))
    assert bool((c[0, 3:] == 0).all())
    # prefix_n = 0 with decay: c_t = c_0 * exp(-t / tau)
    c = pact_gate(u, o, mask, PactConfig(prefix_n=0, decay_tau=2.0))
    expected = torch.tensor([_sigmoid(1.5) * math.exp(-t / 2.0) for t in range(10)])
    assert torch.allclose(c[0], expected, atol=1e-7)


def test_gate_symmetric_and_masked() -> None:
    u, o, _ = _gate_inputs(4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # swap roles: n(u) = 1, n(o) = 4 -> sigmoid(-1.5) = 0.1824255238
    c = pact_gate(o, u, mask, PactConfig())
    assert c[0, 0].item() == pytest.approx(0.1824255238, abs=1e-7)
    assert c[0, 2].item() == 0.0 and c[0, 3].item() == 0.0
    # same distribution -> sigmoid(0) = 0.5
    c = pact_gate(u, u, mask.bool(), PactConfig())
    assert c[0, 0].item() == 0.5


def test_gate_no_grad() -> None:
    u = torch.randn(2, 3, 5, requires_grad=True)
    o = torch.randn(2, 3, 5)
    c = pact_gate(u, o, torch.ones(2, 3), PactConfig())
    assert not c.requires_grad and c.grad_fn is None


# ----------------------------------------------------------------------------- target


def test_target_hand_no_mix() -> None:
    # c = 0 -> m = f; T = 2 and f = 2 * log(a) -> softmax(f / 2) = a = [0.5, 0.3, 0.2]
    # w = [1, 0, 2] -> [0.5, 0, 0.4] / 0.9 = [5/9, 0, 4/9]
    f = _logits([0.5, 0.3, 0.2], scale=2.0)
    o = torch.randn(1, 1, 3)
    q = pact_target(f, o, torch.zeros(1, 1), torch.tensor([1.0, 0.0, 2.0]), PactConfig())
    assert torch.allclose(q[0, 0], torch.tensor([5 / 9, 0.0, 4 / 9]), atol=1e-7)


def test_target_hand_mixed() -> None:
    # c = 0.5, f = 2 log a, o = 2 log b -> m / 2 = 0.5 log a + 0.5 log b -> p ∝ sqrt(a * b)
    # a = [.8, .1, .1], b = [.2, .4, .4]: sqrt(ab) = [.4, .2, .2] -> p = [.5, .25, .25]
    # w = [1, 1, 2] -> [.5, .25, .5] / 1.25 = [.4, .2, .4]
    f = _logits([0.8, 0.1, 0.1], scale=2.0)
    o = _logits([0.2, 0.4, 0.4], scale=2.0)
    q = pact_target(f, o, torch.full((1, 1), 0.5), torch.tensor([1.0, 1.0, 2.0]), PactConfig())
    assert torch.allclose(q[0, 0], torch.tensor([0.4, 0.2, 0.4]), atol=1e-6)
    # c = 1 -> q follows o only: b * w = [.2, .4, .8] / 1.4
    q = pact_target(f, o, torch.ones(1, 1), torch.tensor([1.0, 1.0, 2.0]), PactConfig())
    assert torch.allclose(q[0, 0], torch.tensor([0.2, 0.4, 0.8]) / 1.4, atol=1e-6)


# ----------------------------------------------------------------------------- KL hand


def test_kl_zero_when_student_is_reference_and_weights_equal() -> None:
    x = torch.randn(2, 5, 6)
    w = torch.full((6,), 0.3)
    # u = f = o: any c mixes f with itself; equal weights leave softmax(f / T) unchanged
    kl = pact_kl(x, x.clone(), x.clone(), w, torch.ones(2, 5))
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def test_kl_positive_at_step0_with_unequal_weights() -> None:
    # docs/loss.md ("At step 0"): model == reference, but the target is reweighted -> KL > 0.
    # u = f = o = 2 log a, a = [.5, .3, .2], T = 2 -> p = a; w = [1, 0, 2] -> q = [5/9, 0, 4/9]
    # KL = 4 * (5/9 ln((5/9) / .5) + 4/9 ln((4/9) / .2)) = 4 * (5/9 ln(10/9) + 4/9 ln(20/9))
    #    = 4 * (0.0585325 + 0.3548933) = 1.6537032
    x = _logits([0.5, 0.3, 0.2], scale=2.0)
    terms = pact_kl_terms(x, x, x, torch.tensor([1.0, 0.0, 2.0]), torch.ones(1, 1))
    expected = 4 * (5 / 9 * math.log(10 / 9) + 4 / 9 * math.log(20 / 9))
    assert expected == pytest.approx(1.6537032, abs=1e-6)
    assert terms.kl.item() == pytest.approx(expected, abs=1e-5)
    assert terms.kl.item() > 0


def test_kl_hand_two_steps_with_padding() -> None:
    # B=1, T=2, step 1 padded. Step 0 as above (KL = 1.6537032); step 1 holds garbage.
    x = _logits([0.5, 0.3, 0.2], scale=2.0)
    garbage = torch.tensor([[[float("nan"), 1.0, 2.0]]])
    u = torch.cat([x, garbage], dim=1)
    terms = pact_kl_terms(u, u, u, torch.tensor([1.0, 0.0, 2.0]), torch.tensor([[1, 0]]))
    expected = 4 * (5 / 9 * math.log(10 / 9) + 4 / 9 * math.log(20 / 9))
    assert terms.kl.item() == pytest.approx(expected, abs=1e-5)
    assert terms.kl_per_step[0, 1].item() == 0.0
    assert terms.gate[0, 1].item() == 0.0


# ----------------------------------------------------------------------------- loop reference


def _loop_pact_kl(u, f, o, w, mask, cfg: PactConfig) -> float:
    """Direct transcription of the formulas with python loops and math.exp/log."""
    B, T, S = u.shape
    u, f, o, w, mask = u.tolist(), f.tolist(), o.tolist(), w.tolist(), mask.tolist()

    def softmax(xs, temp):
        mx = max(x / temp for x in xs)
        es = [math.exp(x / temp - mx) for x in xs]
        z = sum(es)
        return [e / z for e in es]

    def count(xs):
        ps = sorted(softmax(xs, cfg.gate_temperature), reverse=True)
        acc, n = 0.0, 0
        for p in ps:
            acc += p
            if acc < cfg.top_p:
                n += 1
        return n + 1

    total, valid = 0.0, 0.0
    for b in range(B):
        for t in range(T):
            if mask[b][t] == 0:
                continue
            valid += 1
            c = _sigmoid(cfg.alpha * (count(u[b][t]) / S - count(o[b][t]) / S - cfg.bias))
            if cfg.decay_tau > 0:
                c *= math.exp(-max(t - cfg.prefix_n, 0) / cfg.decay_tau)
            elif t >= cfg.prefix_n:
                c = 0.0
            c *= cfg.boost
            m = [(1 - c) * f[b][t][j] + c * o[b][t][j] for j in range(S)]
            p_ref = softmax(m, cfg.temperature)
            qu = [p_ref[j] * w[j] for j in range(S)]
            z = sum(qu)
            q = [x / z for x in qu]
            p = softmax(u[b][t], cfg.temperature)
            kl = 0.0
            for j in range(S):
                if q[j] > 0:
                    kl += q[j] * (math.log(q[j]) - math.log(p[j]))
            total += cfg.temperature**2 * kl
    return total / valid


@pytest.mark.parametrize(
    "cfg",
    [
        PactConfig(),
        PactConfig(prefix_n=2, decay_tau=3.0, alpha=5.0, bias=0.1, boost=0.8, temperature=1.5),
        PactConfig(prefix_n=3, decay_tau=0.0, top_p=0.6, gate_temperature=0.7),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_matches_loop_transcription(cfg: PactConfig, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, T, S = 3, 7, 11
    u = 2.0 * torch.randn(B, T, S, generator=g)
    f = 2.0 * torch.randn(B, T, S, generator=g)
    o = 2.0 * torch.randn(B, T, S, generator=g)
    w = torch.rand(S, generator=g)
    w[[1, 4, 7]] = 0.0  # zero weights stay in S
    lengths = [7, 4, 1]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    got = pact_kl(u, f, o, w, mask, cfg).item()
    want = _loop_pact_kl(u.double(), f.double(), o.double(), w.double(), mask, cfg)
    assert abs(want) > 0.1  # a real, non-trivial value
    # 1e-6, relative once the value exceeds 1: float32 accumulation alone reaches ~1e-6
    # on KL values of 3-5 (these inputs), while a wrong gate count shifts it by >1e-3.
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want))


# ----------------------------------------------------------------------------- invariances


def _random_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T, S = 3, 6, 9
    u = torch.randn(B, T, S, generator=g)
    f = torch.randn(B, T, S, generator=g)
    o = torch.randn(B, T, S, generator=g)
    w = torch.rand(S, generator=g)
    w[0] = 0.0
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return u, f, o, w, mask, g


@pytest.mark.parametrize("which", [0, 1, 2])
def test_per_step_shift_invariance(which: int) -> None:
    u, f, o, w, mask, g = _random_case()
    base = pact_kl_terms(u, f, o, w, mask)
    args = [u.clone(), f.clone(), o.clone()]
    args[which] = args[which] + 10.0 * torch.randn(3, 6, 1, generator=g)
    shifted = pact_kl_terms(*args, w, mask)
    assert torch.allclose(shifted.kl, base.kl, rtol=1e-5, atol=1e-6)
    assert torch.allclose(shifted.gate, base.gate, atol=1e-6)


def test_log_softmax_inputs_equal_logits() -> None:
    u, f, o, w, mask, _ = _random_case(1)
    a = pact_kl(u, f, o, w, mask)
    b = pact_kl(F.log_softmax(u, -1), F.log_softmax(f, -1), F.log_softmax(o, -1), w, mask)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weight_scale_invariance_and_low_precision_inputs() -> None:
    u, f, o, w, mask, _ = _random_case(2)
    a = pact_kl(u, f, o, w, mask)
    assert torch.allclose(pact_kl(u, f, o, 7.0 * w, mask), a, rtol=1e-5, atol=1e-6)
    lo = pact_kl(u.bfloat16(), f.bfloat16(), o.bfloat16(), w, mask.bool())
    assert lo.dtype == torch.float32
    assert torch.allclose(lo, a, atol=5e-2)


def test_pact_kl_equals_terms_kl_and_shapes() -> None:
    u, f, o, w, mask, _ = _random_case(3)
    cfg = PactConfig(prefix_n=1)
    terms = pact_kl_terms(u, f, o, w, mask, cfg)
    assert isinstance(terms, PactTerms)
    assert terms.kl.shape == () and terms.kl_per_step.shape == (3, 6)
    assert terms.gate.shape == (3, 6)
    assert torch.equal(pact_kl(u, f, o, w, mask, cfg), terms.kl)
    assert bool((terms.kl_per_step[mask == 0] == 0).all())
    assert bool((terms.gate[mask == 0] == 0).all())
    assert bool((terms.kl_per_step[mask == 1] >= -1e-6).all())


# ----------------------------------------------------------------------------- gradients


def test_gradient_only_into_student() -> None:
    u, f, o, w, mask, _ = _random_case(4)
    u.requires_grad_(True)
    f.requires_grad_(True)
    o.requires_grad_(True)
    terms = pact_kl_terms(u, f, o, w, mask)
    assert not terms.gate.requires_grad
    assert terms.kl.requires_grad
    terms.kl.backward()
    assert f.grad is None and o.grad is None
    assert u.grad is not None and bool((u.grad.abs().sum(-1)[mask == 1] > 0).all())
    assert bool((u.grad[mask == 0] == 0).all())


def test_gradient_analytic_and_zero_weights_pushed_down() -> None:
    # d KL / d u_t = T * (softmax(u_t / T) - q_t) / n_valid on valid steps
    u, f, o, w, mask, _ = _random_case(5)
    w[[2, 5]] = 0.0
    u.requires_grad_(True)
    cfg = PactConfig()
    terms = pact_kl_terms(u, f, o, w, mask, cfg)
    terms.kl.backward()
    q = pact_target(f, o, terms.gate, w, cfg)
    p = torch.softmax(u.detach() / cfg.temperature, -1)
    expected = cfg.temperature * (p - q) * mask[..., None] / mask.sum()
    assert torch.allclose(u.grad, expected, atol=1e-7)
    # q_j = 0 for zero-weight tokens -> gradient T * p_j / n > 0: descent lowers their logits
    assert bool((q[..., [2, 5]] == 0).all())
    assert bool((u.grad[..., [2, 5]][mask == 1] > 0).all())


# ----------------------------------------------------------------------------- batch mean


def test_token_mean_not_mean_of_example_means() -> None:
    # Example 0: 1 valid step with KL = k (the hand case, 1.6537). Example 1: 3 valid steps
    # with KL = 0 (equal reference and student, weights [1, 0, 2] but student already = q).
    x = _logits([0.5, 0.3, 0.2], scale=2.0)  # KL 1.6537 under w = [1, 0, 2]
    w = torch.tensor([1.0, 0.0, 2.0])
    # student whose softmax(u / 2) = q = [5/9, 0, 4/9] (1e-30 instead of 0) -> KL ~ 0
    y = _logits([5 / 9, 1e-30, 4 / 9], scale=2.0)
    u = torch.cat([torch.cat([x, x, x], 1), torch.cat([y, y, y], 1)], 0)  # [2, 3, 3]
    f = torch.cat([torch.cat([x, x, x], 1), torch.cat([x, x, x], 1)], 0)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    terms = pact_kl_terms(u, f, f, w, mask)
    k = 4 * (5 / 9 * math.log(10 / 9) + 4 / 9 * math.log(20 / 9))
    assert terms.kl_per_step[0, 0].item() == pytest.approx(k, abs=1e-5)
    assert terms.kl_per_step[1].abs().max().item() < 1e-5
    # token mean: (k + 0 + 0 + 0) / 4; mean of example means would be (k + 0) / 2
    assert terms.kl.item() == pytest.approx(k / 4, abs=1e-5)
    assert terms.kl.item() != pytest.approx(k / 2, abs=1e-3)


# ----------------------------------------------------------------------------- PACT errors


def test_pact_errors() -> None:
    u, f, o, w, mask, _ = _random_case(6)
    with pytest.raises(ValueError, match=r"shapes disagree: student_logits .* reference_full"):
        pact_kl(u, f[:, :5], o, w, mask)
    with pytest.raises(ValueError, match=r"shapes disagree: student_logits .* reference_post"):
        pact_kl(u, f, o[..., :4], w, mask)
    with pytest.raises(ValueError, match=r"reference_full must be \[B, T, S\]"):
        pact_kl(u, f[0], o, w, mask)
    with pytest.raises(ValueError, match=r"shapes disagree: mask"):
        pact_kl(u, f, o, w, mask[:, :3])
    with pytest.raises(ValueError, match=r"shapes disagree: weights \[4\] vs safety set size S=9"):
        pact_kl(u, f, o, w[:4], mask)
    with pytest.raises(ValueError, match="empty safety set"):
        pact_kl(u[..., :0], f[..., :0], o[..., :0], w[:0], mask)
    with pytest.raises(ValueError, match="weights are all zero"):
        pact_kl(u, f, o, torch.zeros(9), mask)
    with pytest.raises(ValueError, match="weights contain negative values"):
        pact_kl(u, f, o, w - 0.5, mask)
    bad = w.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="weights contain non-finite values"):
        pact_kl(u, f, o, bad, mask)
    bad[3] = float("inf")
    with pytest.raises(ValueError, match="weights contain non-finite values"):
        pact_kl(u, f, o, bad, mask)
    with pytest.raises(ValueError, match="mask has no valid step"):
        pact_kl(u, f, o, w, torch.zeros(3, 6))
    with pytest.raises(ValueError, match="mask must contain only 0/1"):
        pact_kl(u, f, o, w, 0.5 * mask)
    with pytest.raises(ValueError, match=r"shapes disagree: gate"):
        pact_target(f, o, torch.zeros(3, 5), w, PactConfig())
    with pytest.raises(ValueError, match=r"shapes disagree: student_logits .* reference_post"):
        pact_gate(u, o[:, :2], mask, PactConfig())


# ----------------------------------------------------------------------------- CE / logprobs


def _lm_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 13, generator=g)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 5] = -100  # padding
    return logits, labels


def test_response_cross_entropy_matches_shifted_f_cross_entropy() -> None:
    logits, labels = _lm_case()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1))
    got = response_cross_entropy(logits, labels)
    assert torch.allclose(got, want, atol=1e-6)
    # float32 even for bf16 logits
    assert response_cross_entropy(logits.bfloat16(), labels).dtype == torch.float32


def test_token_logprobs_and_ce_agree() -> None:
    logits, labels = _lm_case(1)
    lp = token_logprobs(logits, labels)
    assert lp.shape == (2, 5) and lp.dtype == torch.float32
    valid = labels[:, 1:] != -100
    assert bool((lp[~valid] == 0).all())
    ref = torch.log_softmax(logits[:, :-1], -1)
    for b in range(2):
        for i in range(5):
            if valid[b, i]:
                assert lp[b, i].item() == pytest.approx(
                    ref[b, i, labels[b, i + 1]].item(), abs=1e-6
                )
    ce = response_cross_entropy(logits, labels)
    assert torch.allclose(-lp.sum() / valid.sum(), ce, atol=1e-6)


def test_response_cross_entropy_matches_llama_loss() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 64, (2, 9))
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, :2] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    got = response_cross_entropy(out.logits, labels)
    assert torch.allclose(got, out.loss.float(), atol=1e-5)


def test_lm_errors() -> None:
    logits, labels = _lm_case()
    with pytest.raises(ValueError, match=r"shapes disagree: logits .* vs labels"):
        response_cross_entropy(logits, labels[:, :4])
    with pytest.raises(ValueError, match=r"logits must be \[B, L, V\]"):
        token_logprobs(logits[0], labels[0])
    with pytest.raises(ValueError, match="labels have no token to predict"):
        response_cross_entropy(logits, torch.full_like(labels, -100))


# ----------------------------------------------------------------------------- constrained SFT


def test_constrained_sft_betas() -> None:
    betas = constrained_sft_betas(7)
    assert betas.dtype == torch.float32
    assert betas.tolist() == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1])
    assert constrained_sft_betas(1).tolist() == [0.5]
    assert constrained_sft_betas(0).shape == (0,)
    custom = constrained_sft_betas(4, first=1.0, early=3.0, late=0.2, early_until=2)
    assert custom.tolist() == pytest.approx([1.0, 3.0, 0.2, 0.2])
    with pytest.raises(ValueError, match="steps must be >= 0"):
        constrained_sft_betas(-1)
    with pytest.raises(ValueError, match="late must be finite and > 0"):
        constrained_sft_betas(3, late=0.0)


def test_constrained_sft_hand() -> None:
    # betas [0.5, 2.0]; logp = [-1, -2], ref = [-1, -1] -> diffs [0, -1]
    # l0 = -(2 / 0.5) log sigmoid(0) = 4 ln 2 = 2.7725887
    # l1 = -(2 / 2) log sigmoid(-2) = ln(1 + e^2) = 2.1269280
    # mean over 2 valid steps = 2.4497584; step 2 is padded
    lp = torch.tensor([[-1.0, -2.0, -5.0]])
    ref = torch.tensor([[-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss = constrained_sft_loss(lp, ref, mask)
    want = (4 * math.log(2) + math.log(1 + math.exp(2))) / 2
    assert want == pytest.approx(2.4497584, abs=1e-6)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    # explicit betas [1, 1, 1]: l0 = 2 ln 2, l1 = 2 ln(1 + e)
    loss = constrained_sft_loss(lp, ref, mask, torch.ones(3))
    assert loss.item() == pytest.approx((2 * math.log(2) + 2 * math.log(1 + math.e)) / 2, abs=1e-6)


def test_constrained_sft_token_mean_and_gradients() -> None:
    g = torch.Generator().manual_seed(7)
    lp = -torch.rand(2, 4, generator=g) * 3
    ref = (-torch.rand(2, 4, generator=g) * 3).requires_grad_(True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    betas = torch.tensor([0.5, 2.0, 2.0, 2.0])
    per = -(2 / betas) * F.logsigmoid(betas * (lp - ref.detach()))
    want = (per * mask).sum() / 5
    lp.requires_grad_(True)
    loss = constrained_sft_loss(lp, ref, mask)
    assert torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    assert ref.grad is None
    assert bool((lp.grad[mask == 0] == 0).all()) and bool((lp.grad[mask == 1] < 0).all())


def test_constrained_sft_small_beta_is_ce_like() -> None:
    # beta -> 0: l ≈ (2 / beta) ln 2 - (logp - ref): the gradient in logp tends to -1 (SFT's)
    lp = torch.tensor([[-3.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-0.2, -4.0]])
    constrained_sft_loss(lp, ref, torch.ones(1, 2), torch.full((2,), 1e-4)).backward()
    assert torch.allclose(lp.grad, torch.full((1, 2), -0.5), atol=1e-4)
    # large beta above the reference: the loss saturates, gradient vanishes
    lp.grad = None
    constrained_sft_loss(lp, ref, torch.ones(1, 2), torch.full((2,), 20.0)).backward()
    assert abs(lp.grad[0, 1].item()) < 1e-6


def test_constrained_sft_errors() -> None:
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"token_logprobs must be \[B, T\]"):
        constrained_sft_loss(lp[0], lp[0], torch.ones(3))
    with pytest.raises(ValueError, match="shapes disagree: token_logprobs .* reference_token"):
        constrained_sft_loss(lp, lp[:, :2], torch.ones(2, 3))
    with pytest.raises(ValueError, match="shapes disagree: mask"):
        constrained_sft_loss(lp, lp, torch.ones(2, 2))
    with pytest.raises(ValueError, match="mask has no valid step"):
        constrained_sft_loss(lp, lp, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask must contain only 0/1"):
        constrained_sft_loss(lp, lp, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="shapes disagree: betas"):
        constrained_sft_loss(lp, lp, torch.ones(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="betas must be finite and > 0"):
        constrained_sft_loss(lp, lp, torch.ones(2, 3), torch.tensor([1.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- fused CE + subset


def _fused_case(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Logits [3, 9, 13] with prompts ignored, one padded example and a clamped (repeated) step."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 9, 13, generator=g).to(dtype)
    labels = torch.randint(0, 13, (3, 9), generator=g)
    labels[:, :4] = -100
    labels[1, 7:] = -100  # shorter response: padded tail
    positions = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 6], [5, 6, 7, 8]])
    positions[1, 3] = 6  # a padded step clamped onto the previous position
    safety_ids = torch.tensor([0, 2, 7, 12])
    upstream = torch.randn(3, 4, 4, generator=g)
    return logits, labels, positions, safety_ids, upstream


def _unfused(logits, labels, positions, safety_ids):
    rows = torch.arange(logits.shape[0])[:, None, None]
    return response_cross_entropy(logits, labels), logits[rows, positions[..., None], safety_ids]


def test_fused_ce_and_subset_equal_the_unfused_values_and_gradients() -> None:
    logits, labels, positions, safety_ids, upstream = _fused_case()
    fused_in = logits.clone().requires_grad_(True)
    plain_in = logits.clone().requires_grad_(True)
    ce, subset = cross_entropy_and_subset(fused_in, labels, positions, safety_ids)
    ce_ref, subset_ref = _unfused(plain_in, labels, positions, safety_ids)
    assert torch.equal(subset, subset_ref)
    assert float(ce.detach()) == pytest.approx(float(ce_ref.detach()), abs=1e-6)
    (3.0 * ce + (subset * upstream).sum()).backward()
    (3.0 * ce_ref + (subset_ref * upstream).sum()).backward()
    assert torch.allclose(fused_in.grad, plain_in.grad, atol=1e-6)
    # the repeated (clamped) position received both steps' gradient
    assert fused_in.grad[1, 6, 2] != 0


def test_fused_ce_alone_equals_response_cross_entropy() -> None:
    logits, labels, *_ = _fused_case(seed=1)
    fused_in = logits.clone().requires_grad_(True)
    plain_in = logits.clone().requires_grad_(True)
    ce, subset = cross_entropy_and_subset(fused_in, labels)
    assert subset is None
    ce.backward()
    response_cross_entropy(plain_in, labels).backward()
    assert torch.allclose(fused_in.grad, plain_in.grad, atol=1e-7)


def test_fused_chunks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import pact.trainer.loss as loss_module

    logits, labels, positions, safety_ids, upstream = _fused_case(seed=2)
    results = []
    for chunk_elements in (1 << 22, 26, 13):  # all rows in one chunk; 2 rows; 1 row per chunk
        monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", chunk_elements)
        x = logits.clone().requires_grad_(True)
        ce, subset = cross_entropy_and_subset(x, labels, positions, safety_ids)
        (ce + (subset * upstream).sum()).backward()
        results.append((ce.detach(), x.grad))
    for ce, grad in results[1:]:
        assert torch.equal(ce, results[0][0]) and torch.equal(grad, results[0][1])


def test_fused_keeps_the_logits_dtype_and_computes_ce_in_float32() -> None:
    logits, labels, positions, safety_ids, upstream = _fused_case(torch.bfloat16, seed=3)
    x = logits.clone().requires_grad_(True)
    ce, subset = cross_entropy_and_subset(x, labels, positions, safety_ids)
    assert ce.dtype == torch.float32 and subset.dtype == torch.bfloat16
    assert float(ce.detach()) == pytest.approx(float(response_cross_entropy(logits, labels)), abs=1e-5)
    (ce + (subset.float() * upstream).sum()).backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"safety_ids": None}, "positions and safety_ids go together"),
        ({"positions": torch.zeros(2, 4, dtype=torch.long)}, "positions must be [B, T]"),
        ({"safety_ids": torch.zeros(0, dtype=torch.long)}, "safety_ids must be a non-empty [S] vector"),
        ({"labels": torch.full((3, 9), -100)}, "labels have no token to predict"),
        ({"labels": torch.zeros(3, 8, dtype=torch.long)}, "labels must be [B, L]"),
    ],
)
def test_fused_bad_inputs_say_what_is_wrong(change: dict, message: str) -> None:
    logits, labels, positions, safety_ids, _ = _fused_case()
    args = {"labels": labels, "positions": positions, "safety_ids": safety_ids, **change}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cross_entropy_and_subset(logits, **args)


@pytest.mark.parametrize("gap", [40.0, 60.0, 80.0, 200.0])
def test_target_stays_normalized_when_the_weighted_mass_underflows(gap: float) -> None:
    """Regression (design audit): the top token of S has weight 0 and every weighted token
    is `gap` nats lower, so sum(softmax(m / T) * w) ~ exp(-gap / T) is below float32's
    reach. q must still be normalize(softmax(m / T) * w) = w / sum(w) here, and KL_t the
    formula of docs/loss.md (computed in float64 in log space), not a shrunken or negative value."""
    weights = torch.tensor([0.0, 0.4, 0.6, 0.0])
    full = torch.tensor([[[-0.01, -gap, -gap, -5.0]]])
    mask = torch.ones(1, 1)
    terms = pact_kl_terms(full, full, full, weights, mask)
    q = pact_target(full, full, terms.gate, weights, PactConfig())
    assert torch.allclose(q, torch.tensor([[[0.0, 0.4, 0.6, 0.0]]]), atol=1e-6)
    temp = 2.0
    log_p = torch.log_softmax(full.double() / temp, dim=-1)[0, 0]
    expected = temp**2 * sum(qj * (math.log(qj) - float(log_p[j])) for j, qj in ((1, 0.4), (2, 0.6)))
    assert float(terms.kl) == pytest.approx(expected, rel=1e-5)
    assert float(terms.kl) > 0
