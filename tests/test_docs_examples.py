"""The code in docs/loss.md runs as written against the real API (docs stay true to the code)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from pact.trainer.loss import PactConfig, pact_kl, response_cross_entropy

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(markdown: str, heading: str) -> list[str]:
    """The ```python blocks of the section that starts at `heading` (up to the next `## `)."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_loss_md_own_loop_example_runs_and_computes_ce_plus_kl():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, batch_size, length, steps = 64, 2, 12, 5
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    )
    input_ids = torch.randint(0, vocab, (batch_size, length))
    response_start = torch.tensor([7, 8])
    labels = input_ids.clone()
    labels[0, :7] = -100
    labels[1, :8] = -100
    labels[1, 11:] = -100
    step_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    safety_ids = torch.tensor([1, 5, 9, 30])
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": labels,
        "response_start": response_start,
        "ref_full": torch.randn(batch_size, steps, 4),
        "ref_post": torch.randn(batch_size, steps, 4),
        "step_mask": step_mask,
    }
    namespace = {"model": model, "batch": batch, "safety_ids": safety_ids,
                 "weights": torch.ones(4), "grad_accum_steps": 1}
    own_loop, hf_trainer = python_blocks((DOCS / "loss.md").read_text(), "## Use PACT in your own loop")
    exec(compile(own_loop, "docs/loss.md", "exec"), namespace)

    # the documented loop computes CE + KL over the subset at the documented positions
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
        rows = torch.arange(batch_size)[:, None]
        positions = (response_start[:, None] - 1 + torch.arange(steps)).clamp(0, length - 1)
        subset = logits[..., safety_ids][rows, positions]
        expected = response_cross_entropy(logits, labels) + pact_kl(
            subset, batch["ref_full"], batch["ref_post"], torch.ones(4), step_mask, PactConfig()
        )
    assert torch.allclose(namespace["loss"].detach(), expected, atol=1e-5)
    assert model.lm_head.weight.grad is not None
    # the HF Trainer subclass is defined against the same names
    exec(compile(hf_trainer, "docs/loss.md", "exec"), namespace)
    assert "compute_loss" in vars(namespace["PactTrainer"])


def test_docs_hold_no_repeated_paragraph():
    """A runaway edit once replaced docs/reliability.md with 22,000 copies of one paragraph;
    a paragraph (4+ lines) appearing twice in one page is such a slip."""
    pages = [DOCS.parent / "README.md", *sorted(DOCS.rglob("*.md"))]
    for page in pages:
        paragraphs = [p.strip() for p in page.read_text().split("\n\n") if p.strip().count("\n") >= 3]
        repeated = {p[:80] for p, n in Counter(paragraphs).items() if n > 1}
        assert not repeated, f"{page.relative_to(DOCS.parent)} repeats: {sorted(repeated)}"
