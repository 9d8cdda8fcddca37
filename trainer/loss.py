"""PACT loss (stage 2) and the plain / constrained SFT losses it is compared with.

Pure functions: tensors in, tensors out, no I/O. Everything is computed in float32.

Position convention: step ``t`` (0-based) of a ``[B, T, S]`` tensor holds the
distribution that predicts response token ``t``, i.e. the logits at input position
``response_start - 1 + t``. ``S`` is the safety subset (token ids ascending); the
inputs may be raw logits or full-vocabulary log-probabilities of those ids: the
loss is invariant to a per-step additive shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pact.core.config import check_int, check_number, flag, setting

__all__ = [
    "PactConfig",
    "PactTerms",
    "top_p_count",
    "pact_gate",
    "pact_target",
    "pact_kl_terms",
    "pact_kl",
    "response_cross_entropy",
    "cross_entropy_and_subset",
    "token_logprobs",
    "constrained_sft_betas",
    "constrained_sft_loss",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PactConfig:
    """Hyper-parameters of the PACT gate and KL (defaults are the paper's; docs/loss.md)."""

    top_p: float = setting(0.9, help="Gate: top-p mass p.", flag="--top-p")
    alpha: float = setting(2.0, help="Gate: sigmoid slope α.", flag="--gate-alpha")
    bias: float = setting(0.0, help="Gate: bias b.", flag="--gate-bias")
    gate_temperature: float = setting(1.0, help="Gate: softmax temperature T_g.", flag="--gate-temperature")
    prefix_n: int = setting(8, help="Gate: steps N before the decay.", flag="--gate-prefix")
    decay_tau: float = setting(8.0, help="Gate: decay τ_d (<= 0: hard cut at N).", flag="--gate-decay")
    boost: float = setting(1.0, help="Gate: boost β.", flag="--gate-boost")
    temperature: float = setting(2.0, help="KL temperature T.", flag="--kl-temperature")

    def __post_init__(self) -> None:
        def name(field: str) -> str:
            return f"PactConfig.{field} ({flag(PactConfig, field)})"

        check_number(self.top_p, name("top_p"), minimum=0.0, inclusive=False, at_most=1.0)
        check_number(self.alpha, name("alpha"))
        check_number(self.bias, name("bias"))
        check_number(self.gate_temperature, name("gate_temperature"), minimum=0.0, inclusive=False)
        check_int(self.prefix_n, name("prefix_n"), 0)
        check_number(self.decay_tau, name("decay_tau"))
        check_number(self.boost, name("boost"), minimum=0.0)
        check_number(self.temperature, name("temperature"), minimum=0.0, inclusive=False)


@dataclass
class PactTerms:
    """Result of :func:`pact_kl_terms`."""

    kl: Tensor  # scalar: token mean of KL_t over the valid steps of the batch
    kl_per_step: Tensor  # [B, T], zero on padded steps
    gate: Tensor  # [B, T], c_t (detached), zero on padded steps


# ----------------------------------------------------------------------------- checks


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def _check_subset(**tensors: Tensor) -> None:
    """All named tensors are [B, T, S] with one shape and S > 0."""
    names = list(tensors)
    first = tensors[names[0]]
    for name, x in tensors.items():
        if x.dim() != 3:
            raise ValueError(f"{name} must be [B, T, S], got shape {_shape(x)}")
        if x.shape != first.shape:
            raise ValueError(f"shapes disagree: {names[0]} {_shape(first)} vs {name} {_shape(x)}")
    if first.shape[-1] == 0:
        raise ValueError("empty safety set: the last dimension S of the logits is 0")


def _check_mask(mask: Tensor, like: Tensor, like_name: str) -> Tensor:
    """mask is [B, T] matching like[:, :, 0]; 0/1 values; returns float32."""
    if mask.shape != like.shape[:2]:
        raise ValueError(
            f"shapes disagree: mask {_shape(mask)} vs {like_name} {_shape(like)} "
            "(mask must be [B, T])"
        )
    m = mask.to(device=like.device, dtype=torch.float32)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask must contain only 0/1 (or False/True) values")
    return m


def _check_weights(weights: Tensor, size: int, device: torch.device) -> Tensor:
    """weights is [S], finite, >= 0, not all zero; returns float32 on device."""
    w = torch.as_tensor(weights)
    if w.dim() != 1 or w.shape[0] != size:
        raise ValueError(f"shapes disagree: weights {_shape(w)} vs safety set size S={size}")
    w = w.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights contain non-finite values (nan or inf)")
    if bool((w < 0).any()):
        raise ValueError("weights contain negative values; use w_j = max(v_j, 0)")
    if not bool((w > 0).any()):
        raise ValueError("weights are all zero: the reweighted target is undefined")
    return w


# ----------------------------------------------------------------------------- PACT


def top_p_count(logits: Tensor, top_p: float, temperature: float) -> Tensor:
    """Tokens needed to reach mass ``top_p``: ``[..., S] -> [...]`` (float32).

    ``p = softmax(x / temperature)``, sorted descending; the count is
    ``(cumsum(p) < top_p).sum() + 1``.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError("empty safety set: the last dimension S of the logits is 0")
    with torch.no_grad():
        p = torch.softmax(logits.detach().float() / temperature, dim=-1)
        cdf = torch.sort(p, dim=-1, descending=True).values.cumsum(dim=-1)
        return (cdf < top_p).sum(dim=-1).float() + 1.0


def pact_gate(
    student_logits: Tensor, reference_post: Tensor, mask: Tensor, config: PactConfig
) -> Tensor:
    """Gate ``c`` [B, T] from student u and post-only reference o (both [B, T, S]).

    ``c = sigmoid(alpha * (n(u) - n(o)) / |S| - alpha * bias)`` times ``mask``, times the
    decay ``exp(-max(t - N, 0) / tau_d)`` (or the hard cut ``t < N`` when
    ``tau_d <= 0``), times ``boost``. Carries no gradient.
    """
    _check_subset(student_logits=student_logits, reference_post=reference_post)
    m = _check_mask(mask, student_logits, "student_logits")
    with torch.no_grad():
        size = student_logits.shape[-1]
        n_u = top_p_count(student_logits, config.top_p, config.gate_temperature)
        n_o = top_p_count(reference_post, config.top_p, config.gate_temperature)
        c = torch.sigmoid(config.alpha * (n_u / size - n_o / size - config.bias))
        c = c * m
        t = torch.arange(c.shape[1], device=c.device, dtype=torch.float32)
        if config.decay_tau > 0:
            decay = torch.exp(-torch.clamp(t - config.prefix_n, min=0.0) / config.decay_tau)
        else:
            decay = (t < config.prefix_n).float()
        c = c * decay * config.boost
    return c.detach()


def pact_target(
    reference_full: Tensor,
    reference_post: Tensor,
    gate: Tensor,
    weights: Tensor,
    config: PactConfig,
) -> Tensor:
    """Target distribution ``q`` [B, T, S] over the safety subset (detached).

    ``m = (1 - c) f + c o``; ``q = normalize(softmax(m / T) * w)``, computed as
    ``softmax(m / T + log w)`` (the same distribution; exact also when the weighted
    mass ``sum(softmax(m / T) * w)`` is too small for float32).
    """
    _check_subset(reference_full=reference_full, reference_post=reference_post)
    if gate.shape != reference_full.shape[:2]:
        raise ValueError(
            f"shapes disagree: gate {_shape(gate)} vs reference_full {_shape(reference_full)} "
            "(gate must be [B, T])"
        )
    w = _check_weights(weights, reference_full.shape[-1], reference_full.device)
    with torch.no_grad():
        c = gate.detach().float()[..., None]
        m = (1.0 - c) * reference_full.detach().float() + c * reference_post.detach().float()
        return torch.softmax(m / config.temperature + w.float().log().view(1, 1, -1), dim=-1)


def pact_kl_terms(
    student_logits: Tensor,
    reference_full: Tensor,
    reference_post: Tensor,
    weights: Tensor,
    mask: Tensor,
    config: PactConfig = PactConfig(),
) -> PactTerms:
    """PACT KL and its parts. Inputs [B, T, S] (x3), weights [S], mask [B, T].

    ``KL_t = T^2 * sum_j q_j (log q_j - log_softmax(u / T)_j)``; ``kl`` is the token mean
    over the valid steps of the whole batch. Gradient flows into ``student_logits`` only.
    """
    _check_subset(
        student_logits=student_logits,
        reference_full=reference_full,
        reference_post=reference_post,
    )
    m = _check_mask(mask, student_logits, "student_logits")
    n_valid = m.sum()
    if not bool(n_valid > 0):
        raise ValueError("mask has no valid step: the batch has no response tokens")
    gate = pact_gate(student_logits, reference_post, m, config)
    q = pact_target(reference_full, reference_post, gate, weights, config)
    log_q = q.log()
    temp = config.temperature
    log_p = F.log_softmax(student_logits.float() / temp, dim=-1)
    # 0 * log 0 = 0: tokens of weight 0 (q = 0, log q = -inf) add nothing
    kl_t = temp**2 * torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1)
    # where() rather than a product, so garbage on padded steps cannot leak in as nan.
    kl_per_step = torch.where(m > 0, kl_t, torch.zeros_like(kl_t))
    kl = kl_per_step.sum() / n_valid.clamp_min(1.0)
    return PactTerms(kl=kl, kl_per_step=kl_per_step, gate=gate)


def pact_kl(
    student_logits: Tensor,
    reference_full: Tensor,
    reference_post: Tensor,
    weights: Tensor,
    mask: Tensor,
    config: PactConfig = PactConfig(),
) -> Tensor:
    """Scalar PACT KL: ``pact_kl_terms(...).kl``, with the same arguments."""
    return pact_kl_terms(student_logits, reference_full, reference_post, weights, mask, config).kl


# ----------------------------------------------------------------------------- SFT


def _check_lm(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V], got shape {_shape(logits)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"shapes disagree: logits {_shape(logits)} vs labels {_shape(labels)} "
            "(labels must be [B, L])"
        )


def response_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Causal LM cross-entropy: logits [B, L, V], labels [B, L] (-100 ignored) -> scalar.

    ``logits[:, :-1]`` predict ``labels[:, 1:]``; token mean over all label tokens of the
    batch (as ``model(labels=...).loss`` in transformers), in float32.
    """
    _check_lm(logits, labels)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        raise ValueError("labels have no token to predict: the batch has no response tokens")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-prob of each next label token: [B, L, V], [B, L] -> [B, L-1] (float32).

    Entry ``i`` is ``log_softmax(logits[:, i])[labels[:, i + 1]]``; 0 where that label
    is -100.
    """
    _check_lm(logits, labels)
    shift_labels = labels[:, 1:].to(logits.device)
    valid = shift_labels != IGNORE_INDEX
    index = torch.where(valid, shift_labels, torch.zeros_like(shift_labels))
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def constrained_sft_betas(
    steps: int,
    first: float = 0.5,
    early: float = 2.0,
    late: float = 0.1,
    early_until: int = 5,
) -> Tensor:
    """Per-step beta [steps] (Qi et al. 2024): ``first`` at step 0, ``early`` for steps
    1..early_until-1, ``late`` from ``early_until`` on."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    for name, value in (("first", first), ("early", early), ("late", late)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"constrained_sft_betas: {name} must be finite and > 0, got {value!r}")
    t = torch.arange(steps)
    betas = torch.where(t < early_until, torch.tensor(early), torch.tensor(late))
    betas = torch.where(t == 0, torch.tensor(first), betas)
    return betas.float()


def constrained_sft_loss(
    token_logprobs: Tensor,
    reference_token_logprobs: Tensor,
    mask: Tensor,
    betas: Tensor | None = None,
) -> Tensor:
    """Token-wise constrained SFT (Qi et al. 2024). Inputs [B, T] -> scalar.

    ``l_t = -(2 / beta_t) * logsigmoid(beta_t * (logp_theta(y_t) - logp_ref(y_t)))``,
    token mean over the valid steps of the batch. Step t is response token t, so pass
    response-aligned log-probs. ``betas`` is [T] (or [B, T]); default
    ``constrained_sft_betas(T)``.
    """
    if token_logprobs.dim() != 2:
        raise ValueError(f"token_logprobs must be [B, T], got shape {_shape(token_logprobs)}")
    if reference_token_logprobs.shape != token_logprobs.shape:
        raise ValueError(
            f"shapes disagree: token_logprobs {_shape(token_logprobs)} vs "
            f"reference_token_logprobs {_shape(reference_token_logprobs)}"
        )
    if mask.shape != token_logprobs.shape:
        raise ValueError(
            f"shapes disagree: mask {_shape(mask)} vs token_logprobs {_shape(token_logprobs)}"
        )
    m = mask.to(device=token_logprobs.device, dtype=torch.float32)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask must contain only 0/1 (or False/True) values")
    n_valid = m.sum()
    if not bool(n_valid > 0):
        raise ValueError("mask has no valid step: the batch has no response tokens")
    steps = token_logprobs.shape[1]
    if betas is None:
        betas = constrained_sft_betas(steps)
    b = torch.as_tensor(betas).to(device=token_logprobs.device, dtype=torch.float32)
    if b.shape not in (torch.Size([steps]), token_logprobs.shape):
        raise ValueError(
            f"shapes disagree: betas {_shape(b)} vs token_logprobs {_shape(token_logprobs)} "
            "(betas must be [T] or [B, T])"
        )
    if not bool((torch.isfinite(b) & (b > 0)).all()):
        raise ValueError("betas must be finite and > 0")
    diff = token_logprobs.float() - reference_token_logprobs.detach().float()
    loss_t = -(2.0 / b) * F.logsigmoid(b * diff)
    loss_t = torch.where(m > 0, loss_t, torch.zeros_like(loss_t))
    return loss_t.sum() / n_valid.clamp_min(1.0)


# ----------------------------------------------------------------------------- fused


_CHUNK_ELEMENTS = 1 << 22  # float32 elements of one row chunk (16 MiB) in the fused pass


class _CrossEntropyAndSubset(torch.autograd.Function):
    """CE over ``[B, L, V]`` logits and their ``[B, T, S]`` safety subset, one gradient buffer.

    Taken apart, ``F.cross_entropy`` keeps a float32 ``[N, V]`` log-softmax and
    ``logits[..., ids]`` allocates its own dense ``[B, L, V]`` gradient, which autograd
    then adds to the CE's. Here the backward writes both into one ``[B, L, V]`` buffer
    and the forward keeps only the logits it was given and one log-sum-exp per row.
    """

    @staticmethod
    def forward(ctx, logits, rows, targets, positions, safety_ids):  # noqa: ANN001, ANN205
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        lse = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        for begin in range(0, rows.shape[0], chunk):
            lse[begin : begin + chunk] = torch.logsumexp(flat[rows[begin : begin + chunk]].float(), dim=-1)
        picked = flat[rows, targets].float()
        ce = (lse - picked).mean()
        batch = torch.arange(logits.shape[0], device=logits.device)[:, None, None]
        subset = logits[batch, positions[..., None], safety_ids[None, None, :]]
        ctx.save_for_backward(logits, rows, targets, lse, positions, safety_ids)
        return ce, subset

    @staticmethod
    def backward(ctx, grad_ce, grad_subset):  # noqa: ANN001, ANN205
        logits, rows, targets, lse, positions, safety_ids = ctx.saved_tensors
        vocab = logits.shape[-1]
        grad = torch.zeros_like(logits)
        flat = grad.view(-1, vocab)
        logits_flat = logits.reshape(-1, vocab)
        scale = grad_ce.float() / rows.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        for begin in range(0, rows.shape[0], chunk):
            index = rows[begin : begin + chunk]
            probs = (logits_flat[index].float() - lse[begin : begin + chunk, None]).exp_()
            probs[torch.arange(index.shape[0], device=probs.device), targets[begin : begin + chunk]] -= 1.0
            flat[index] = probs.mul_(scale).to(grad.dtype)
        if grad_subset is not None and grad_subset.numel():
            batch = torch.arange(logits.shape[0], device=logits.device)[:, None, None]
            index = (batch, positions[..., None], safety_ids[None, None, :])
            grad.index_put_(index, grad_subset.to(grad.dtype), accumulate=True)
        return grad, None, None, None, None


def cross_entropy_and_subset(
    logits: Tensor, labels: Tensor, positions: Tensor | None = None, safety_ids: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``response_cross_entropy(logits, labels)`` and the safety-subset logits, fused.

    logits [B, L, V]; labels [B, L] (-100 ignored); positions [B, T] the input position
    whose logits predict response token t (in [0, L)); safety_ids [S] ->
    (scalar CE in float32, subset [B, T, S] in the logits' dtype, or None when
    positions and safety_ids are None). Values and gradients equal
    ``response_cross_entropy`` and ``logits[b, positions[b, t], safety_ids]``; the
    backward pass allocates one ``[B, L, V]`` gradient, and the forward keeps no
    float32 copy of the logits.
    """
    _check_lm(logits, labels)
    device = logits.device
    if (positions is None) != (safety_ids is None):
        raise ValueError("positions and safety_ids go together: give both or neither")
    if positions is None:
        positions = torch.zeros(logits.shape[0], 0, dtype=torch.long, device=device)
        safety_ids = torch.zeros(0, dtype=torch.long, device=device)
    elif positions.dim() != 2 or positions.shape[0] != logits.shape[0]:
        raise ValueError(
            f"shapes disagree: positions {_shape(positions)} vs logits {_shape(logits)} "
            "(positions must be [B, T])"
        )
    elif safety_ids.dim() != 1 or safety_ids.numel() == 0:
        raise ValueError(f"safety_ids must be a non-empty [S] vector, got shape {_shape(safety_ids)}")
    length = logits.shape[1]
    shift_labels = labels[:, 1:].to(device)
    valid = shift_labels != IGNORE_INDEX
    if not bool(valid.any()):
        raise ValueError("labels have no token to predict: the batch has no response tokens")
    batch_index, position_index = valid.nonzero(as_tuple=True)
    rows = batch_index * length + position_index
    targets = shift_labels[batch_index, position_index]
    ce, subset = _CrossEntropyAndSubset.apply(
        logits, rows, targets, positions.to(device).long(), safety_ids.to(device).long()
    )
    return ce, (subset if safety_ids.numel() else None)
