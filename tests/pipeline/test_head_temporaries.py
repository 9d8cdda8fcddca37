"""Memory of the no-grad stages: how many `[rows, V]` temporaries stage 0 holds at once,
precompute's default chunk and the probe's batches (flat peak memory when the batch or
the texts double)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pact.core.lm_head import HeadRows
from pact.pipeline.precompute import PrecomputeOptions
from pact.pipeline.probe import probe_batches
from pact.pipeline.tokens import accumulate_stage_zero

QWEN_VOCAB = 151_936


class LiveLargeTensors(TorchDispatchMode):
    """Peak count of live tensors with at least `min_numel` elements that torch ops
    allocated while the mode is on (an in-place op's output or a view shares its input's
    memory: not counted)."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.live: set[int] = set()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.numel() < self.min_numel:
                continue
            if tensor.untyped_storage().data_ptr() not in inputs:
                key = id(tensor)
                self.live.add(key)
                weakref.finalize(tensor, self.live.discard, key)
        self.peak = max(self.peak, len(self.live))
        return out


def _rows(count: int, vocab: int, seed: int) -> HeadRows:
    return HeadRows(torch.randn(count, vocab, generator=torch.Generator().manual_seed(seed)) * 3, None)


def _accumulate(diff_mode: str, rows: int = 12, vocab: int = 1000, budget: int = 4 * 1000) -> tuple[int, tuple]:
    weights = torch.full((rows,), 1.0 / rows)
    sums = tuple(torch.zeros(vocab) for _ in range(3))
    rows_a, rows_b = _rows(rows, vocab, 0), _rows(rows, vocab, 1)
    with LiveLargeTensors(min_numel=vocab * 4) as tracker:  # a chunk is 4 rows of the vocabulary
        accumulate_stage_zero(rows_a, rows_b, weights, sums, temperature=1.0, diff_mode=diff_mode, budget=budget)
    return tracker.peak, sums


def test_stage_zero_allocates_two_chunks_of_vocabulary_rows_at_once() -> None:
    # rows given as logits (a model without a separable body): the chunks are views; the
    # log-softmax of each model's chunk is all that is allocated: p = exp in place, and
    # p_a - p_b in place (before: log_a, log_b, p_a, p_b and p_a - p_b, five at once)
    peak, sums = _accumulate("p_diff")
    assert peak <= 2
    score, aligned, base = sums
    torch.testing.assert_close(score, aligned - base, rtol=1e-5, atol=1e-7)


def test_stage_zero_p_diff_sums_equal_the_plain_formula() -> None:
    rows, vocab = 12, 1000
    _, (score, aligned, base) = _accumulate("p_diff", rows, vocab)
    weights = torch.full((rows,), 1.0 / rows)
    p_a = torch.softmax(_rows(rows, vocab, 0).values, dim=-1)
    p_b = torch.softmax(_rows(rows, vocab, 1).values, dim=-1)
    torch.testing.assert_close(aligned, p_a.T.mv(weights), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(base, p_b.T.mv(weights), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(score, (p_a - p_b).T.mv(weights), rtol=1e-5, atol=1e-8)


def test_precompute_default_chunk_is_filled_by_a_batch_of_short_answers() -> None:
    # The head's peak is one chunk of [chunk, V] logits (and its log-softmax): flat in the
    # batch and the lengths only once a batch fills a chunk. A default batch (8) of
    # one-sentence answers (~5 tokens) has 40 response positions.
    chunk = PrecomputeOptions().chunk_positions
    assert chunk <= 8 * 5
    assert chunk * QWEN_VOCAB * 4 <= 32 * 2**20  # float32 bytes of one chunk at Qwen2.5's vocabulary


def test_probe_batches_cut_long_rows_to_fewer_per_forward() -> None:
    # budget 4 x 10^2: four rows of 10 tokens fit; rows of 20 go two at a time (2 x 400 = 800 > 400: one)
    assert [list(b) for b in probe_batches([10] * 6, batch_size=4, budget=400)] == [[0, 1, 2, 3], [4, 5]]
    assert [list(b) for b in probe_batches([20, 20, 10], batch_size=4, budget=400)] == [[0], [1], [2]]
    assert [list(b) for b in probe_batches([10, 10, 20], batch_size=4, budget=400)] == [[0, 1], [2]]
    assert [list(b) for b in probe_batches([], batch_size=4, budget=400)] == []
    # the default keeps 16 rows of 512 tokens together and cuts 16 rows of 1,024 to 4 per forward
    assert [len(b) for b in probe_batches([512] * 16, batch_size=16)] == [16]
    assert [len(b) for b in probe_batches([1024] * 16, batch_size=16)] == [4, 4, 4, 4]
