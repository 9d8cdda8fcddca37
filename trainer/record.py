"""What a run writes about itself: RUN/config.json (the run record: options,
fingerprints, versions), one metrics row per optimizer step, RUN/metrics.parquet and
the store's `metrics/RUN_ID.parquet`, and the error that stops a diverged run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pact.core import distributed
from pact.core.atomic import (
    TEMP_PREFIX,
    atomic_write_bytes,
    atomic_write_with,
    remove_stale_temporaries,
)
from pact.core.distributed import Ranks
from pact.core.encoding import Encoded, encoding_fingerprints
from pact.core.errors import PactError
from pact.store.manifest import Store
from pact.store.tables import METRICS_SCHEMA, write_table
from pact.trainer import checkpoint
from pact.trainer.config import TrainConfig
from pact.trainer.inputs import RunInputs


def data_fingerprint(encoded: list[Encoded]) -> str:
    """sha256 over the examples' ids and token hashes, in order (16 hex digits)."""
    digest = hashlib.sha256()
    for example in encoded:
        digest.update(f"{example.example_id}\0{example.token_hash}\n".encode())
    return digest.hexdigest()[:16]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_record(
    config: TrainConfig,
    inputs: RunInputs,
    run_id: str,
    steps_per_epoch: int,
    total_steps: int,
    world_size: int = 1,
) -> dict[str, Any]:
    """RUN/config.json: every option (paths absolute), fingerprints, versions, world size."""
    options = dataclasses.asdict(config)
    for key in ("model", "data", "out", "store"):
        if options[key] is not None:
            options[key] = str(Path(options[key]).resolve())
    record = {
        "options": options,
        "run_id": run_id,
        "store": options["store"],
        "fingerprints": {
            "model": inputs.model_fingerprint,
            "data": data_fingerprint(inputs.encoded),
            "safety_tokens": None if inputs.safety is None else inputs.safety.fingerprint,
            "store_reference": inputs.reference_entry,
            **encoding_fingerprints(inputs.tokenizer, inputs.options),
        },
        "num_examples": len(inputs.encoded),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "world_size": world_size,
        "versions": {p: _version(p) for p in ("pact", "torch", "transformers", "peft")},
    }
    return json.loads(json.dumps(record))


def peak_memory_mb(device: str, ranks: Ranks) -> float:
    """Peak memory so far: CUDA allocations, or the process's max RSS on CPU; the
    largest over the ranks under torchrun."""
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return distributed.all_reduce([peak], "max")[0] if ranks.enabled else peak


def metrics_row(
    losses: dict[str, float | None],
    *,
    run_id: str,
    method: str,
    step: int,
    epoch: int,
    lr: float,
    grad_norm: float,
    tokens_per_s: float,
    peak_memory_mb: float,
    time: float,
) -> dict[str, Any]:
    """One row of METRICS_SCHEMA: `losses` (loss, ce, kl, gate_mean) then the step's
    numbers; the drift probe's columns are None until it measures."""
    return losses | {
        "run_id": run_id,
        "method": method,
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s,
        "peak_memory_mb": peak_memory_mb,
        "time": time,
        "probe_kl": None,
        "probe_mass": None,
    }


@dataclass(frozen=True)
class RunFiles:
    """Where a run writes: its directory and, with a store, the store's metrics table."""

    run_dir: Path
    store: Store | None
    run_id: str

    def start(self, record: dict[str, Any]) -> None:
        """Remove what a killed run left (temporaries, half-pruned checkpoints, the
        store's metrics temporaries), then write RUN/config.json. Rank 0 only."""
        checkpoint.remove_stale_directories(self.run_dir / checkpoint.CHECKPOINTS_DIR)
        checkpoint.remove_stale_directories(self.run_dir)
        if self.run_dir.is_dir():
            remove_stale_temporaries(self.run_dir)
            checkpoint.prune_checkpoints(self.run_dir)
        if self.store is not None:
            for stale in (self.store.root / "metrics").glob(f"{TEMP_PREFIX}{self.run_id}.parquet.*"):
                stale.unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            self.run_dir / "config.json", json.dumps(record, indent=1, sort_keys=True).encode()
        )

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """RUN/metrics.parquet and, with a store, its metrics table. Rank 0 only."""
        table = pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)
        atomic_write_with(self.run_dir / "metrics.parquet", lambda p: pq.write_table(table, p))
        if self.store is not None:
            write_table(self.store, "metrics", self.run_id, table)

    def stopped(self, reason: str, metrics: list[dict[str, Any]]) -> PactError:
        """Write the metrics so far (rank 0; every rank calls it) and return the error
        that stops the run, saying whether a checkpoint is left to resume from."""
        distributed.on_main(lambda: self.write_metrics(metrics))
        last = checkpoint.latest_checkpoint(self.run_dir)
        kept = (
            f"the last checkpoint {last} is intact (--resume continues from it)"
            if last
            else "no checkpoint was written"
        )
        return PactError(f"{reason}; training stopped, {kept}")
