"""`TrainConfig`: every option of `pact train`, its default, its help and its checks.

The click command (`pipeline/commands/train.py`) builds its options from these fields
(`pact.core.config.cli_options`); the gate and KL options are `PactConfig`'s
(trainer/loss.py). A config that makes no sense raises one `PactError` when it is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pact.core.config import check_choice, check_device, check_int, check_number, flag, setting
from pact.core.data import FORMATS
from pact.core.errors import PactError
from pact.core.lm_head import DEFAULT_HEAD_CHUNK_LOGITS
from pact.core.models import PARTIAL_WEIGHTS_HELP
from pact.store.tables import check_table_name
from pact.store.targets import DEFAULT_MEMORY_BUDGET_MB
from pact.trainer.loss import PactConfig

METHODS = ("pact", "sft", "constrained-sft")
REFERENCE_MODES = ("cached", "online")
FINETUNE_MODES = ("lora", "full")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_KL_WEIGHT = 1.0
DEFAULT_MAX_LENGTH = 1024
# Options that may differ when resuming: they do not change the steps already taken.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps", "epochs", "save_every", "resume", "merge", "out", "device", "run_id",
        "targets_memory_mb", "fsdp", "probe_batch_size", "head_chunk_logits", "allow_partial_weights",
    }
)  # fmt: skip
# --batch-size may change on resume when the world size changes with it: the global
# micro-batch (--batch-size x ranks) must stay the same (trainer/run_dir.py).


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `pact train` (the CLI flag is `--field-name` unless given)."""

    model: str = setting(help="Local model directory to fine-tune; it is also the reference.", path="dir")
    data: str = setting(help="Training data: JSON, JSONL or Parquet.", path="file")
    out: str = setting(help="Run directory (model/adapter, checkpoints, metrics).", path="any")
    store: str | None = setting(
        None, help="pact store with the safety set and targets (optional for --method sft).", path="dir"
    )
    method: str = setting("pact", help="Training loss.", choices=METHODS)
    reference: str = setting(
        "cached", help="Reference statistics from the store, or computed on the fly.", choices=REFERENCE_MODES
    )
    kl_weight: float = setting(
        DEFAULT_KL_WEIGHT, help="Weight λ of the PACT KL (--method pact).", flag="--lambda"
    )
    pact: PactConfig = setting(help="Gate and KL temperature.", factory=PactConfig, cli=False)
    data_format: str | None = setting(
        None, help="Row shape of --data; detected when omitted.", flag="--format", choices=FORMATS
    )
    max_length: int | None = setting(None, help="Tokens per example; default: the store's, else 1024.")
    label_after_end_of_turn: bool = setting(
        False,
        help="Label what the chat template writes after its end-of-turn token too (Qwen's, Gemma's, "
        "Phi-3's newline), as the paper's code does; default: labels stop at end-of-turn. Must match "
        "the store's targets.",
    )
    finetune: str = setting("lora", help="LoRA adapters or every weight.", choices=FINETUNE_MODES)
    lora_r: int = setting(8, help="LoRA rank.")
    lora_alpha: float = setting(16.0, help="LoRA alpha.")
    lora_dropout: float = setting(0.05, help="LoRA dropout.")
    lora_targets: tuple[str, ...] = setting(
        DEFAULT_LORA_TARGETS, help="Comma-separated module names that get adapters."
    )
    merge: bool = setting(False, help="LoRA: also write the merged model to RUN/model.")
    epochs: int = setting(1, help="Passes over the data.")
    max_steps: int | None = setting(None, help="Optimizer steps; overrides --epochs.")
    batch_size: int = setting(4, help="Examples per micro-batch (per rank under torchrun).")
    grad_accum: int = setting(1, help="Micro-batches per optimizer step.")
    lr: float = setting(1e-4, help="Peak learning rate (AdamW).")
    weight_decay: float = setting(0.0, help="AdamW weight decay.")
    warmup_steps: int = setting(0, help="Linear warmup steps.")
    schedule: str = setting("cosine", help="Learning-rate schedule after the warmup.", choices=SCHEDULES)
    max_grad_norm: float = setting(1.0, help="Gradient clipping; 0 disables it.")
    gradient_checkpointing: bool = setting(
        False, help="Recompute activations in backward to save memory."
    )
    allow_partial_weights: bool = setting(False, help=PARTIAL_WEIGHTS_HELP)
    seed: int = setting(0, help="Seed of the data order, LoRA init and dropout.")
    save_every: int = setting(
        500, help="Checkpoint every N optimizer steps (and at the end); 0 = never."
    )
    resume: bool = setting(False, help="Continue from the newest complete checkpoint in --out.")
    device: str = setting(
        "auto",
        help="auto, cpu, cuda or cuda:N (under torchrun auto or cuda: cuda:LOCAL_RANK; another index is refused).",
    )
    run_id: str | None = setting(
        None, help="Name of the run in the store's metrics table; default: the --out folder name."
    )
    targets_memory_mb: float = setting(
        DEFAULT_MEMORY_BUDGET_MB,
        help="Memory for target row groups read from the store (an LRU cache; targets stream from disk).",
    )
    fsdp: bool = setting(
        False,
        help="Under torchrun: shard the model with FSDP instead of replicating it with DDP (full fine-tuning).",
    )
    probe: str | None = setting(
        None,
        help="Safety set (prompt, refusal) for the drift probe; cached reference from the store.",
        path="file",
    )
    probe_every: int = setting(
        0, help="Run the drift probe every N optimizer steps (metrics probe_kl, probe_mass); 0 = never."
    )
    probe_batch_size: int = setting(16, help="Probe examples per forward pass (--probe-every).")
    head_chunk_logits: int = setting(
        DEFAULT_HEAD_CHUNK_LOGITS,
        help="Logits per LM-head chunk (rows x vocabulary): bounds the head's memory; results do not change.",
    )

    def __post_init__(self) -> None:
        _check(self)


def _check(config: TrainConfig) -> None:
    """One clear PactError for any option, or combination of options, that makes no sense."""

    def name(field: str) -> str:
        return flag(TrainConfig, field)

    check_choice(config.method, METHODS, name("method"))
    check_choice(config.reference, REFERENCE_MODES, name("reference"))
    check_choice(config.finetune, FINETUNE_MODES, name("finetune"))
    check_choice(config.schedule, SCHEDULES, name("schedule"))
    if config.data_format is not None:
        check_choice(config.data_format, FORMATS, name("data_format"))
    check_number(config.kl_weight, name("kl_weight"), minimum=0.0)
    if config.method != "pact" and config.kl_weight != DEFAULT_KL_WEIGHT:
        raise PactError(f"--lambda weighs the PACT KL; it has no effect with --method {config.method}")
    if config.method == "sft" and config.reference == "online":
        raise PactError("--method sft uses no reference model; --reference online makes no sense with it")
    if config.method != "sft" and config.store is None and config.reference == "cached":
        raise PactError(
            f"--method {config.method} with --reference cached needs --store (the targets of pact precompute); "
            "or use --reference online"
        )
    if config.method == "pact" and config.store is None:
        raise PactError("--method pact needs --store for the safety-token set (pact tokens)")
    if config.merge and config.finetune != "lora":
        raise PactError("--merge applies to LoRA only; full fine-tuning already writes RUN/model")
    if config.max_length is not None:
        check_int(config.max_length, name("max_length"), 2)
    check_int(config.lora_r, name("lora_r"))
    check_number(config.lora_alpha, name("lora_alpha"), minimum=0.0, inclusive=False)
    check_number(config.lora_dropout, name("lora_dropout"), minimum=0.0, below=1.0)
    if not config.lora_targets or not all(isinstance(t, str) and t.strip() for t in config.lora_targets):
        raise PactError(f"--lora-targets must name at least one module, got {config.lora_targets!r}")
    check_int(config.epochs, name("epochs"))
    if config.max_steps is not None:
        check_int(config.max_steps, name("max_steps"))
    check_int(config.batch_size, name("batch_size"))
    check_int(config.grad_accum, name("grad_accum"))
    check_number(config.lr, name("lr"), minimum=0.0, inclusive=False)
    check_number(config.weight_decay, name("weight_decay"), minimum=0.0)
    check_int(config.warmup_steps, name("warmup_steps"), 0)
    check_number(config.max_grad_norm, name("max_grad_norm"), minimum=0.0)
    check_int(config.save_every, name("save_every"), 0)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise PactError(f"--seed must be an integer, got {config.seed!r}")
    if not isinstance(config.pact, PactConfig):
        raise PactError("TrainConfig.pact must be a pact.PactConfig")
    check_number(config.targets_memory_mb, name("targets_memory_mb"), minimum=0.0, inclusive=False)
    check_int(config.probe_every, name("probe_every"), 0)
    if config.run_id is not None:
        check_table_name(config.run_id, name("run_id"))
    check_int(config.probe_batch_size, name("probe_batch_size"))
    check_int(config.head_chunk_logits, name("head_chunk_logits"))
    check_device(config.device, name("device"))
    if config.probe_every and config.probe is None:
        raise PactError("--probe-every needs --probe FILE (a safety set with refusals)")
    if config.probe is not None and not config.probe_every:
        raise PactError("--probe FILE needs --probe-every N (optimizer steps between probes)")
    if config.probe is not None and config.store is None:
        raise PactError("--probe needs --store (the safety tokens and the reference probe live there)")
    if config.fsdp and config.finetune != "full":
        raise PactError(
            "--fsdp supports full fine-tuning only (pact does not save or merge the adapters of "
            "a sharded LoRA model); LoRA runs under torchrun with DDP, the default"
        )
    if config.fsdp and config.reference == "online":
        raise PactError(
            "--fsdp needs --reference cached: an online reference would be a second, unsharded "
            "copy of the model on every rank"
        )


def default_run_id(out: str | Path) -> str:
    """The run directory's name, reduced to the characters a table name allows."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(out).resolve().name).lstrip("._-")
    return name or "run"
