"""The LM head: the one place that turns final hidden states into what a stage needs.

Memory does not grow with the vocabulary: every function here works on row chunks of
at most `budget` logits (elements), so no more than one `[rows, V]` block exists at a
time, and only the rows a stage asks for ever reach the head.

- `LMHead.of(model)` resolves the head of any transformers causal LM: tied or untied
  output embeddings, peft and DDP wrappers, and what the model's forward does to
  `lm_head(h)` (`LogitTransform`: Cohere's `logit_scale`, Granite's `logits_scaling`,
  Gemma 2's `final_logit_softcapping`). Logits are float32 (the matmul runs in the
  weights' dtype, bf16 included, and its result is taken to float32).
- `decoder_hidden(model, input_ids, attention_mask)`: final-norm hidden states [B, L, H]
  through the model's own forward (so DDP/FSDP hooks run), its head applied to no row.
- No-grad statistics (`head_stats`): per-row log-sum-exp, the label token's log-prob,
  the safety-subset log-probs, entropy, top-k.
- With gradients (`fused_head_loss`): cross-entropy, a loss on each row's token
  log-prob (constrained SFT) and a loss on the safety-subset logits (the PACT KL),
  computed chunk by chunk by one autograd Function that computes each chunk's
  logits gradient in its forward pass and keeps only `[rows, H]` and `[V, H]`
  gradients for the backward pass.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pact.core.errors import PactError

# Logits (elements) of one row chunk. 2**26 float32 logits are 256 MiB (441 rows of a
# 151,936-token vocabulary): the training head's one reused buffer, the no-grad
# statistics' two or three temporaries stay under 1 GiB: room to spare next to an 8B
# model in bf16 with LoRA on a 24 GB GPU. Chunks of half that take ~1.2x the time on a
# CPU (the [V, H] weight is read once more per chunk; docs/benchmarks.md).
DEFAULT_HEAD_CHUNK_LOGITS = 1 << 26


# ----------------------------------------------------------------------------- resolving the head


def decoder_body(model: Any) -> Any:
    """The module that maps input ids to final-norm hidden states (`get_decoder()` or `.model`)."""
    model = unwrap(model)
    getter = getattr(model, "get_decoder", None)
    body = getter() if callable(getter) else None
    if body is None or body is model:
        body = getattr(model, "model", None)
    if body is None or body is model:
        raise PactError(f"{type(model).__name__}: cannot find the decoder body (get_decoder() or .model)")
    return body


def unwrap(model: Any) -> Any:
    """The model inside DDP (`.module`); any other model as it is (peft and FSDP2 models
    answer `get_output_embeddings` and `get_decoder` themselves)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _model_name(model: Any) -> str:
    """The class name of the transformers model inside DDP and peft wrappers."""
    model = unwrap(model)
    base = getattr(model, "get_base_model", None)
    return type(base() if callable(base) else model).__name__


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to `lm_head(h)`: `z = cap * tanh(x * scale / cap)`
    (no tanh when `cap` is None). Applied in float32."""

    scale: float = 1.0
    cap: float | None = None

    @classmethod
    def of(cls, config: Any) -> LogitTransform:
        """From a transformers config: `logit_scale` (multiply, Cohere), `logits_scaling`
        (divide, Granite), `final_logit_softcapping` (Gemma 2/3)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = 1.0
        multiplier = getattr(text, "logit_scale", None)
        divisor = getattr(text, "logits_scaling", None)
        cap = getattr(text, "final_logit_softcapping", None)
        if _number(multiplier) and multiplier != 1:
            scale *= float(multiplier)
        if _number(divisor) and divisor != 1:
            scale /= float(divisor)
        return cls(scale, float(cap) if _number(cap) and cap else None)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.cap is None

    def __call__(self, logits: Tensor) -> Tensor:
        """Transformed logits (in place when the input is float32 and has no grad)."""
        if self.scale != 1.0:
            logits = logits.mul_(self.scale) if _inplace(logits) else logits * self.scale
        if self.cap is not None:
            if _inplace(logits):
                logits = logits.div_(self.cap).tanh_().mul_(self.cap)
            else:
                logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def derivative(self, transformed: Tensor) -> Tensor | float:
        """dz/dx at the transformed values z: `scale * (1 - (z / cap)^2)`, or the scale."""
        if self.cap is None:
            return self.scale
        return (transformed / self.cap).square_().neg_().add_(1.0).mul_(self.scale)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _inplace(tensor: Tensor) -> bool:
    return tensor.dtype == torch.float32 and not tensor.requires_grad


@dataclass(frozen=True)
class LMHead:
    """Weight [V, H], bias [V] or None, and the transform of a model's output logits."""

    weight: Tensor
    bias: Tensor | None
    transform: LogitTransform

    @classmethod
    def of(cls, model: Any) -> LMHead:
        """The head of `model` (tied embeddings, peft, DDP; a peft LoRA on the head itself
        is refused with a PactError)."""
        model = unwrap(model)
        module = model.get_output_embeddings()
        if module is None:
            raise PactError(f"{type(model).__name__} has no output embeddings (LM head)")
        if getattr(module, "lora_A", None):
            raise PactError(
                "LoRA adapters on the LM head are not supported by pact's chunked head; "
                "leave lm_head out of --lora-targets"
            )
        if hasattr(module, "modules_to_save"):
            raise PactError("a trainable copy of the LM head (peft modules_to_save) is not supported")
        module = getattr(module, "base_layer", module)
        return cls(module.weight, getattr(module, "bias", None), LogitTransform.of(model.config))

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def rows_per_chunk(self, budget: int) -> int:
        """Rows of `[rows, V]` logits that fit in `budget` elements (at least one)."""
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise PactError(f"the LM-head chunk budget must be a positive number of logits, got {budget!r}")
        return max(1, budget // self.vocab_size)

    def logits(self, hidden: Tensor) -> Tensor:
        """Float32 transformed logits [n, V] of hidden states [n, H]."""
        raw = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        return self.transform(raw.float())

    def subset_logits(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """Float32 transformed logits [n, len(ids)] of hidden states [n, H] for the
        vocabulary ids `ids` (int64) only: the head's matmul over those rows of the weight."""
        bias = None if self.bias is None else self.bias.index_select(0, ids)
        raw = F.linear(hidden.to(self.weight.dtype), self.weight.index_select(0, ids), bias)
        return self.transform(raw.float())

    def logits_into(self, hidden: Tensor, out: Tensor) -> Tensor:
        """`logits(hidden)` written into `out` (float32 [n, V], no grad): a float32 head's
        matmul writes there directly, so a chunk loop reuses one buffer."""
        if self.weight.dtype != torch.float32:
            return self.transform(out.copy_(F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)))
        hidden = hidden.float()
        if self.bias is None:
            torch.mm(hidden, self.weight.T, out=out)
        else:
            torch.addmm(self.bias.float(), hidden, self.weight.T, out=out)
        return self.transform(out)


@contextlib.contextmanager
def _capture_output(module: Any) -> Iterator[list[Any]]:
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def decoder_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final-norm hidden states [B, L, H] of a batch, through the model's own forward.

    The forward runs with `logits_to_keep` = no position, so its head sees no row, and the
    decoder body's output is taken from a hook: DDP and FSDP wrappers see their forward,
    and no `[B, L, V]` logits exist.
    """
    body = decoder_body(model)
    no_position = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    with _capture_output(body) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=no_position)
    if len(captured) != 1:
        raise PactError(f"{_model_name(model)}: its forward did not run the decoder body once")
    output = captured[0]
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


HEAD_CHECK_TOKENS = 32
HEAD_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.25}


@torch.no_grad()
def check_head_matches_forward(model: Any, input_ids: Tensor) -> None:
    """Refuse a model whose forward post-processes its logits in a way `LMHead` does not
    reproduce: compares log-softmax of `LMHead.of(model)` on `decoder_hidden` with that of
    `model(input_ids).logits` on the first HEAD_CHECK_TOKENS ids of input_ids [1, L], in
    eval mode (no dropout); PactError when they differ."""
    ids = input_ids[:, :HEAD_CHECK_TOKENS]
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        hidden = decoder_hidden(model, ids, mask)
        ours = torch.log_softmax(LMHead.of(model).logits(hidden[0]), dim=-1)
        theirs = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float(), dim=-1)
    finally:
        model.train(was_training)
    gap = (ours - theirs).abs().max().item()
    tolerance = HEAD_CHECK_TOLERANCE.get(LMHead.of(model).weight.dtype, 0.25)
    if not math.isfinite(gap) or gap > tolerance:
        raise PactError(
            f"{_model_name(model)} post-processes its logits in a way pact does not reproduce "
            f"(its LM head differs from the model's forward by {gap:.3g} in log-prob); this architecture is not supported"
        )


# ----------------------------------------------------------------------------- no-grad statistics


@torch.no_grad()
def head_stats(
    head: LMHead,
    hidden: Tensor,
    *,
    budget: int = DEFAULT_HEAD_CHUNK_LOGITS,
    safety_ids: Tensor | None = None,
    target_ids: Tensor | None = None,
    entropy: bool = False,
    top_k: int = 0,
) -> dict[str, Tensor]:
    """Float32 log-softmax statistics of hidden states [N, H], chunk by chunk.

    Always `lse` [N] (log-sum-exp of the logits); with safety_ids [S]: `safety_logprobs`
    [N, S]; with target_ids [N]: `token_logprob` [N]; with entropy: `entropy` [N] (nats);
    with top_k > 0: `top_k_logprobs` [N, k] and `top_k_ids` [N, k] (int64, descending).
    """
    count, device = hidden.shape[0], hidden.device
    chunk = head.rows_per_chunk(budget)
    out: dict[str, Tensor] = {"lse": torch.empty(count, dtype=torch.float32, device=device)}
    if safety_ids is not None:
        safety_ids = safety_ids.to(device)
        out["safety_logprobs"] = torch.empty(count, safety_ids.numel(), dtype=torch.float32, device=device)
    if target_ids is not None:
        target_ids = target_ids.to(device)
        out["token_logprob"] = torch.empty(count, dtype=torch.float32, device=device)
    if entropy:
        out["entropy"] = torch.empty(count, dtype=torch.float32, device=device)
    if top_k:
        k = min(top_k, head.vocab_size)
        out["top_k_logprobs"] = torch.empty(count, k, dtype=torch.float32, device=device)
        out["top_k_ids"] = torch.empty(count, k, dtype=torch.long, device=device)
    buffer = torch.empty(min(chunk, count), head.vocab_size, dtype=torch.float32, device=device)
    for start in range(0, count, chunk):
        rows = slice(start, min(start + chunk, count))
        logits = head.logits_into(hidden[rows], buffer[: rows.stop - start])
        lse = torch.logsumexp(logits, dim=-1)
        out["lse"][rows] = lse
        logprobs = logits.sub_(lse[:, None])  # the log-softmax, in the chunk's buffer
        del logits
        if safety_ids is not None:
            out["safety_logprobs"][rows] = logprobs.index_select(1, safety_ids)
        if target_ids is not None:
            out["token_logprob"][rows] = logprobs.gather(1, target_ids[rows].view(-1, 1)).view(-1)
        if top_k:
            values, ids = logprobs.topk(k, dim=-1)
            out["top_k_logprobs"][rows], out["top_k_ids"][rows] = values, ids
        if entropy:
            out["entropy"][rows] = -logprobs.exp().mul_(logprobs).sum(dim=-1)
        del logprobs
    del buffer
    return out


def logit_stats(
    model: Any,
    hidden: Tensor,
    safety_ids: Tensor,
    chunk: int = 256,
    target_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Precompute's statistics of hidden states [N, H], `chunk` rows at a time.

    Returns float32 `safety_logprobs` [N, S] (full-vocabulary log-probs at the safety
    ids), `entropy` [N] (nats) and, with target_ids, `token_logprob` [N].
    """
    if chunk < 1:
        raise PactError(f"chunk must be at least 1, got {chunk}")
    head = LMHead.of(model)
    stats = head_stats(
        head, hidden, budget=chunk * head.vocab_size, safety_ids=safety_ids, target_ids=target_ids, entropy=True
    )
    keys = ("safety_logprobs", "entropy") + (("token_logprob",) if target_ids is not None else ())
    return {key: stats[key] for key in keys}


# ----------------------------------------------------------------------------- with gradients


@dataclass(frozen=True)
class HeadLoss:
    """What `fused_head_loss` computes on N gathered rows (all optional but one).

    ce_weights: float32 [N], each row's weight in the cross-entropy (e.g. 1 / labels on
    label rows, 0 elsewhere); targets: int64 [N], the token each row predicts (any valid
    id where unused). token_loss(logprob [n], rows [n]) -> scalar: a loss on the
    target's log-prob of the rows `rows` of one chunk (its chunk sums add up to the
    loss). subset_ids [S] with subset_loss(logits [N, S]) -> scalar: a loss on the
    (transformed) logits of the subset.
    """

    targets: Tensor
    ce_weights: Tensor | None = None
    token_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    subset_ids: Tensor | None = None
    subset_loss: Callable[[Tensor], Tensor] | None = None


@dataclass
class HeadLossResult:
    """loss: scalar with gradient (CE + token loss + subset loss); the rest detached:
    ce, token_loss, subset_loss (scalars, 0 where not asked), token_logprob [N], subset [N, S]."""

    loss: Tensor
    ce: Tensor
    token_loss: Tensor
    subset_loss: Tensor
    token_logprob: Tensor
    subset: Tensor | None


def fused_head_loss(
    head: LMHead, hidden: Tensor, spec: HeadLoss, *, budget: int = DEFAULT_HEAD_CHUNK_LOGITS
) -> HeadLossResult:
    """The loss of `spec` on hidden rows [N, H] through `head`, in row chunks of `budget` logits.

    Values and gradients (into hidden, the head's weight and bias) equal those of the
    same losses on `head.logits(hidden)`; neither pass keeps `[N, V]`.
    """
    if hidden.dim() != 2:
        raise PactError(f"hidden rows must be [N, H], got shape {tuple(hidden.shape)}")
    if (spec.subset_ids is None) != (spec.subset_loss is None):
        raise PactError("subset_ids and subset_loss go together")
    outputs: dict[str, Tensor] = {}
    loss = _FusedHeadLoss.apply(hidden, head.weight, head.bias, head, spec, budget, outputs)
    return HeadLossResult(
        loss,
        outputs["ce"],
        outputs["token_loss"],
        outputs["subset_loss"],
        outputs["token_logprob"],
        outputs.get("subset"),
    )


def _local_grad(fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Value of fn on detached copies of inputs and its gradients with respect to them."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        value = fn(*leaves)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach().float(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]


class _FusedHeadLoss(torch.autograd.Function):
    """Forward: loss and its gradients wrt hidden [N, H], weight [V, H], bias [V], chunk
    by chunk; backward: those gradients times the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, spec, budget, outputs):  # noqa: ANN001, ANN205
        count, device = hidden.shape[0], hidden.device
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros(count, hidden.shape[1], dtype=torch.float32, device=device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if want_bias else None
        targets = spec.targets.to(device)
        ce_weights = spec.ce_weights.to(device, torch.float32) if spec.ce_weights is not None else None
        subset_ids = spec.subset_ids.to(device) if spec.subset_ids is not None else None
        subset = torch.empty(count, subset_ids.numel(), dtype=torch.float32, device=device) if subset_ids is not None else None
        token_logprob = torch.empty(count, dtype=torch.float32, device=device)
        ce = torch.zeros((), dtype=torch.float32, device=device)
        token_total = torch.zeros((), dtype=torch.float32, device=device)
        chunk = head.rows_per_chunk(budget)
        buffer = torch.empty(min(chunk, count), weight.shape[0], dtype=torch.float32, device=device)
        for start in range(0, count, chunk):
            rows = slice(start, min(start + chunk, count))
            logits = head.logits_into(hidden[rows], buffer[: rows.stop - start])
            index = targets[rows].view(-1, 1)
            picked = logits.gather(1, index).view(-1)
            if subset is not None:
                subset[rows] = logits.index_select(1, subset_ids)
            derivative = head.transform.derivative(logits) if head.transform.cap is not None else None
            probs, sums, lse = _exp_in_place(logits)
            token_logprob[rows] = picked - lse
            # d loss / d (token log-prob) per row; CE is -(token log-prob) weighed.
            coefficient = torch.zeros(picked.shape, dtype=torch.float32, device=device)
            if ce_weights is not None:
                weights = ce_weights[rows]
                ce = ce - (weights * token_logprob[rows]).sum()
                coefficient = coefficient - weights
            if spec.token_loss is not None:
                row_index = torch.arange(rows.start, rows.stop, device=device)
                value, (grad,) = _local_grad(lambda lp, i=row_index: spec.token_loss(lp, i), token_logprob[rows])
                token_total = token_total + value
                coefficient = coefficient + grad
            # d/dz of sum_r a_r (z_r[y_r] - lse_r) = a_r (onehot(y_r) - softmax(z_r)).
            grad_logits = probs.mul_((-coefficient / sums)[:, None])
            grad_logits.scatter_add_(1, index, coefficient[:, None])
            grad_logits = _chain(grad_logits, head.transform, derivative)
            _accumulate(grad_logits, hidden, weight, rows, grad_hidden, grad_weight, grad_bias, slice(None))
            del logits, probs, grad_logits, derivative
        del buffer
        subset_total = torch.zeros((), dtype=torch.float32, device=device)
        if subset is not None:
            subset_total, (grad_subset,) = _local_grad(spec.subset_loss, subset)
            grad_subset = _chain(grad_subset, head.transform, head.transform.derivative(subset.clone()) if head.transform.cap is not None else None)
            _accumulate(grad_subset, hidden, weight, slice(None), grad_hidden, grad_weight, grad_bias, subset_ids)
        outputs.update(
            ce=ce.detach(), token_loss=token_total, subset_loss=subset_total, token_logprob=token_logprob, subset=subset
        )
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        return ce + token_total + subset_total

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        grads = []
        for saved, dtype, present in zip(ctx.saved_tensors, ctx.dtypes, ctx.present, strict=True):
            grads.append(saved.mul(grad_loss.float()).to(dtype) if present else None)
        return grads[0], grads[1], grads[2], None, None, None, None


def _exp_in_place(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """exp(logits - rowmax) in place of `logits` [n, V], the row sums of those [n] and the
    row log-sum-exp [n] (`torch.logsumexp`'s formula, without its [n, V] temporary)."""
    maxes = logits.amax(dim=1, keepdim=True)
    maxes.masked_fill_(maxes.isinf(), 0.0)
    probs = logits.sub_(maxes).exp_()
    sums = probs.sum(dim=1)
    return probs, sums, sums.log().add_(maxes.view(-1))


def _chain(grad: Tensor, transform: LogitTransform, derivative: Tensor | None) -> Tensor:
    """Gradient wrt the head's raw output from the gradient wrt the transformed logits."""
    if derivative is not None:
        return grad.mul_(derivative)
    return grad.mul_(transform.scale) if transform.scale != 1.0 else grad


def _accumulate(
    grad_logits: Tensor,
    hidden: Tensor,
    weight: Tensor,
    rows: slice,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
    columns: slice | Tensor,
) -> None:
    """Add the gradients of `raw = hidden[rows] @ weight[columns].T + bias[columns]`
    given d loss / d raw [n, C] into the float32 accumulators."""
    compute = weight.dtype
    g = grad_logits.to(compute)
    w = weight if isinstance(columns, slice) else weight.index_select(0, columns)
    in_place = compute == torch.float32 and hidden.dtype == torch.float32
    if grad_hidden is not None:
        if in_place:
            grad_hidden[rows].addmm_(g, w)
        else:
            grad_hidden[rows] += (g @ w).float()
    if grad_weight is not None:
        if in_place and isinstance(columns, slice):
            grad_weight.addmm_(g.T, hidden[rows])
        else:
            update = (g.T @ hidden[rows].to(compute)).float()
            if isinstance(columns, slice):
                grad_weight += update
            else:
                grad_weight.index_add_(0, columns, update)
    if grad_bias is not None:
        update = grad_logits.sum(dim=0)
        if isinstance(columns, slice):
            grad_bias += update
        else:
            grad_bias.index_add_(0, columns, update)


# ----------------------------------------------------------------------------- no-grad rows, chunk by chunk
#
# A stage that needs the next-token distribution at a few positions of a batch (stage 0,
# the drift probe, generation) runs the decoder body once, keeps the final hidden states
# of those positions only (`selected_rows`) and turns them into float32 logits a chunk of
# rows at a time (`logit_chunks`): no more than `budget` elements of `[rows, V]` logits
# exist at once. The head is the model's output embedding module itself (a peft LoRA on
# it included) followed by the model's logit transform. A model whose decoder body
# cannot be found is run whole, and its logits at the selected positions are gathered.

# Elements of [rows, V] float32 logits one chunk may hold: 16 MiB, 27 rows at V = 151,936.
DEFAULT_HEAD_BUDGET = 1 << 22


def rows_per_chunk(vocab: int, budget: int = DEFAULT_HEAD_BUDGET) -> int:
    """How many rows of [*, vocab] logits fit in `budget` elements (at least one)."""
    if budget < 1:
        raise PactError(f"the LM-head budget must be at least 1 element, got {budget}")
    return max(1, budget // max(vocab, 1))


@contextlib.contextmanager
def root_unsharded(model: Any) -> Iterator[Any]:
    """The model (unwrapped from DDP), with an FSDP2 root's own parameters (embeddings,
    final norm, head) gathered while the body and the head are called separately; the
    root is initialised first, as its forward would, so its layers do not take the root's
    role. A collective under FSDP: every rank enters it."""
    model = unwrap(model)
    fsdp_state = getattr(model, "_get_fsdp_state", None)
    sharded = callable(fsdp_state) and callable(getattr(model, "reshard", None))
    if sharded:
        fsdp_state()._lazy_init()
        model.unshard()
    try:
        yield model
    finally:
        if sharded:
            model.reshard()


def head_rows(model: Any) -> int:
    """Rows of the model's output embedding (the size V of its logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers >= 4.50 causal LMs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def find_body(model: Any) -> Any | None:
    """The decoder body of `model`, or None for a model that has none pact can find."""
    try:
        return decoder_body(model)
    except PactError:
        return None


@dataclass
class HeadRows:
    """N selected rows on their way to logits.

    `values` is [N, H] final hidden states when `model` is set (the head still has to
    run), else [N, V] logits the model's forward already produced.
    """

    values: torch.Tensor
    model: Any | None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def vocab(self) -> int:
        return head_rows(self.model) if self.model is not None else int(self.values.shape[1])


def selected_rows(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> HeadRows:
    """The rows at `positions` (int64 [N, 2] of (batch row, input position)) of a
    right-padded batch ([B, L] ids and mask): final hidden states through the decoder
    body, or, for a model without a separable body, its logits there (with
    `logits_to_keep` over the positions' span when the model takes it)."""
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise PactError(f"positions must have shape [N, 2] (row, position), got {tuple(positions.shape)}")
    device = input_ids.device
    positions = positions.to(device)
    body = find_body(model)
    if body is not None:
        output = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return HeadRows(hidden[positions[:, 0], positions[:, 1]], model)
    first = int(positions[:, 1].min()) if accepts_logits_to_keep(model) else 0
    kwargs = {"logits_to_keep": torch.arange(first, input_ids.shape[1], device=device)} if first else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    if logits.shape[1] != input_ids.shape[1] - first:
        raise PactError(
            f"the model returned logits for {logits.shape[1]} positions, expected {input_ids.shape[1] - first}"
        )
    positions = positions.to(logits.device)
    return HeadRows(logits[positions[:, 0], positions[:, 1] - first], None)


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [N, V] of final hidden states [N, H], as the model's forward computes them."""
    logits = model.get_output_embeddings()(hidden)
    transform = LogitTransform.of(model.config)
    return logits.float() if transform.identity else transform(logits.float())


def logit_chunks(rows: HeadRows, budget: int = DEFAULT_HEAD_BUDGET) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, float32 logits [stop - start, V]) over `rows`, at most `budget`
    elements per chunk; drop each chunk before asking for the next."""
    step = rows_per_chunk(rows.vocab, budget)
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        part = rows.values[start:stop]
        yield start, stop, head_logits(rows.model, part) if rows.model is not None else part.float()


def subset_logprobs(rows: HeadRows, ids: torch.Tensor, budget: int = DEFAULT_HEAD_BUDGET) -> torch.Tensor:
    """Full-vocabulary log-softmax of each row at `ids` (int64 [S]): float32 [N, S]."""
    ids = ids.to(rows.values.device)
    out = torch.empty((len(rows), ids.numel()), dtype=torch.float32, device=rows.values.device)
    for start, stop, logits in logit_chunks(rows, budget):
        out[start:stop] = torch.log_softmax(logits, dim=-1).index_select(1, ids)
        del logits
    return out


def last_position_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """float32 next-token logits [B, V] at the last position of final hidden states [B, L, H]."""
    return head_logits(model, hidden[:, -1])
