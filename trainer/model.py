"""The model being trained: the dtype policy, loading (full or LoRA), the online
reference, and saving the outputs (RUN/model, RUN/adapter).

Dtypes (docs/training.md): bf16 autocast on CUDA, fp32 on CPU; full fine-tuning keeps
fp32 master weights, LoRA keeps its frozen base in the compute dtype.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pact.core import models
from pact.core.encoding import assistant_header_ids
from pact.core.errors import PactError
from pact.core.lm_head import head_rows
from pact.store.safety import SafetySet
from pact.trainer import checkpoint
from pact.trainer.config import TrainConfig
from pact.trainer.reference import OnlineReference


def compute_dtype(device: str) -> str:
    """bf16 on CUDA, fp32 on CPU: the autocast dtype and that of frozen weights."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def weights_dtype(finetune: str, device: str) -> str:
    """fp32 master weights for full FT; the frozen LoRA base in the compute dtype."""
    return compute_dtype(device) if finetune == "lora" else "float32"


def autocast_factory(device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory: bf16 autocast on CUDA, nothing on CPU."""
    if device.startswith("cuda"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant): transformers'
    `activation_checkpointing_enable`, or its older name `gradient_checkpointing_enable`
    (deprecated since transformers 5.2x) where the new one does not exist."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_student(config: TrainConfig, device: str) -> Any:
    """The model to fine-tune, loaded with `models.load_model`: full (all weights trainable) or
    wrapped with LoRA adapters."""
    model = models.load_model(
        config.model, dtype=weights_dtype(config.finetune, device), device=device,
        allow_partial_weights=config.allow_partial_weights,
    )  # fmt: skip
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    if config.finetune == "full":
        return model.train()
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, lora)
    except ValueError as exc:
        raise PactError(
            f"--lora-targets {','.join(config.lora_targets)}: {str(exc).splitlines()[0]}"
        ) from None
    return model.train()


def safety_tensors(
    safety: SafetySet | None, model: Any, device: str
) -> tuple[Tensor | None, Tensor | None]:
    """The safety set's token ids [S] (int64) and weights [S] on `device`, checked against
    the rows of the model's LM head; (None, None) without a safety set."""
    if safety is None:
        return None, None
    top_id, vocab = int(safety.token_ids.max()), head_rows(model)
    if top_id >= vocab:
        raise PactError(f"safety token id {top_id} is outside the model's vocabulary of {vocab}")
    return torch.as_tensor(safety.token_ids, device=device), torch.as_tensor(safety.weights, device=device)


def online_reference(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    safety_ids: Tensor | None,
    device: str,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> OnlineReference | None:
    """With `--reference online` (pact, constrained-sft): the reference computed per batch,
    the student with its adapters disabled (LoRA) or a frozen copy of the model (full
    fine-tuning) in the compute dtype. None otherwise."""
    if config.method == "sft" or config.reference != "online":
        return None
    lora = config.finetune == "lora"
    if lora:
        reference = model  # adapters disabled for the reference pass
    else:
        reference = models.load_model(
            config.model, dtype=compute_dtype(device), device=device,
            allow_partial_weights=config.allow_partial_weights,
        ).requires_grad_(False)  # fmt: skip
    return OnlineReference(
        reference,
        assistant_header_ids(tokenizer),
        safety_ids if config.method == "pact" else None,
        tokenizer.pad_token_id,
        adapters_disabled=lora,
        autocast=autocast,
        head_chunk_logits=config.head_chunk_logits,
    )


def _save_pretrained(
    directory: Path, model: Any, tokenizer: Any, state_dict: dict[str, Tensor] | None = None
) -> None:
    with checkpoint.atomic_directory(directory) as tmp:
        if state_dict is None:
            model.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))


def output_dirs(config: TrainConfig, run_dir: Path) -> tuple[Path | None, Path | None]:
    """(model_dir, adapter_dir) that `save_outputs` writes for `config`."""
    if config.finetune == "full":
        return run_dir / "model", None
    return (run_dir / "model" if config.merge else None), run_dir / "adapter"


def save_outputs(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    run_dir: Path,
    *,
    state_dict: dict[str, Tensor] | None = None,
) -> tuple[Path | None, Path | None]:
    """RUN/model (full FT; LoRA with merge) and RUN/adapter (LoRA); returns (model_dir, adapter_dir).

    `state_dict`: the full weights of a sharded (FSDP, full fine-tuning) model, gathered
    on this rank; default: the model's own."""
    model.eval()
    if config.finetune == "full":
        _save_pretrained(run_dir / "model", model, tokenizer, state_dict)
        return run_dir / "model", None
    _save_pretrained(run_dir / "adapter", model, tokenizer)
    if not config.merge:
        return None, run_dir / "adapter"
    _save_pretrained(run_dir / "model", model.merge_and_unload(), tokenizer)
    return run_dir / "model", run_dir / "adapter"
