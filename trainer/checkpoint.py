"""Checkpoints: `RUN/checkpoints/step-N`, written atomically, the newest two kept.

A checkpoint holds everything needed to continue a run exactly:

    trainable.safetensors  trainable parameters by name (every weight for full
                           fine-tuning, the adapter weights for LoRA)
    optimizer.pt           optimizer state dict   (torch.save; read back only with
    scheduler.pt           scheduler state dict    torch.load(weights_only=True))
    rng.pt                 torch CPU (and CUDA) generator states
    rng.json               python `random` and numpy global generator states
    trainer_state.json     data position (epoch, next global micro-batch, optimizer
                           step), elapsed seconds, the metrics rows so far
    config.json            the run's configuration

Under torchrun rank 0 writes it, with the full weights and the optimizer state in the
single-process layout (FSDP gathers them first), so it loads on any world size.

Each checkpoint is written into a `.tmp-` directory, fsynced and renamed, so a
`step-N` directory is always complete; a killed run leaves at most a `.tmp-`
directory, removed on the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pact.core.atomic import TEMP_PREFIX, fsync_dir
from pact.core.errors import PactError

CHECKPOINTS_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
CHECKPOINT_FILES = (
    WEIGHTS_FILE,
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "rng.json",
    STATE_FILE,
    CONFIG_FILE,
)
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where a run stands: `step` optimizer steps done; the next micro-batch is batch
    `batch_index` of epoch `epoch` (0-based; a global micro-batch of `--batch-size` x
    ranks examples); `elapsed_s` seconds of training so far; `metrics` one row per
    optimizer step."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    elapsed_s: float = 0.0
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success fsync it and rename
    it to `final` (replacing an older `final`). On an exception `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f"{TEMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_directories(parent: str | os.PathLike) -> list[Path]:
    """Delete `.tmp-` directories left in `parent` by a killed writer; return them."""
    parent = Path(parent)
    stale = [p for p in parent.glob(TEMP_PREFIX + "*") if p.is_dir()] if parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that receive gradients, by name (shared tensors once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _rng_json() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(directory: Path) -> None:
    states = json.loads((directory / "rng.json").read_text())
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch_states = torch.load(directory / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(torch_states["cpu"])
    cuda_states = torch_states.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_step(path: Path) -> int | None:
    """N for a `step-N` directory name, else None."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's `step-N` directories holding every checkpoint file, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir()
        and checkpoint_step(p) is not None
        and all((p / f).is_file() for f in CHECKPOINT_FILES)
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    *,
    keep: int = KEEP_CHECKPOINTS,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `RUN/checkpoints/step-<state.step>` atomically, then delete all but the newest `keep`.

    `weights` / `optimizer_state`: the trainable weights by name and the optimizer state
    dict when the model's own are sharded (FSDP, gathered by `distributed.FullState`);
    default: read from `model` and `optimizer`.
    """
    final = Path(run_dir) / CHECKPOINTS_DIR / f"step-{state.step}"
    with atomic_directory(final) as tmp:
        if weights is None:
            weights = {
                n: p.detach().to("cpu").contiguous().clone()
                for n, p in trainable_parameters(model).items()
            }
        save_file(weights, str(tmp / WEIGHTS_FILE))
        torch.save(
            optimizer.state_dict() if optimizer_state is None else optimizer_state,
            tmp / "optimizer.pt",
        )
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        torch.save({"cpu": torch.get_rng_state(), "cuda": cuda}, tmp / "rng.pt")
        (tmp / "rng.json").write_text(json.dumps(_rng_json()))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int = KEEP_CHECKPOINTS) -> None:
    """Delete all but the newest `keep` complete checkpoints (also what a killed prune left)."""
    for old in complete_checkpoints(run_dir)[:-keep]:
        doomed = old.with_name(f"{TEMP_PREFIX}pruned-{old.name}")
        os.replace(old, doomed)  # a kill mid-delete leaves a .tmp- dir the next run removes
        shutil.rmtree(doomed, ignore_errors=True)


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The run configuration recorded in a checkpoint."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    load_weights: Callable[[dict[str, torch.Tensor]], None] | None = None,
    load_optimizer_state: Callable[[dict[str, Any]], None] | None = None,
) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG states in place; return the data position.

    `load_weights` / `load_optimizer_state` replace the in-place copies for a sharded
    model (FSDP: `distributed.FullState`); names and shapes are checked either way.
    """
    path = Path(path)
    params = trainable_parameters(model)
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise PactError(f"checkpoint {path} has unreadable weights ({exc})") from None
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:3]
        extra = sorted(set(weights) - set(params))[:3]
        raise PactError(
            f"checkpoint {path} does not match the model (missing {missing}, unexpected {extra}); "
            "was it written with other --finetune/--lora options?"
        )
    for name, param in params.items():
        if weights[name].shape != param.shape:
            raise PactError(
                f"checkpoint {path}: {name} has shape {list(weights[name].shape)}, the model {list(param.shape)}"
            )
    if load_weights is None:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
    else:
        load_weights(weights)
    with _restoring(path, "optimizer.pt"):
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if load_optimizer_state is None:
            optimizer.load_state_dict(optimizer_state)
        else:
            load_optimizer_state(optimizer_state)
    with _restoring(path, "scheduler.pt"):
        scheduler.load_state_dict(
            torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
        )
    with _restoring(path, "rng.pt and rng.json"):
        _restore_rng(path)
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


@contextlib.contextmanager
def _restoring(path: Path, what: str) -> Iterator[None]:
    """Any failure to read or apply `what` of checkpoint `path` as one PactError line (a
    damaged file, or one written by another run: torch raises a dozen types for these)."""
    try:
        yield
    except PactError:
        raise
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = (lines[0] if lines else type(exc).__name__)[:200]
        raise PactError(
            f"--resume: cannot restore {what} of {path} ({type(exc).__name__}: {reason}); delete {path} "
            "to resume from the checkpoint before it, or choose another --out"
        ) from None
