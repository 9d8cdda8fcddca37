"""Bad `pact train --resume` run directories (issue 15, weak case): a missing, empty or file
--out, checkpoint files cut, emptied or overwritten, state files of another shape or with
out-of-range counts, and checkpoints of another run each end in one `error:` line (exit
code 2, no traceback), before any model is loaded where the files alone tell; the advice
"delete the checkpoint" resumes from the one before.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hostile.harness import assert_one_error_line, call_pact
from train_fixtures import build_world

from pact.trainer.train import train

CHECKPOINT_FILES = (
    "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "rng.json", "trainer_state.json", "config.json",
)  # fmt: skip
EARLY = r"; delete .*/checkpoints/step-2 to resume from the checkpoint before it, or choose another --out$"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A world and two finished runs of 2 steps (checkpoints step-1 and step-2): full and LoRA."""
    from pact.trainer.config import TrainConfig

    root = tmp_path_factory.mktemp("resume")
    world = build_world(root)
    for name, finetune in (("full", "full"), ("lora", "lora")):
        train(TrainConfig(
            model=str(world.model_dir), data=str(world.data), store=str(world.store_dir), out=str(root / name),
            max_steps=2, save_every=1, finetune=finetune, device="cpu",
        ))  # fmt: skip
    return world, root


def resume(world, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`pact train --resume` into `out`; stderr without the progress bars (drawn over
    with carriage returns), which run before a late error."""
    result = call_pact(
        "train", "--model", world.model_dir, "--data", world.data, "--store", world.store_dir, "--out", out,
        "--device", "cpu", "--save-every", "1", "--max-steps", "3", "--finetune", "full", "--resume", *extra,
    )  # fmt: skip
    result.stderr = re.sub(r"(?m)^[^\n]*\r", "", result.stderr)
    return result


@pytest.fixture
def run(runs, tmp_path):
    world, root = runs
    return world, shutil.copytree(root / "full", tmp_path / "run")


def step(run_dir: Path, n: int = 2) -> Path:
    return run_dir / "checkpoints" / f"step-{n}"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded: the error must come from the files alone."""
    from pact.core import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
@pytest.mark.parametrize("damage", ["cut", "empty", "garbage"])
def test_a_damaged_checkpoint_file_is_one_line_before_the_model_loads(run, no_model_load, name, damage):
    """Before: tracebacks (JSONDecodeError, UnicodeDecodeError, torch's RuntimeError and
    UnpicklingError) after the model had loaded, or `aborted` (exit 130) for an empty .pt."""
    world, run_dir = run
    path = step(run_dir) / name
    data = path.read_bytes()
    path.write_bytes({"cut": data[: len(data) // 2], "empty": b"", "garbage": b"\x00garbage\xff" * 10}[damage])
    line = assert_one_error_line(resume(world, run_dir), r"^error: --resume: .*step-2/" + name.replace(".", r"\.") + " ")
    assert line.endswith("; delete " + str(step(run_dir)) + " to resume from the checkpoint before it, or choose another --out")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("trainer_state.json", [1, 2], r"trainer_state\.json holds a JSON list, not an object"),
        ("trainer_state.json", {"step": -5, "epoch": 0, "batch_index": 0, "metrics": []}, r"has step -5, below 0"),
        ("trainer_state.json", {"step": 2, "epoch": -1, "batch_index": 0, "metrics": []}, r"has epoch -1, below 0"),
        ("trainer_state.json", {"step": 2, "epoch": 0, "batch_index": 1.5, "metrics": []}, r"no valid 'batch_index' entry"),
        ("trainer_state.json", {"step": 2, "epoch": 0, "batch_index": "1", "metrics": []}, r"no valid 'batch_index' entry"),
        ("trainer_state.json", {"step": 10**30, "epoch": 0, "batch_index": 0, "metrics": []}, r"says step 10+ but its directory is step-2"),
        ("trainer_state.json", {"step": 2, "epoch": 0, "batch_index": 0, "metrics": [], "x": 1}, r"has unknown entries \['x'\]"),
        ("trainer_state.json", {"step": 2, "epoch": 0, "batch_index": 0, "metrics": [], "elapsed_s": -1}, r"elapsed_s -1, not a number >= 0"),
        ("config.json", {"fingerprints": {}}, r"config\.json has no valid 'options' entry"),
        ("rng.json", {"python": [1], "numpy": [2]}, r"rng\.json does not hold the python and numpy generator states"),
    ],
)
def test_state_files_of_another_shape_or_out_of_range_are_one_line(run, no_model_load, name, content, message):
    """Before: TypeError, KeyError, ValueError tracebacks; a negative step resumed."""
    world, run_dir = run
    (step(run_dir) / name).write_text(json.dumps(content))
    assert_one_error_line(resume(world, run_dir), message + EARLY)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", r"is not valid JSON"), ("[]", r"holds a JSON list"), ("{}", r"has no valid 'options' entry")],
)
def test_a_run_killed_before_its_first_checkpoint_with_a_bad_config_is_one_line(run, no_model_load, content, message):
    world, run_dir = run
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "config.json").write_text(content)
    assert_one_error_line(resume(world, run_dir), r"^error: --resume: .*/run/config\.json " + message + r".*; choose another --out$")


def test_bad_out_directories_are_one_line(runs, tmp_path, no_model_load):
    world, _ = runs
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    assert_one_error_line(resume(world, tmp_path / "file"), r"^error: --out .*file exists and is not a directory$")
    for name in ("empty", "missing"):
        assert_one_error_line(
            resume(world, tmp_path / name), rf"^error: --resume: .*{name} has no complete checkpoint to resume from$"
        )


def test_a_checkpoints_file_is_one_line(run, no_model_load):
    """Before: `error: File exists`, naming no cause."""
    world, run_dir = run
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").write_text("x")
    assert_one_error_line(resume(world, run_dir), r"^error: --resume: .*/checkpoints is not a directory; move it away")


def test_the_checkpoint_of_another_run_is_one_line(runs, tmp_path):
    world, root = runs
    run_dir = shutil.copytree(root / "full", tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")
    shutil.copytree(root / "lora" / "checkpoints", run_dir / "checkpoints")
    assert_one_error_line(resume(world, run_dir), r"^error: --resume: option finetune is 'full' but step-2 was trained with 'lora'")


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_torch_state_of_another_run_is_one_line(runs, tmp_path, name):
    """Whole files of another run (LoRA's optimizer, a scheduler state of other keys): only
    torch can tell, after the model loaded. Before: ValueError / KeyError tracebacks."""
    import torch

    world, root = runs
    run_dir = shutil.copytree(root / "full", tmp_path / "run")
    if name == "optimizer.pt":
        shutil.copy(step(root / "lora") / name, step(run_dir) / name)
    else:
        torch.save({"foo": 1}, step(run_dir) / name)
    assert_one_error_line(
        resume(world, run_dir), rf"^error: --resume: cannot restore {name.replace('.', '[.]')} of .*step-2 \(\w+: " + r".*\)" + EARLY
    )


def test_the_advice_to_delete_a_damaged_checkpoint_resumes_from_the_one_before(run):
    world, run_dir = run
    (step(run_dir) / "optimizer.pt").write_bytes(b"")
    line = assert_one_error_line(resume(world, run_dir), r"optimizer\.pt is not a whole torch archive")
    shutil.rmtree(line.split("; delete ")[1].split(" to resume")[0])
    result = resume(world, run_dir)
    assert result.returncode == 0, result.stderr
    state = json.loads((step(run_dir, 3) / "trainer_state.json").read_text())
    assert state["step"] == 3 and [row["step"] for row in state["metrics"]] == [1, 2, 3]
