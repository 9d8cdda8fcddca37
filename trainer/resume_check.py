"""`pact train --resume`: what it resumes from, checked before any model is loaded.

`checked_latest_checkpoint(run_dir)` is the newest complete checkpoint of the run (or None when the
run was killed before its first one, then its `config.json` is checked instead). Every
file of that checkpoint is checked to be what `pact train` writes: the JSON files parse
to objects of the expected shape, the step counts are non-negative integers that agree
with the directory name, the weights have a readable safetensors header, and the torch
files are whole archives. A damaged file is one `PactError` line naming the file and the
way out (delete the checkpoint to resume from the one before, or choose another --out).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

from pact.core.errors import PactError
from pact.trainer import checkpoint

TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")
STATE_COUNTS = ("step", "epoch", "batch_index")


def _advice(path: Path) -> str:
    if checkpoint.checkpoint_step(path.parent) is not None:
        return f"delete {path.parent} to resume from the checkpoint before it, or choose another --out"
    return "choose another --out"


def _damaged(path: Path, why: str) -> PactError:
    return PactError(f"--resume: {path} {why}; {_advice(path)}")


def read_json_object(path: Path, keys: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """The JSON object in `path`, holding `keys` with values of the given types; PactError
    (one line, with the way out) when the file is not UTF-8 JSON or has another shape."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _damaged(path, "is not UTF-8 text (damaged?)") from None
    except ValueError as exc:
        raise _damaged(path, f"is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise _damaged(path, f"holds a JSON {type(value).__name__}, not an object")
    for key, kind in keys.items():
        if not isinstance(value.get(key), kind) or isinstance(value.get(key), bool):
            raise _damaged(path, f"has no valid {key!r} entry")
    return value


def check_run_record(path: Path) -> dict[str, Any]:
    """A run's (or checkpoint's) `config.json`: an object with `options` and `fingerprints`."""
    return read_json_object(path, {"options": dict, "fingerprints": dict})


def check_state(path: Path, step: int | None) -> dict[str, Any]:
    """`trainer_state.json`: step, epoch and batch_index non-negative integers (step equal to
    the directory's N), elapsed_s a finite number >= 0, metrics a list of objects, nothing else."""
    state = read_json_object(path, {name: int for name in STATE_COUNTS} | {"metrics": list})
    unknown = sorted(set(state) - set(checkpoint.TrainerState.__dataclass_fields__))
    if unknown:
        raise _damaged(path, f"has unknown entries {unknown}")
    for name in STATE_COUNTS:
        if state[name] < 0:
            raise _damaged(path, f"has {name} {state[name]}, below 0")
    elapsed = state.get("elapsed_s", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) or elapsed < 0:
        raise _damaged(path, f"has elapsed_s {elapsed!r}, not a number >= 0")
    if step is not None and state["step"] != step:
        raise _damaged(path, f"says step {state['step']} but its directory is step-{step}")
    if not all(isinstance(row, dict) for row in state["metrics"]):
        raise _damaged(path, "has metrics rows that are not objects")
    return state


def check_rng(path: Path) -> None:
    """`rng.json`: python [version, state list, gauss] and numpy [name, keys, pos, has_gauss, cached]."""
    states = read_json_object(path, {"python": list, "numpy": list})
    python, numpy = states["python"], states["numpy"]
    if len(python) != 3 or not isinstance(python[1], list) or len(numpy) != 5 or not isinstance(numpy[1], list):
        raise _damaged(path, "does not hold the python and numpy generator states")


def check_weights(path: Path) -> None:
    """A readable safetensors header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, f"is not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def check_torch_file(path: Path) -> None:
    """A whole torch.save archive: a zip whose directory (at its end) reads and lists a
    `data.pkl`; cheap, the members are not read (a file cut or overwritten fails here,
    damage inside a member when `load_checkpoint` reads it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise _damaged(path, f"is not a whole torch archive ({exc})") from None
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise _damaged(path, "is a zip archive but not one torch.save wrote (no data.pkl)")


def check_checkpoint(path: Path) -> None:
    """Every file of checkpoint directory `path` (see the module docstring)."""
    check_run_record(path / checkpoint.CONFIG_FILE)
    check_state(path / checkpoint.STATE_FILE, checkpoint.checkpoint_step(path))
    check_rng(path / "rng.json")
    check_weights(path / checkpoint.WEIGHTS_FILE)
    for name in TORCH_FILES:
        check_torch_file(path / name)


def checked_latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of `run_dir`, checked; None when it has none (its
    `config.json`, when present, is checked then: the run restarts from step 0)."""
    checkpoints = run_dir / checkpoint.CHECKPOINTS_DIR
    if checkpoints.exists() and not checkpoints.is_dir():
        raise PactError(f"--resume: {checkpoints} is not a directory; move it away or choose another --out")
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        check_checkpoint(latest)
    elif (run_dir / checkpoint.CONFIG_FILE).is_file():
        check_run_record(run_dir / checkpoint.CONFIG_FILE)
    return latest
