"""Tests for stage 2 (`pact train`): batches, cached vs online, resume, outputs, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from tiny import CHAT_TEMPLATE, make_model, make_tokenizer
from train_fixtures import (
    MAX_LENGTH,
    World,
    build_world,
    copy_model,
    data_rows,
    make_safety,
    write_jsonl,
)

from pact.core import models
from pact.core.data import load_examples
from pact.core.encoding import EncodingOptions, assistant_header_ids, encode_example
from pact.core.errors import PactError
from pact.core.lm_head import LMHead
from pact.store.manifest import Store
from pact.store.sql import query
from pact.store.targets import TargetReader
from pact.trainer import checkpoint, steps
from pact.trainer.batches import (
    ReferenceTargets,
    cached_batch,
    collate,
    epoch_batches,
    gather_steps,
    response_token_logprobs,
    step_positions,
)
from pact.trainer.config import TrainConfig
from pact.trainer.fused import batch_loss
from pact.trainer.loss import (
    PactConfig,
    constrained_sft_betas,
    cross_entropy_and_subset,
    token_logprobs,
)
from pact.trainer.model import load_student
from pact.trainer.reference import OnlineReference
from pact.trainer.train import TrainResult, train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PACT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hash-cache"))


def make_config(world: World, out: Path, **overrides: object) -> TrainConfig:
    """A few fast steps: 10 examples, batch 4 (3 batches per epoch), a large lr so weights move."""
    values = dict(
        model=str(world.model_dir),
        data=str(world.data),
        store=str(world.store_dir),
        out=str(out),
        max_steps=3,
        lr=1e-2,
        save_every=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def final_weights(result: TrainResult) -> dict[str, torch.Tensor]:
    if result.adapter_dir is not None:
        return load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    return load_file(str(result.model_dir / "model.safetensors"))


def assert_same_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0
) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0.0, msg=name)


def encoded_examples(world: World, max_length: int = MAX_LENGTH) -> tuple[object, list]:
    tokenizer = models.load_tokenizer(world.model_dir)
    examples = load_examples(world.data).examples
    return tokenizer, [encode_example(tokenizer, e, EncodingOptions(max_length)) for e in examples]


# ----------------------------------------------------------------------------- batches


def test_epoch_batches_seeded_permutation() -> None:
    first = epoch_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first == epoch_batches(10, 4, seed=3, epoch=0)
    assert first != epoch_batches(10, 4, seed=3, epoch=1)
    assert epoch_batches(10, 4, seed=3, epoch=1) == epoch_batches(10, 4, seed=4, epoch=0)


def test_collate_pads_right_and_joins_targets(world: World) -> None:
    tokenizer, encoded = encoded_examples(world)
    chosen = [encoded[0], encoded[7]]  # short and long response
    reader = TargetReader(Store(world.store_dir))
    batch = cached_batch(chosen, tokenizer.pad_token_id, reader)
    width = max(len(e.input_ids) for e in chosen)
    steps = max(e.response_length for e in chosen)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (2, width)
    short = chosen[0]
    n = len(short.input_ids)
    assert batch.input_ids[0, n:].eq(tokenizer.pad_token_id).all()
    assert batch.attention_mask[0].tolist() == [1] * n + [0] * (width - n)
    assert batch.labels[0, :n].tolist() == short.labels.tolist()
    assert batch.labels[0, n:].eq(-100).all()
    assert batch.labels[0, : short.response_start].eq(-100).all()
    assert batch.response_start.tolist() == [e.response_start for e in chosen]
    assert batch.step_mask.shape == (2, steps)
    assert batch.step_mask[0].tolist() == [1.0] * short.response_length + [0.0] * (
        steps - short.response_length
    )
    stored = reader.get(short.example_id)
    ref = batch.reference
    assert ref.full.shape == ref.post.shape == (2, steps, world.safety.size)
    assert torch.equal(ref.full[0, : short.response_length], torch.from_numpy(stored.full_logprobs))
    assert torch.equal(ref.post[0, : short.response_length], torch.from_numpy(stored.post_logprobs))
    assert torch.equal(
        ref.token_logprobs[0, : short.response_length], torch.from_numpy(stored.token_logprobs)
    )
    assert ref.full[0, short.response_length :].eq(0).all()


def test_collate_refuses_targets_of_another_length(world: World) -> None:
    tokenizer, encoded = encoded_examples(world)
    target = TargetReader(Store(world.store_dir)).get("ex-0")
    target.full_logprobs = target.full_logprobs[:-1]
    with pytest.raises(
        PactError, match=r"example ex-0: the store holds 8 steps for a response of 9 tokens"
    ):
        collate([encoded[0]], tokenizer.pad_token_id, [target])


def test_safety_subset_and_token_logprobs_follow_the_position_convention(world: World) -> None:
    tokenizer, encoded = encoded_examples(world)
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    logits = torch.randn(
        *batch.input_ids.shape, len(tokenizer), generator=torch.Generator().manual_seed(0)
    )
    ids = torch.as_tensor(world.safety.token_ids)
    positions = step_positions(batch.response_start, batch.num_steps, logits.shape[1])
    _, subset = cross_entropy_and_subset(logits, batch.labels, positions, ids)  # the full-logits reference
    per_token = response_token_logprobs(
        logits, batch.input_ids, batch.response_start, batch.step_mask
    )
    shifted = token_logprobs(logits, batch.labels)  # [B, L-1], entry i predicts labels[i + 1]
    for b, example in enumerate(encoded[:4]):
        for t in range(example.response_length):
            position = example.response_start - 1 + t
            assert torch.equal(subset[b, t], logits[b, position, ids])
            assert per_token[b, t] == pytest.approx(float(shifted[b, position]), abs=1e-6)
        assert per_token[b, example.response_length :].eq(0).all()
    assert torch.equal(
        gather_steps(batch.input_ids[..., None], batch.response_start, 1, offset=0)[:, 0, 0],
        batch.input_ids[torch.arange(4), batch.response_start],
    )


# ----------------------------------------------------------------------------- cached == online


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_cached_and_online_training_agree(world: World, tmp_path: Path, finetune: str) -> None:
    cached = train(make_config(world, tmp_path / "cached", finetune=finetune))
    online = train(make_config(world, tmp_path / "online", finetune=finetune, reference="online"))
    assert cached.steps == online.steps == 3
    for a, b in zip(cached.metrics, online.metrics, strict=True):
        for key in ("loss", "ce", "kl", "gate_mean", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert cached.metrics[0]["kl"] > 0  # docs/loss.md: above zero at step 0 (the target is mixed and reweighted)
    assert_same_weights(final_weights(cached), final_weights(online), atol=1e-5)
    trained = final_weights(cached)
    if finetune == "lora":  # lora_B starts at zero
        assert all(trained[n].abs().sum() > 0 for n in trained if "lora_B" in n)
    else:
        before = load_file(str(world.model_dir / "model.safetensors"))
        assert all(not torch.equal(trained[n], before[n]) for n in before if "proj" in n)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_cached_and_online_gradients_agree(world: World, tmp_path: Path, finetune: str) -> None:
    torch.manual_seed(0)
    model = load_student(make_config(world, tmp_path / "run", finetune=finetune), "cpu")
    if finetune == "lora":
        reference_model = model  # adapters disabled for the reference pass
        with torch.no_grad():  # make the student differ from the reference
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
    else:
        reference_model = models.load_model(world.model_dir, dtype="float32", device="cpu")
    tokenizer, encoded = encoded_examples(world)
    ids = torch.as_tensor(world.safety.token_ids)
    weights = torch.as_tensor(world.safety.weights)
    header = assistant_header_ids(tokenizer)
    reference = OnlineReference(
        reference_model, header, ids, tokenizer.pad_token_id, adapters_disabled=finetune == "lora"
    )
    batch = cached_batch(encoded[4:9], tokenizer.pad_token_id, TargetReader(Store(world.store_dir)))
    cached_targets = batch.reference
    online_targets = reference.targets(batch)
    assert model.training  # the reference pass restores train mode
    for field in ("full", "post"):  # logits online, log-probs cached: one constant per step apart
        torch.testing.assert_close(
            torch.log_softmax(getattr(online_targets, field), dim=-1),
            torch.log_softmax(getattr(cached_targets, field), dim=-1),
            atol=1e-5,
            rtol=0,
        )
    assert online_targets.token_logprobs is None  # --method pact does not use them
    token_reference = OnlineReference(  # --method constrained-sft's reference
        reference_model, header, None, tokenizer.pad_token_id, adapters_disabled=finetune == "lora"
    )
    token_targets = token_reference.targets(batch)
    assert token_targets.full is None and token_targets.post is None
    torch.testing.assert_close(
        token_targets.token_logprobs, cached_targets.token_logprobs, atol=1e-5, rtol=0
    )

    def loss_and_gradients(targets: object) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same LoRA dropout masks in both passes
        batch.reference = targets
        terms = batch_loss(
            model,
            batch,
            method="pact",
            kl_weight=1.0,
            pact=PactConfig(),
            safety_ids=ids,
            weights=weights,
        )
        terms.loss.backward()
        return float(terms.loss.detach()), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    cached_loss, cached_grads = loss_and_gradients(cached_targets)
    online_loss, online_grads = loss_and_gradients(online_targets)
    assert cached_loss == pytest.approx(online_loss, abs=1e-5)
    assert cached_grads and cached_grads.keys() == online_grads.keys()
    for name in cached_grads:
        torch.testing.assert_close(
            cached_grads[name], online_grads[name], atol=1e-5, rtol=0, msg=name
        )
    assert all(
        g.abs().sum() > 0 for n, g in cached_grads.items() if "lora_B" in n or finetune == "full"
    )


def test_constrained_sft_without_reference_token_logprobs_is_refused(world: World) -> None:
    """The online reference of --method pact carries no token log-probs: constrained SFT
    on such targets (or none) stops with one line."""
    model = models.load_model(world.model_dir, dtype="float32", device="cpu")
    tokenizer, encoded = encoded_examples(world)
    batch = cached_batch(encoded[:2], tokenizer.pad_token_id, TargetReader(Store(world.store_dir)))
    for reference in (None, ReferenceTargets(full=batch.reference.full, post=batch.reference.post)):
        batch.reference = reference
        with pytest.raises(PactError, match=r"^--method constrained-sft needs the batch's reference token log-probs$"):
            batch_loss(model, batch, method="constrained-sft", kl_weight=1.0, pact=PactConfig(), safety_ids=None, weights=None)


def test_online_pact_reference_runs_its_head_on_the_safety_ids_only(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f and o need the safety ids' logits only (the loss is invariant to a per-step
    shift): no full-vocabulary logits are computed for them."""
    model = models.load_model(world.model_dir, dtype="float32", device="cpu")
    tokenizer, encoded = encoded_examples(world)
    ids = torch.as_tensor(world.safety.token_ids)
    reference = OnlineReference(
        model, assistant_header_ids(tokenizer), ids, tokenizer.pad_token_id, adapters_disabled=False
    )
    batch = cached_batch(encoded[:3], tokenizer.pad_token_id, TargetReader(Store(world.store_dir)))

    def full_vocabulary(*args: object, **kwargs: object) -> None:
        raise AssertionError("full-vocabulary logits computed")

    monkeypatch.setattr(LMHead, "logits_into", full_vocabulary)
    monkeypatch.setattr(LMHead, "logits", full_vocabulary)
    targets = reference.targets(batch)
    assert targets.full.shape == targets.post.shape == (3, batch.num_steps, ids.numel())


@pytest.mark.parametrize(
    ("finetune", "reference", "loads"),
    [("full", "cached", 1), ("lora", "cached", 1), ("lora", "online", 1), ("full", "online", 2)],
)
def test_models_constructed(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    finetune: str,
    reference: str,
    loads: int,
) -> None:
    from transformers import AutoModelForCausalLM

    calls = {"load_model": 0, "from_pretrained": 0}
    original_load, original_from = models.load_model, AutoModelForCausalLM.from_pretrained

    def counting_load(*args: object, **kwargs: object) -> object:
        calls["load_model"] += 1
        return original_load(*args, **kwargs)

    def counting_from(*args: object, **kwargs: object) -> object:
        calls["from_pretrained"] += 1
        return original_from(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting_load)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting_from)
    train(make_config(world, tmp_path / "run", finetune=finetune, reference=reference, max_steps=1))
    assert calls == {"load_model": loads, "from_pretrained": loads}


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_resume_after_max_steps_matches_uninterrupted(
    world: World, tmp_path: Path, finetune: str
) -> None:
    options = dict(
        finetune=finetune, schedule="constant", save_every=2
    )  # constant: the lr horizon is irrelevant
    whole = train(make_config(world, tmp_path / "whole", max_steps=4, **options))
    first = train(make_config(world, tmp_path / "split", max_steps=2, **options))
    assert first.steps == 2
    resumed = train(make_config(world, tmp_path / "split", max_steps=4, resume=True, **options))
    assert resumed.steps == 4
    assert_same_weights(final_weights(whole), final_weights(resumed))
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in whole.metrics]


def test_resume_after_a_crash_continues_exactly(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LoRA dropout (RNG state), grad accumulation with a short last group, warmup + cosine,
    # and a crash in the second epoch (data position).
    options = dict(
        max_steps=None,
        epochs=2,
        batch_size=2,
        grad_accum=2,
        warmup_steps=2,
        schedule="cosine",
        save_every=2,
    )
    whole = train(make_config(world, tmp_path / "whole", **options))
    assert whole.steps == 6  # 5 batches per epoch -> 3 optimizer steps per epoch
    kept = [p.name for p in checkpoint.complete_checkpoints(whole.run_dir)]
    assert kept == ["step-4", "step-6"]

    original = checkpoint.save_checkpoint

    def crash_after_step_4(
        run_dir: Path, state: checkpoint.TrainerState, *args: object, **kwargs: object
    ) -> Path:
        path = original(run_dir, state, *args, **kwargs)
        if state.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(world, tmp_path / "crashed", **options))
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    state = json.loads((tmp_path / "crashed/checkpoints/step-4/trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_index"]) == (4, 1, 2)
    resumed = train(make_config(world, tmp_path / "crashed", resume=True, **options))
    assert_same_weights(final_weights(whole), final_weights(resumed))
    for a, b in zip(whole.metrics, resumed.metrics, strict=True):
        assert {k: a[k] for k in ("step", "epoch", "loss", "lr", "grad_norm")} == {
            k: b[k] for k in ("step", "epoch", "loss", "lr", "grad_norm")
        }


def test_resume_refuses_changed_options_and_missing_checkpoints(
    world: World, tmp_path: Path
) -> None:
    train(make_config(world, tmp_path / "run", max_steps=2, save_every=2))
    with pytest.raises(
        PactError, match=r"--resume: option lr is 0\.001 but step-2 was trained with 0\.01"
    ):
        train(make_config(world, tmp_path / "run", max_steps=3, save_every=2, lr=1e-3, resume=True))
    with pytest.raises(
        PactError, match=r"already holds a training run \(config\.json\); pass --resume"
    ):
        train(make_config(world, tmp_path / "run", max_steps=3))
    with pytest.raises(
        PactError, match=r"--resume: .*other has no complete checkpoint to resume from"
    ):
        train(make_config(world, tmp_path / "other", resume=True))


# ----------------------------------------------------------------------------- loss values


def first_batch(
    world: World, batch_size: int, max_length: int, index: int = 0
) -> tuple[object, object]:
    tokenizer, encoded = encoded_examples(world, max_length)
    indices = epoch_batches(len(encoded), batch_size, seed=0, epoch=0)[index]
    return tokenizer, collate([encoded[i] for i in indices], tokenizer.pad_token_id)


def test_sft_loss_is_plain_cross_entropy(world: World, tmp_path: Path) -> None:
    result = train(
        make_config(world, tmp_path / "sft", method="sft", store=None, finetune="full", max_steps=1)
    )
    _, batch = first_batch(world, 4, 1024)  # no store: default max_length 1024
    model = models.load_model(world.model_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        expected = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
    row = result.metrics[0]
    assert row["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert row["ce"] == row["loss"] and row["kl"] is None and row["gate_mean"] is None
    assert not (tmp_path / "sft" / "adapter").exists() and (tmp_path / "sft" / "model").is_dir()


def test_constrained_sft_at_step0_is_its_closed_form(world: World, tmp_path: Path) -> None:
    result = train(make_config(world, tmp_path / "csft", method="constrained-sft", max_steps=1))
    _, batch = first_batch(world, 4, MAX_LENGTH)
    betas = constrained_sft_betas(batch.num_steps)
    per_step = (2.0 / betas) * math.log(2.0)  # -(2/β)·log σ(0)
    expected = float((batch.step_mask * per_step).sum() / batch.step_mask.sum())
    assert result.metrics[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert result.metrics[0]["loss"] != pytest.approx(
        float(per_step.mean()), abs=1e-3
    )  # a token mean


def test_grad_accum_divides_by_micro_steps(world: World, tmp_path: Path) -> None:
    result = train(
        make_config(
            world,
            tmp_path / "acc",
            method="sft",
            finetune="full",
            batch_size=2,
            grad_accum=2,
            max_steps=1,
            max_grad_norm=0.0,
        )
    )
    model = models.load_model(world.model_dir, dtype="float32", device="cpu")
    losses, grads = [], []
    for index in (0, 1):
        _, batch = first_batch(world, 2, MAX_LENGTH, index)
        model.zero_grad(set_to_none=True)
        loss = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    row = result.metrics[0]
    assert row["loss"] == pytest.approx(sum(losses) / 2, abs=1e-5)
    assert row["grad_norm"] == pytest.approx(float(((grads[0] + grads[1]) / 2).norm()), rel=1e-5)
    assert row["grad_norm"] != pytest.approx(float((grads[0] + grads[1]).norm()), rel=1e-2)


# ----------------------------------------------------------------------------- NaN


def _tree_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_nan_loss_stops_and_keeps_the_last_checkpoint(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "nan"
    calls = {"n": 0}
    snapshot = {}
    original = steps.batch_loss

    def nan_on_third_step(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        terms = original(*args, **kwargs)
        if calls["n"] == 3:
            snapshot.update(_tree_digest(out / "checkpoints" / "step-2"))
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(steps, "batch_loss", nan_on_third_step)
    with pytest.raises(
        PactError,
        match=r"the loss is nan at step 3 \(epoch 0, batch 2.*last checkpoint .*step-2 is intact",
    ):
        train(make_config(world, out, max_steps=5, save_every=1, finetune="full"))
    monkeypatch.setattr(steps, "batch_loss", original)
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-1", "step-2"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert _tree_digest(out / "checkpoints" / "step-2") == snapshot
    assert pq.read_table(out / "metrics.parquet").column("step").to_pylist() == [1, 2]
    resumed = train(
        make_config(world, out, max_steps=5, save_every=1, finetune="full", resume=True)
    )
    whole = train(
        make_config(world, tmp_path / "whole", max_steps=5, save_every=1, finetune="full")
    )
    assert_same_weights(final_weights(whole), final_weights(resumed))


def test_nan_grad_norm_stops(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("inf"))
    )
    with pytest.raises(
        PactError,
        match=r"the gradient norm is inf at step 1 \(epoch 0\); training stopped, no checkpoint was written",
    ):
        train(make_config(world, tmp_path / "inf", max_steps=2, save_every=1))


# ----------------------------------------------------------------------------- outputs


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft, in the test's own set-up
def test_outputs_load_and_metrics_are_queryable(world: World, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(
        make_config(world, tmp_path / "lora-run", merge=True, save_every=2, run_id="lora-run")
    )
    assert result.adapter_dir == tmp_path / "lora-run" / "adapter"
    assert result.model_dir == tmp_path / "lora-run" / "model"
    merged = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(world.model_dir))
    adapted = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-4)
        original = AutoModelForCausalLM.from_pretrained(str(world.model_dir))(ids).logits
    assert not torch.allclose(merged(ids).logits, original, atol=1e-4)  # training changed the model
    assert (result.model_dir / "tokenizer.json").is_file()

    columns, rows = query(
        Store(world.store_dir),
        "select step, loss, kl, lr from metrics where run_id = 'lora-run' order by step",
    )
    assert columns == ["step", "loss", "kl", "lr"]
    assert rows == [(m["step"], m["loss"], m["kl"], m["lr"]) for m in result.metrics]
    assert pq.read_table(result.run_dir / "metrics.parquet").to_pylist() == result.metrics
    assert set(result.metrics[0]) >= {
        "tokens_per_s",
        "peak_memory_mb",
        "time",
        "grad_norm",
        "gate_mean",
        "epoch",
    }
    assert all(m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0 for m in result.metrics)

    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["options"]["method"] == "pact" and record["options"]["kl_weight"] == 1.0
    assert record["options"]["pact"]["temperature"] == 2.0
    assert record["store"] == str(world.store_dir.resolve())
    assert record["fingerprints"]["model"] == models.model_fingerprint(world.model_dir)
    assert record["fingerprints"]["safety_tokens"] == world.safety.fingerprint
    assert record["versions"]["pact"]


def test_full_finetune_output_loads(world: World, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = train(make_config(world, tmp_path / "full", finetune="full", max_steps=1))
    assert result.adapter_dir is None
    model = AutoModelForCausalLM.from_pretrained(str(result.model_dir))
    trained = load_file(str(result.model_dir / "model.safetensors"))
    assert set(trained) >= {n for n, _ in model.named_parameters()}
    before = load_file(str(world.model_dir / "model.safetensors"))
    assert any(not torch.equal(trained[n], before[n]) for n in before)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_weight": -1.0}, r"^--lambda must be a finite number >= 0, got -1\.0$"),
        ({"kl_weight": float("nan")}, r"^--lambda must be a finite number >= 0, got nan$"),
        (
            {"method": "sft", "reference": "online"},
            r"^--method sft uses no reference model; --reference online makes no sense with it$",
        ),
        (
            {"method": "sft", "kl_weight": 0.5},
            r"^--lambda weighs the PACT KL; it has no effect with --method sft$",
        ),
        (
            {"method": "constrained-sft", "kl_weight": 2.0},
            r"--lambda weighs the PACT KL; it has no effect with --method constrained-sft",
        ),
        (
            {"method": "dpo"},
            r"^unknown --method 'dpo'; expected one of pact, sft, constrained-sft$",
        ),
        ({"reference": "live"}, r"^unknown --reference 'live'; expected one of cached, online$"),
        ({"finetune": "qlora"}, r"^unknown --finetune 'qlora'"),
        ({"schedule": "step"}, r"^unknown --schedule 'step'"),
        ({"store": None}, r"^--method pact with --reference cached needs --store"),
        (
            {"store": None, "reference": "online"},
            r"^--method pact needs --store for the safety-token set",
        ),
        (
            {"store": None, "method": "constrained-sft"},
            r"^--method constrained-sft with --reference cached needs --store",
        ),
        ({"merge": True, "finetune": "full"}, r"^--merge applies to LoRA only"),
        ({"batch_size": 0}, r"^--batch-size must be an integer >= 1, got 0$"),
        ({"grad_accum": 0}, r"^--grad-accum must be an integer >= 1, got 0$"),
        ({"lr": 0.0}, r"^--lr must be a finite number > 0, got 0\.0$"),
        ({"lora_dropout": 1.0}, r"^--lora-dropout must be a finite number >= 0 and < 1, got 1\.0$"),
        ({"lora_targets": ()}, r"^--lora-targets must name at least one module"),
        ({"max_steps": 0}, r"^--max-steps must be an integer >= 1, got 0$"),
        ({"save_every": -1}, r"^--save-every must be an integer >= 0, got -1$"),
        ({"max_length": 1}, r"^--max-length must be an integer >= 2, got 1$"),
        ({"head_chunk_logits": 0}, r"^--head-chunk-logits must be an integer >= 1, got 0$"),
    ],
)
def test_nonsense_options(world: World, tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(PactError, match=message):
        train(make_config(world, tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_invalid_pact_option_is_one_line() -> None:
    with pytest.raises(
        PactError,
        match=r"^PactConfig\.temperature \(--kl-temperature\) must be a finite number > 0, got 0\.0$",
    ):
        PactConfig(temperature=0.0)


def _expect_refusal(world: World, out: Path, message: str, **overrides: object) -> None:
    with pytest.raises(PactError, match=message) as raised:
        train(make_config(world, out, **overrides))
    assert "\n" not in str(raised.value)
    assert not out.exists()  # refused before any step or file


@pytest.mark.parametrize(
    ("changed", "tokenizer_options"),
    [
        ("tokenizer", {"vocab_size": 300}),
        ("chat template", {"chat_template": CHAT_TEMPLATE.replace("<|end|>", "<|end|>\n")}),
    ],
)
def test_store_for_another_tokenizer_or_chat_template(
    world: World, tmp_path: Path, changed: str, tokenizer_options: dict
) -> None:
    other = copy_model(world.model_dir, tmp_path / "other-tokenizer")
    make_tokenizer(other, **tokenizer_options)
    message = rf"^store targets were computed with another {changed} \(fingerprint \w+ != \w+\)"
    _expect_refusal(world, tmp_path / "run", message, model=str(other))


def test_store_for_another_max_length(world: World, tmp_path: Path) -> None:
    _expect_refusal(
        world,
        tmp_path / "run",
        r"^--max-length 32 disagrees with the store's max_length 64",
        max_length=32,
    )
    _expect_refusal(
        world, tmp_path / "run", r"^--max-length 32 disagrees", max_length=32, method="sft"
    )


def test_store_for_another_reference_model(world: World, tmp_path: Path) -> None:
    other = copy_model(world.model_dir, tmp_path / "other-weights")
    make_model(other, len(models.load_tokenizer(other)), seed=1, hidden=32, layers=2)
    _expect_refusal(
        world,
        tmp_path / "run",
        r"--model .*other-weights is not the reference the store was built from \(model fingerprint",
        model=str(other),
    )
    _expect_refusal(
        world,
        tmp_path / "run",
        r"is not the reference the store was built from",
        model=str(other),
        method="constrained-sft",
    )


def test_store_with_another_safety_set(world: World, tmp_path: Path) -> None:
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(world.store_dir, store_dir)
    make_safety(Store(store_dir), world.safety.vocab_size, seed=1)
    _expect_refusal(
        world,
        tmp_path / "run",
        r"^store targets were computed with another safety-token set \(fingerprint",
        store=str(store_dir),
    )


def test_store_without_targets(world: World, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    make_safety(store, world.safety.vocab_size)
    _expect_refusal(
        world,
        tmp_path / "run",
        r"^store .*store has no reference targets: run pact precompute first$",
        store=str(store.root),
    )
    _expect_refusal(
        world, tmp_path / "run", r"^store .*missing does not exist", store=str(tmp_path / "missing")
    )


def _with_new_rows() -> list[dict]:
    return data_rows() + [
        {"id": "new-1", "prompt": "Say hello.", "completion": "hello"},
        {"id": "new-2", "prompt": "Say bye.", "completion": "bye"},
    ]


def _with_a_changed_row() -> list[dict]:
    rows = data_rows()
    rows[3]["completion"] = "positive"
    return rows


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (_with_new_rows, r"^2 examples have no targets in the store, first: new-1, new-2 — run pact precompute$"),
        (
            _with_a_changed_row,
            r"^1 example was encoded differently than when its targets were computed \(token hash differs\), first: ex-3 \(\w+ != \w+\)",
        ),
    ],
    ids=["without-targets", "encoded-differently"],
)
def test_examples_that_do_not_match_the_store(world: World, tmp_path: Path, rows, message: str) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    _expect_refusal(world, tmp_path / "run", message, data=str(data))


def test_unknown_lora_targets(world: World, tmp_path: Path) -> None:
    with pytest.raises(PactError, match=r"^--lora-targets w_q,w_v: .*not found"):
        train(make_config(world, tmp_path / "run", lora_targets=("w_q", "w_v")))


def test_a_model_whose_forward_does_not_match_its_head_is_refused(world: World, tmp_path: Path) -> None:
    """A Llama whose config claims a soft-cap its forward ignores: the chunked head would
    compute other logits than the model, so training refuses it before any step."""
    model_dir = copy_model(world.model_dir, tmp_path / "capped")
    config = json.loads((model_dir / "config.json").read_text())
    config["final_logit_softcapping"] = 0.001
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(PactError, match=r"^LlamaForCausalLM post-processes its logits in a way pact does not reproduce"):
        train(make_config(world, tmp_path / "run", model=str(model_dir), method="sft", store=None))
    assert not (tmp_path / "run" / "model").exists()


def test_online_sft_variants_need_no_targets(world: World, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    make_safety(store, world.safety.vocab_size)  # a safety set, no targets
    result = train(
        make_config(
            world, tmp_path / "online", store=str(store.root), reference="online", max_steps=1
        )
    )
    assert result.metrics[0]["kl"] > 0
    result = train(
        make_config(
            world,
            tmp_path / "csft",
            store=None,
            method="constrained-sft",
            reference="online",
            max_steps=1,
        )
    )
    assert result.metrics[0]["loss"] > 0


# ----------------------------------------------------------------------------- CLI


def test_cli_parses_every_option(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from pact.pipeline.commands import train as command_module

    captured = {}

    def fake_train(config: TrainConfig) -> TrainResult:
        captured["config"] = config
        return TrainResult(Path(config.out), "r", 0, [], None, None)

    monkeypatch.setattr(command_module, "train", fake_train)
    args = [
        "--model", "M", "--data", "D.jsonl", "--store", "S", "--out", "RUN",
        "--method", "constrained-sft", "--reference", "online", "--format", "chat", "--max-length", "128",
        "--finetune", "full", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
        "--lora-targets", "q_proj, v_proj", "--epochs", "2", "--max-steps", "7", "--batch-size", "3",
        "--grad-accum", "5", "--lr", "0.002", "--weight-decay", "0.01", "--warmup-steps", "2",
        "--schedule", "linear", "--max-grad-norm", "0.5", "--gradient-checkpointing", "--seed", "9",
        "--save-every", "3", "--resume", "--device", "cpu", "--run-id", "r1", "--head-chunk-logits", "4096",
        "--top-p", "0.8", "--gate-alpha", "3", "--gate-bias", "0.1", "--gate-temperature", "1.5",
        "--gate-prefix", "4", "--gate-decay", "0", "--gate-boost", "2", "--kl-temperature", "1",
    ]  # fmt: skip
    result = CliRunner().invoke(command_module.train_command, args)
    assert result.exit_code == 0, result.output
    assert captured["config"] == TrainConfig(
        model="M", data="D.jsonl", out="RUN", store="S", method="constrained-sft", reference="online",
        data_format="chat", max_length=128, finetune="full", lora_r=4, lora_alpha=8.0, lora_dropout=0.1,
        lora_targets=("q_proj", "v_proj"), epochs=2, max_steps=7, batch_size=3, grad_accum=5, lr=0.002,
        weight_decay=0.01, warmup_steps=2, schedule="linear", max_grad_norm=0.5, gradient_checkpointing=True,
        seed=9, save_every=3, resume=True, device="cpu", run_id="r1", head_chunk_logits=4096,
        pact=PactConfig(top_p=0.8, alpha=3.0, bias=0.1, gate_temperature=1.5, prefix_n=4, decay_tau=0.0, boost=2.0, temperature=1.0),
    )  # fmt: skip
    defaults = CliRunner().invoke(
        command_module.train_command, ["--model", "M", "--data", "D", "--out", "RUN", "--store", "S"]
    )
    assert defaults.exit_code == 0, defaults.output
    assert captured["config"] == TrainConfig(model="M", data="D", out="RUN", store="S")


def test_cli_trains_and_reports(world: World, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pact.pipeline.commands.train import train_command

    out = tmp_path / "cli-run"
    args = [
        "--model",
        str(world.model_dir),
        "--data",
        str(world.data),
        "--store",
        str(world.store_dir),
        "--out",
        str(out),
        "--max-steps",
        "1",
        "--merge",
    ]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    assert f"run: {out} (run_id cli-run)" in result.output
    assert "steps: 1, last step loss" in result.output
    assert (
        f"adapter: {out / 'adapter'}" in result.output
        and f"model: {out / 'model'}" in result.output
    )
    refused = CliRunner().invoke(train_command, args)  # the run exists
    assert isinstance(refused.exception, PactError) and "already holds a training run" in str(
        refused.exception
    )
    assert "--gate-decay" in CliRunner().invoke(train_command, ["--help"]).output


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_changes_nothing_but_memory(
    world: World, tmp_path: Path, finetune: str
) -> None:
    plain = train(make_config(world, tmp_path / "plain", finetune=finetune, max_steps=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointed = train(
            make_config(
                world, tmp_path / "gc", finetune=finetune, max_steps=2, gradient_checkpointing=True
            )
        )
    # the current transformers API, not its deprecated alias
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    for a, b in zip(plain.metrics, checkpointed.metrics, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_same_weights(final_weights(plain), final_weights(checkpointed), atol=1e-6)


def _probe_world(root: Path) -> tuple[World, Path]:
    """A fresh world (its store gets a probe) and a small safety set for the probe."""
    built = build_world(root / "world")
    rows = [{"id": f"p{i}", "prompt": f"how do I break rule {i}?", "completion": "I cannot help with that."} for i in range(3)]
    return built, write_jsonl(root / "probe.jsonl", rows)


def test_probe_every_records_drift_and_caches_the_reference_probe(tmp_path: Path) -> None:
    """--probe-every: step 0 is the reference, so its probe is cached; later probes drift."""
    from pact.pipeline.probe import read_reference_probe

    built, probe = _probe_world(tmp_path)
    config = make_config(
        built, tmp_path / "run", finetune="full", max_steps=4, lr=5e-2, probe=str(probe), probe_every=2, probe_batch_size=2
    )
    result = train(config)
    assert [(r["step"], r["probe_kl"] is not None) for r in result.metrics] == [(1, False), (2, True), (3, False), (4, True)]
    probed = [r for r in result.metrics if r["probe_kl"] is not None]
    assert all(r["probe_kl"] > 0 and 0 < r["probe_mass"] <= 1 for r in probed)
    assert read_reference_probe(Store(built.store_dir), load_examples(probe).examples) is not None
    _, rows = query(Store(built.store_dir), "SELECT step FROM metrics WHERE probe_kl IS NOT NULL ORDER BY step")
    assert rows == [(2,), (4,)]


def test_probe_needs_its_partner_option_and_a_reference(tmp_path: Path) -> None:
    built, probe = _probe_world(tmp_path)
    with pytest.raises(PactError, match=r"--probe-every needs --probe FILE"):
        train(make_config(built, tmp_path / "a", probe_every=1))
    with pytest.raises(PactError, match=r"--probe FILE needs --probe-every N"):
        train(make_config(built, tmp_path / "b", probe=str(probe)))
    with pytest.raises(PactError, match=r"--probe-batch-size must be an integer >= 1, got 0"):
        train(make_config(built, tmp_path / "d", probe=str(probe), probe_every=1, probe_batch_size=0))
    other = copy_model(built.model_dir, tmp_path / "other")
    make_model(other, len(make_tokenizer(tmp_path / "tok")), seed=99, hidden=32, layers=2)
    with pytest.raises(PactError, match=r"the store has no reference probe for probe\.jsonl: run `pact eval"):
        train(make_config(built, tmp_path / "c", model=str(other), method="sft", probe=str(probe), probe_every=1))


def test_resume_prunes_checkpoints_a_killed_run_left_unpruned(world: World, tmp_path: Path) -> None:
    """A kill after `step-N` was renamed but before the prune leaves 3 checkpoints; a
    --resume that has nothing left to train still prunes to the newest two."""
    import shutil

    out = tmp_path / "run"
    train(make_config(world, out, finetune="full", max_steps=3, save_every=1))
    kept = [p.name for p in checkpoint.complete_checkpoints(out)]
    assert kept == ["step-2", "step-3"]
    shutil.copytree(out / "checkpoints" / "step-2", out / "checkpoints" / "step-1")
    train(make_config(world, out, finetune="full", max_steps=3, save_every=1, resume=True))
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == kept


def test_examples_past_the_context_window_are_warned_about(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """pact train says how many examples run past the model's context window (config.json)."""
    model = copy_model(world.model_dir, tmp_path / "short-context")
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 8
    (model / "config.json").write_text(json.dumps(config))
    train(make_config(world, tmp_path / "run", model=str(model), method="sft", max_steps=1))
    assert "examples are longer than the model's context window (8 tokens, config.json)" in capsys.readouterr().err
    train(make_config(world, tmp_path / "run-plain", method="sft", max_steps=1))
    assert "context window" not in capsys.readouterr().err
