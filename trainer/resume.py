"""Where a run starts: seeded from step 0, or `--resume`d from its newest complete
checkpoint once that checkpoint is shown to belong to this run (same options, model
and data; on another world size the same global micro-batch).
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pact.core import distributed
from pact.core.errors import PactError
from pact.trainer import checkpoint
from pact.trainer.checkpoint import TrainerState
from pact.trainer.config import RESUMABLE_CHANGES
from pact.trainer.resume_check import checked_latest_checkpoint


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(seed: int, device: str) -> Iterator[None]:
    """Seed python, numpy and torch; on CPU also deterministic kernels (restored on exit)."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    seed_everything(seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def check_resume(record: dict[str, Any], saved: dict[str, Any], path: Path) -> None:
    """The checkpoint was written by the same run (options, model and data); on another
    world size, --batch-size x ranks (the global micro-batch) is unchanged."""
    world, saved_world = record.get("world_size", 1), saved.get("world_size", 1)
    batch, saved_batch = record["options"]["batch_size"], saved["options"].get("batch_size")
    if world != saved_world and (
        not isinstance(saved_batch, int) or batch * world != saved_batch * saved_world
    ):
        micro = saved_batch * saved_world if isinstance(saved_batch, int) else None
        hint = (
            f"pass --batch-size {micro // world}"
            if micro is not None and micro % world == 0
            else f"run on a number of ranks that divides {micro}"
        )
        raise PactError(
            f"--resume: {path.name} was trained with {saved_world} rank(s) x --batch-size {saved_batch} "
            f"examples per micro-batch, this run has {world} x {batch}; keep the global micro-batch: {hint}"
        )
    for key, value in sorted(record["options"].items()):
        if key == "batch_size" and world != saved_world:
            continue  # checked above
        if key not in RESUMABLE_CHANGES and saved["options"].get(key) != value:
            raise PactError(
                f"--resume: option {key} is {value!r} but {path.name} was trained with "
                f"{saved['options'].get(key)!r}; keep the options or choose another --out"
            )
    for key in ("model", "data"):
        if saved["fingerprints"].get(key) != record["fingerprints"][key]:
            raise PactError(
                f"--resume: the {key} changed since {path.name} was written (fingerprint differs)"
            )


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint `--resume` continues from: the newest complete one, or None (no
    --resume, or a run killed before its first checkpoint, which starts over at step 0)."""
    if not resume:
        return None
    latest = checked_latest_checkpoint(run_dir)
    if latest is None and not (run_dir / "config.json").is_file():
        raise PactError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    return latest


def check_checkpoint(record: dict[str, Any], path: Path) -> None:
    """`check_resume` against the record of checkpoint `path`; every rank agrees."""
    with distributed.agreeing():
        check_resume(record, checkpoint.read_checkpoint_config(path), path)


def fresh_state(record: dict[str, Any], run_dir: Path, resume: bool, seed: int) -> TrainerState:
    """Step 0, every generator reseeded with `seed` (the same dropout stream whatever was
    loaded before). With --resume (a run killed before its first checkpoint starts over)
    the run's RUN/config.json must match as a checkpoint's would."""
    if resume:
        started_config = run_dir / "config.json"
        with distributed.agreeing():
            check_resume(record, json.loads(started_config.read_text()), started_config)
    seed_everything(seed)
    return TrainerState()
