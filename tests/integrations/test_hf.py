"""pact from transformers' `Trainer` and TRL's `SFTTrainer` (pact.integrations.hf): the
same steps as `pact train` (loss, ce, kl, gate_mean per optimizer step, to 1e-5) for the
same model, data order and hyper-parameters, with LoRA and gradient accumulation (the
last step of an epoch with fewer micro-batches), under DDP on 2 gloo processes; and a
store that does not belong to the data, tokenizer or model refused before the first step.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from launch import torchrun
from tiny import make_model
from train_fixtures import World, build_world, data_rows
from transformers import TrainerCallback, TrainingArguments

from pact.core.data import load_examples
from pact.core.encoding import EncodingOptions, encode_example
from pact.core.errors import PactError
from pact.core.models import load_model, load_tokenizer
from pact.integrations.hf import PactCollator, PactTrainer, encoded_row, pact_dataset
from pact.store.manifest import Store
from pact.store.targets import TargetReader
from pact.trainer.config import TrainConfig
from pact.trainer.model import load_student
from pact.trainer.train import train

STEPS = 5
TOLERANCE = 1e-5
# 10 examples, 2 per micro-batch, 2 micro-batches per step: steps of 2, 2 and 1 micro-batches
# per epoch, so 5 steps cross an epoch and take a step with fewer micro-batches.
OPTIONS = dict(batch_size=2, grad_accum=2, max_steps=STEPS, lr=1e-2, save_every=0, device="cpu", seed=0)


pytestmark = pytest.mark.usefixtures("single_process_hash_cache")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PACT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hash-cache"))
        yield build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def pact_runs(world: World, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`pact train`'s metrics rows for (method, finetune), each run once."""
    root, runs = tmp_path_factory.mktemp("pact-runs"), {}

    def metrics(method: str, finetune: str) -> list[dict[str, Any]]:
        if (method, finetune) not in runs:
            config = train_config(world, root / f"{method}-{finetune}", method=method, finetune=finetune)
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("PACT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hash-cache"))
                runs[method, finetune] = metrics_file(train(config).run_dir)
        return runs[method, finetune]

    return metrics


def metrics_file(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics table, one row per optimizer step."""
    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def train_config(world: World, out: Path, **overrides: Any) -> TrainConfig:
    values = dict(model=str(world.model_dir), data=str(world.data), store=str(world.store_dir), out=str(out),
                  lora_dropout=0.0, **OPTIONS)  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def trainer_options(out: Path) -> dict[str, Any]:
    """TrainingArguments equal to OPTIONS: AdamW (torch), cosine without warmup, no weight
    decay, clipping at 1.0, a log per step, fp32."""
    return dict(
        output_dir=str(out), per_device_train_batch_size=OPTIONS["batch_size"],
        gradient_accumulation_steps=OPTIONS["grad_accum"], max_steps=STEPS, learning_rate=OPTIONS["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
        bf16=False, activation_checkpointing=False,
    )  # fmt: skip


class TrainLogs(TrainerCallback):
    """The training logs every logger callback (W&B, TensorBoard) receives."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.rows.append(dict(logs))


def assert_same_steps(logged: list[dict[str, float]], metrics: list[dict[str, Any]], method: str) -> None:
    assert len(logged) == len(metrics) == STEPS
    keys = ["loss", "ce"] + (["kl", "gate_mean"] if method == "pact" else [])
    for step, (ours, theirs) in enumerate(zip(logged, metrics, strict=True), start=1):
        for key in keys:
            assert ours[key] == pytest.approx(theirs[key], rel=TOLERANCE, abs=TOLERANCE), (step, key)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=TOLERANCE, abs=TOLERANCE), step
        assert ours["learning_rate"] == pytest.approx(theirs["lr"], rel=TOLERANCE), step
        assert ("kl" in ours) == (method == "pact")


def full_model(world: World) -> Any:
    return load_model(world.model_dir, dtype="float32", device="cpu")


# ----------------------------------------------------------------------------- the dataset


def test_pact_dataset_rows_are_pacts_encoding_of_a_file_or_a_datasets_dataset(world: World) -> None:
    import datasets

    tokenizer = load_tokenizer(world.model_dir)
    expected = [
        encoded_row(encode_example(tokenizer, e, EncodingOptions(max_length=64)))
        for e in load_examples(world.data).examples
    ]
    from_file = pact_dataset(world.data, tokenizer, store=world.store_dir)
    assert isinstance(from_file, datasets.Dataset)
    assert from_file.to_list() == expected
    # rows without ids: the same content-hash ids as pact precompute gives the file
    no_ids = [{k: v for k, v in row.items() if k != "id"} for row in data_rows()]
    path = world.root / "no-ids.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in no_ids))
    from_rows = pact_dataset(datasets.Dataset.from_list(no_ids), tokenizer, max_length=64)
    assert from_rows["example_id"] == [e.example_id for e in load_examples(path).examples]
    assert from_rows["input_ids"] == [row["input_ids"] for row in expected]


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pact", "sft", "constrained-sft"])
def test_trainer_steps_equal_pact_train(world: World, pact_runs: Any, tmp_path: Path, method: str) -> None:
    tokenizer = load_tokenizer(world.model_dir)
    logs = TrainLogs()
    trainer = PactTrainer(
        model=full_model(world), args=TrainingArguments(**trainer_options(tmp_path)),
        train_dataset=pact_dataset(world.data, tokenizer, store=world.store_dir), processing_class=tokenizer,
        store=world.store_dir, method=method, callbacks=[logs],
    )  # fmt: skip
    trainer.train()
    assert_same_steps(logs.rows, pact_runs(method, "full"), method)


@pytest.mark.slow
def test_trainer_with_a_peft_lora_model_equals_pact_train_lora(world: World, pact_runs: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)  # pact train seeds before it loads the model and adds the adapters
    model = load_student(train_config(world, tmp_path / "unused", finetune="lora"), "cpu")
    tokenizer = load_tokenizer(world.model_dir)
    logs = TrainLogs()
    trainer = PactTrainer(
        model=model, args=TrainingArguments(**trainer_options(tmp_path)),
        train_dataset=pact_dataset(world.data, tokenizer, store=world.store_dir), processing_class=tokenizer,
        store=world.store_dir, callbacks=[logs],
    )  # fmt: skip
    trainer.train()
    assert_same_steps(logs.rows, pact_runs("pact", "lora"), "pact")


@pytest.mark.slow
def test_sft_trainer_steps_equal_pact_train(world: World, pact_runs: Any, tmp_path: Path) -> None:
    from trl import SFTConfig

    from pact.integrations.hf import PactSFTTrainer

    tokenizer = load_tokenizer(world.model_dir)
    logs = TrainLogs()
    trainer = PactSFTTrainer(
        model=full_model(world), args=SFTConfig(**trainer_options(tmp_path)),
        train_dataset=pact_dataset(world.data, tokenizer, store=world.store_dir), processing_class=tokenizer,
        store=world.store_dir, callbacks=[logs],
    )  # fmt: skip
    trainer.train()
    assert_same_steps(logs.rows, pact_runs("pact", "full"), "pact")


@pytest.mark.slow
def test_sft_trainer_with_a_peft_config_equals_pact_train_lora(world: World, pact_runs: Any, tmp_path: Path) -> None:
    """TRL wraps the model with the user's LoraConfig (pact train's options)."""
    from peft import LoraConfig
    from trl import SFTConfig

    from pact.integrations.hf import PactSFTTrainer

    lora = LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    tokenizer = load_tokenizer(world.model_dir)
    logs = TrainLogs()
    trainer = PactSFTTrainer(
        model=load_model(world.model_dir, dtype="float32", device="cpu"), args=SFTConfig(**trainer_options(tmp_path)),
        train_dataset=pact_dataset(world.data, tokenizer, store=world.store_dir), processing_class=tokenizer,
        store=world.store_dir, peft_config=lora, callbacks=[logs],
    )  # fmt: skip
    trainer.train()
    assert_same_steps(logs.rows, pact_runs("pact", "lora"), "pact")


# ----------------------------------------------------------------------------- refusals


def other_template_tokenizer(world: World, directory: Path) -> Any:
    """The world's tokenizer with another chat template (a system line in every prompt)."""
    tokenizer = load_tokenizer(world.model_dir)
    tokenizer.chat_template = "{{ '<|system|>Be brief.<|end|>' }}" + tokenizer.chat_template
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def test_a_dataset_tokenized_with_another_template_is_refused_before_the_first_step(
    world: World, tmp_path: Path
) -> None:
    rows = pact_dataset(world.data, other_template_tokenizer(world, tmp_path / "tok"), max_length=64)
    tokenizer = load_tokenizer(world.model_dir)
    with pytest.raises(PactError) as error:
        PactTrainer(
            model=full_model(world), args=TrainingArguments(**trainer_options(tmp_path)), train_dataset=rows,
            processing_class=tokenizer, store=world.store_dir,
        )  # fmt: skip
    message = str(error.value)
    assert "\n" not in message
    assert "10 examples were encoded differently" in message and "first: ex-0 (" in message
    assert "tokenizer, chat template or max length" in message


def test_a_tokenizer_with_another_template_is_refused(world: World, tmp_path: Path) -> None:
    other = other_template_tokenizer(world, tmp_path / "tok")
    with pytest.raises(PactError, match="store targets were computed with another chat template"):
        pact_dataset(world.data, other, store=world.store_dir)
    rows = pact_dataset(world.data, load_tokenizer(world.model_dir), store=world.store_dir)
    with pytest.raises(PactError, match="another chat template"):
        PactTrainer(model=full_model(world), args=TrainingArguments(**trainer_options(tmp_path)),
                    train_dataset=rows, processing_class=other, store=world.store_dir)  # fmt: skip


def test_rows_tokenized_without_pact_are_refused(world: World, tmp_path: Path) -> None:
    import datasets

    tokenizer = load_tokenizer(world.model_dir)
    rows = datasets.Dataset.from_list(
        [{"input_ids": ids, "labels": ids} for ids in (tokenizer(r["prompt"])["input_ids"] for r in data_rows())]
    )
    with pytest.raises(PactError, match=r"a training row has no example_id, response_start, response_length: "
                       r"build the dataset with pact.integrations.hf.pact_dataset"):  # fmt: skip
        PactTrainer(model=full_model(world), args=TrainingArguments(**trainer_options(tmp_path)),
                    train_dataset=rows, processing_class=tokenizer, store=world.store_dir)  # fmt: skip


def test_the_collator_checks_each_batch_against_the_store(world: World) -> None:
    tokenizer = load_tokenizer(world.model_dir)
    rows = pact_dataset(world.data, tokenizer, store=world.store_dir).to_list()[:2]
    collator = PactCollator(tokenizer.pad_token_id, TargetReader(Store(world.store_dir)))
    batch = collator(rows)
    assert batch["example_id"] == ["ex-0", "ex-1"]
    assert batch["ref_full"].shape[:2] == batch["step_mask"].shape == (2, max(r["response_length"] for r in rows))
    rows[1]["input_ids"] = rows[1]["input_ids"][:-1] + [rows[1]["input_ids"][-1] + 1]
    with pytest.raises(PactError, match=r"1 example was encoded differently .* first: ex-1 \("):
        collator(rows)


def test_a_model_other_than_the_reference_is_refused(world: World, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(world.model_dir, other)
    make_model(other, len(load_tokenizer(world.model_dir)), seed=1)
    tokenizer = load_tokenizer(world.model_dir)
    with pytest.raises(PactError, match=f"--model {other} is not the reference the store was built from"):
        PactTrainer(model=load_model(other, dtype="float32", device="cpu"),
                    args=TrainingArguments(**trainer_options(tmp_path)),
                    train_dataset=pact_dataset(world.data, tokenizer, store=world.store_dir),
                    processing_class=tokenizer, store=world.store_dir)  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "dpo"}, "unknown method 'dpo'; expected one of pact, sft, constrained-sft"),
        ({"method": "sft", "kl_weight": 0.5}, "kl_weight weighs the PACT KL; it has no effect with method 'sft'"),
        ({"kl_weight": math.nan}, "kl_weight must be a finite number >= 0, got nan"),
        ({"store": None}, "method 'pact' needs store="),
        ({"data_collator": lambda rows: rows}, "not function: leave data_collator unset"),
    ],
)
def test_options_are_refused_with_one_line(world: World, tmp_path: Path, options: dict, message: str) -> None:
    tokenizer = load_tokenizer(world.model_dir)
    values = {"store": world.store_dir} | options
    with pytest.raises(PactError, match=message.replace("(", r"\(")):
        PactTrainer(model=full_model(world), args=TrainingArguments(**trainer_options(tmp_path)),
                    train_dataset=[], processing_class=tokenizer, **values)  # fmt: skip


def test_sft_trainer_refuses_packing(world: World, tmp_path: Path) -> None:
    from trl import SFTConfig

    from pact.integrations.hf import PactSFTTrainer

    tokenizer = load_tokenizer(world.model_dir)
    with pytest.raises(PactError, match="set packing=False and padding_free=False"):
        PactSFTTrainer(model=full_model(world), args=SFTConfig(**trainer_options(tmp_path), packing=True),
                       train_dataset=pact_dataset(world.data, tokenizer, store=world.store_dir),
                       processing_class=tokenizer, store=world.store_dir)  # fmt: skip


# ----------------------------------------------------------------------------- DDP

DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import TrainerCallback, TrainingArguments
    from pact.core.models import load_model, load_tokenizer
    from pact.integrations.hf import PactTrainer, pact_dataset

    spec = json.loads(open(sys.argv[1]).read())

    class TrainLogs(TrainerCallback):
        rows = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.rows.append(dict(logs))

    tokenizer = load_tokenizer(spec["model"])
    trainer = PactTrainer(
        model=load_model(spec["model"], dtype="float32", device="cpu"), args=TrainingArguments(**spec["args"]),
        train_dataset=pact_dataset(spec["data"], tokenizer, store=spec["store"]), processing_class=tokenizer,
        store=spec["store"], callbacks=[TrainLogs()],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        open(spec["logs"], "w").write(json.dumps(TrainLogs.rows))
    """
)


@pytest.mark.slow
def test_trainer_under_ddp_on_two_processes_equals_pact_train_in_one(
    world: World, pact_runs: Any, tmp_path: Path
) -> None:
    """torchrun, 2 gloo processes, 1 example per rank and micro-batch: the global
    micro-batch is pact train's 2, split as pact train splits it."""
    args = trainer_options(tmp_path / "hf") | {"per_device_train_batch_size": 1, "ddp_backend": "gloo"}
    spec = {"model": str(world.model_dir), "data": str(world.data), "store": str(world.store_dir),
            "args": args, "logs": str(tmp_path / "logs.json")}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    launch = torchrun(tmp_path, str(tmp_path / "ddp.py"), str(tmp_path / "spec.json"))
    assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-4000:]
    assert_same_steps(json.loads((tmp_path / "logs.json").read_text()), pact_runs("pact", "full"), "pact")


def test_evaluate_reports_pact_trains_loss_of_the_eval_set(world: World, tmp_path: Path) -> None:
    from pact.integrations.hf import inputs_batch
    from pact.store.safety import load_safety_set
    from pact.trainer.fused import batch_loss
    from pact.trainer.loss import PactConfig

    tokenizer = load_tokenizer(world.model_dir)
    rows = pact_dataset(world.data, tokenizer, store=world.store_dir)
    model = full_model(world)
    args = TrainingArguments(**trainer_options(tmp_path) | {"per_device_eval_batch_size": len(rows)})
    trainer = PactTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                          processing_class=tokenizer, store=world.store_dir)  # fmt: skip
    evaluated = trainer.evaluate()["eval_loss"]
    safety = load_safety_set(Store(world.store_dir))
    batch = inputs_batch(trainer.data_collator(rows.to_list()))
    with torch.no_grad():
        expected = batch_loss(model.eval(), batch, method="pact", kl_weight=1.0, pact=PactConfig(),
                              safety_ids=torch.as_tensor(safety.token_ids), weights=torch.as_tensor(safety.weights))
    assert evaluated == pytest.approx(float(expected.loss), rel=TOLERANCE)
