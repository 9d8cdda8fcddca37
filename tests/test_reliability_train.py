"""Reliability of `pact train` under faults (docs/reliability.md, "Faults").

- SIGKILL at seeded random moments of real CLI runs, and at chosen points of a
  checkpoint write, then `--resume`: the final weights are bitwise equal to an
  uninterrupted run's (fp32, CPU), the metrics too, and nothing is left behind.
- ENOSPC part-way through a checkpoint write: the last checkpoint stays intact and
  `--resume` completes.
- A stale cache (tokenizer, chat template, max length, reference weights, safety set
  or an example changed after precompute): `pact train --reference cached` refuses
  naming the change; `pact precompute` recomputes only what is affected; training
  then runs.
- Numerical faults: a loss that turns NaN stops training with one line and keeps the
  last good checkpoint; stored targets holding NaN are refused.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fault_harness import (
    DEFAULT_PRELOAD,
    OTHER_TEMPLATE,
    Fault,
    ForkServer,
    faults_in_process,
    model_variant,
    short_rows,
    stray_temporaries,
)
from safetensors.torch import load_file
from tiny import make_model, make_tokenizer
from train_fixtures import make_safety, write_jsonl

from pact.store import Store, TargetReader
from pact.trainer import checkpoint
from pact.trainer.batches import epoch_batches
from pact.trainer.config import TrainConfig
from pact.trainer.train import train

SEED = 20260307
KILL_TRIALS = 10
KILLS_PER_CHAIN = 2
NUM_EXAMPLES = 16
STEPS = 20  # batch 2: 8 batches per epoch, so the run crosses two epoch boundaries
MAX_LENGTH = 64
TRAIN_OPTIONS = {
    "--finetune": "lora",  # dropout 0.05: resuming must restore the RNG state
    "--max-steps": STEPS,
    "--batch-size": 2,
    "--lr": 1e-2,
    "--warmup-steps": 2,
    "--schedule": "cosine",
    "--save-every": 1,  # a checkpoint every step: many kills land inside a checkpoint write
    "--seed": 0,
    "--device": "cpu",
}


# ----------------------------------------------------------------------------- world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Reference model, 16 short examples, a store with a safety set (`server` precomputes it)."""
    root = tmp_path_factory.mktemp("reliability-train")
    tokenizer = make_tokenizer(root / "ref")
    make_model(root / "ref", len(tokenizer), seed=0)
    store = root / "store"
    make_safety(Store(store), len(tokenizer))
    return {
        "root": root,
        "ref": root / "ref",
        "vocab": len(tokenizer),
        "data": write_jsonl(root / "train.jsonl", short_rows(NUM_EXAMPLES, SEED)),
        "store": store,
        "env": {"PACT_CACHE_DIR": str(root / "hash-cache")},
    }


@pytest.fixture(scope="module")
def server(world):
    """The fork server; it first fills the world's store with the real `pact precompute`."""
    with ForkServer(world["root"] / "fork-logs", DEFAULT_PRELOAD + ("pact.trainer.train", "peft")) as forks:
        result = forks.run(precompute_args(world, world["store"]), env=world["env"])
        assert result.returncode == 0, result.stderr
        yield forks


def precompute_args(world, store: Path, model: Path | None = None, max_length: int = MAX_LENGTH) -> list:
    return [
        "precompute", "--reference", model or world["ref"], "--data", world["data"], "--store", store,
        "--device", "cpu", "--max-length", max_length, "--no-progress",
    ]  # fmt: skip


def train_args(world, out: Path, *extra, store: Path | None = None, model: Path | None = None, **changes) -> list:
    options = {**TRAIN_OPTIONS, **changes}
    flags = [str(x) for flag, value in options.items() for x in (flag, value)]
    return [
        "train", "--model", model or world["ref"], "--data", world["data"], "--store", store or world["store"],
        "--out", out, *flags, *extra,
    ]  # fmt: skip


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    table = pq.read_table(run / "metrics.parquet")
    return list(zip(table.column("step").to_pylist(), table.column("loss").to_pylist(), strict=True))


KEPT = [f"step-{STEPS - 1}", f"step-{STEPS}"]  # the newest two checkpoints stay


def leftovers(run: Path, store: Path) -> list[str]:
    """What a finished run should not hold: temporaries in RUN, in the store (of its own
    metrics table only: other runs share the store), and checkpoint directories other than
    the newest two."""
    found = [f"RUN/{p}" for p in stray_temporaries(run)]
    found += [
        f"STORE/{p}"
        for p in stray_temporaries(store)
        if not p.startswith("metrics/") or p.startswith(f"metrics/.tmp-{run.name}.parquet.")
    ]
    found += [f"RUN/checkpoints/{p.name}" for p in (run / "checkpoints").iterdir() if p.name not in KEPT]
    return sorted(set(found))


def assert_same_run(run: Path, whole: dict, store: Path) -> None:
    """`run` finished like the uninterrupted run: bitwise weights, each step's metrics once
    with the same values, the newest two checkpoints, no debris."""
    weights = final_weights(run)
    assert weights.keys() == whole["weights"].keys()
    for name, value in weights.items():
        assert torch.equal(value, whole["weights"][name]), name
    assert losses(run) == whole["losses"]
    assert pq.read_table(store / "metrics" / f"{run.name}.parquet").column("step").to_pylist() == list(
        range(1, STEPS + 1)
    )
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == KEPT
    assert leftovers(run, store) == []


@pytest.fixture(scope="module")
def whole(world, server):
    """The uninterrupted run: final weights, per-step losses, duration (s)."""
    run = world["root"] / "whole"
    result = server.run(train_args(world, run), env=world["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"weights": final_weights(run), "losses": losses(run), "seconds": result.elapsed}


def continue_args(world, run: Path) -> list:
    """What a user reruns after a crash: --resume once the run has started (RUN/config.json)."""
    resume = ("--resume",) if (run / "config.json").exists() else ()
    return train_args(world, run, *resume)


# ----------------------------------------------------------------------------- 2. SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_run(world, server, whole):
    """KILL_TRIALS SIGKILLs at seeded uniform moments of [0, one run's duration], in chains
    (a killed --resume is killed again), each chain finished by an uninterrupted --resume.
    A resumed run may finish before its kill moment: attempts go on until KILL_TRIALS runs
    were really killed. Where the moments land depends on the machine's speed (set-up can
    take most of a run): if fewer than 2 kills found a checkpoint, further moments are drawn
    from the second half of a run until 2 did (at most 4 x KILL_TRIALS attempts in all)."""
    rng = random.Random(SEED)
    killed = killed_with_checkpoint = kills_in_chain = 0
    chain = 0
    run = world["root"] / f"kill-chain-{chain}"

    def finish_chain(last_killed: bool) -> None:
        nonlocal chain, kills_in_chain, run
        if last_killed:
            rerun = server.run(continue_args(world, run), env=world["env"])
            assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert_same_run(run, whole, world["store"])
        chain, kills_in_chain = chain + 1, 0
        run = world["root"] / f"kill-chain-{chain}"

    for attempt in range(4 * KILL_TRIALS):
        if killed >= KILL_TRIALS and killed_with_checkpoint >= 2:
            break
        low = 0.0 if killed < KILL_TRIALS else 0.5
        moment = rng.uniform(low, 1.0) * whole["seconds"]
        result = server.run(continue_args(world, run), env=world["env"], kill_after=moment)
        assert result.killed or result.returncode == 0, f"attempt {attempt}: {result.stderr[-3000:]}"
        killed += result.killed
        kills_in_chain += result.killed
        killed_with_checkpoint += result.killed and checkpoint.latest_checkpoint(run) is not None
        for done in checkpoint.complete_checkpoints(run):  # every complete checkpoint reads
            assert load_file(str(done / checkpoint.WEIGHTS_FILE))
        if not result.killed or kills_in_chain == KILLS_PER_CHAIN:
            finish_chain(result.killed)
    if kills_in_chain:
        finish_chain(True)
    assert killed >= KILL_TRIALS
    assert killed_with_checkpoint >= 2, f"{killed_with_checkpoint} of {killed} kills found a checkpoint"


CHECKPOINT_KILLS = [
    # (where the kill lands; the fault, counted from the start of each resumed run)
    ("weights written into .tmp-step-N, the rest not",
     Fault("pact.trainer.checkpoint:save_file", nth=3, when="after")),
    ("optimizer state written, rng and state not",
     Fault("torch:save", match="optimizer.pt", nth=2, when="after")),
    ("complete .tmp-step-N, not renamed",
     Fault("os:replace", match=".tmp-step-", nth=2, when="before")),
    ("step-N renamed into place; older checkpoints not pruned, metrics not written",
     Fault("os:replace", match=".tmp-step-", nth=2, when="after")),
]  # fmt: skip


def test_sigkill_inside_checkpoint_writes_then_resume(world, server, whole):
    """One run killed in turn at each point of the checkpoint write, resumed after each."""
    run = world["root"] / "checkpoint-kills"
    expected_step = 0
    for what, fault in CHECKPOINT_KILLS:
        result = server.run(continue_args(world, run), env=world["env"], faults=[fault])
        assert result.killed, f"{what}: the fault did not fire ({result.returncode}) {result.stderr[-3000:]}"
        latest = checkpoint.latest_checkpoint(run)
        assert latest is not None and checkpoint.checkpoint_step(latest) > expected_step, what
        expected_step = checkpoint.checkpoint_step(latest)
    rerun = server.run(continue_args(world, run), env=world["env"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_run(run, whole, world["store"])


KILLS_THEN_RESUME = {
    # name: (the fault, what the killed run left: f(leftovers, complete checkpoints))
    "metrics-kill": (  # after writing the temporary of RUN/metrics.parquet, before renaming it
        Fault("os:replace", match=".tmp-metrics.parquet", nth=2, when="before"),
        lambda left, complete: any(item.startswith("RUN/.tmp-metrics.parquet.") for item in left),
    ),
    "prune-kill": (  # after deleting one file of the oldest checkpoint while pruning (keep 2)
        Fault("os:unlink", match="optimizer.pt", nth=1, when="after"),  # rmtree(step-1) at step 3
        lambda left, complete: complete == ["step-2", "step-3"],
    ),
}


@pytest.fixture(scope="module", params=sorted(KILLS_THEN_RESUME))
def kill_then_resume(request, world, server, whole):
    """A run killed by the fault KILLS_THEN_RESUME[name], what it left (files, complete
    checkpoints), then resumed: (run, killed, left, complete, resumed)."""
    run = world["root"] / request.param
    fault, _ = KILLS_THEN_RESUME[request.param]
    killed = server.run(continue_args(world, run), env=world["env"], faults=[fault])
    left = leftovers(run, world["store"])
    complete = [p.name for p in checkpoint.complete_checkpoints(run)]
    resumed = server.run(continue_args(world, run), env=world["env"])
    return run, killed, left, complete, resumed


def test_sigkill_while_writing_metrics_or_pruning_a_checkpoint_then_resume(kill_then_resume, world, whole):
    run, killed, left, complete, resumed = kill_then_resume
    _, left_as_expected = KILLS_THEN_RESUME[run.name]
    assert killed.killed and left_as_expected(left, complete), (left, complete)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run, whole, world["store"])


def test_no_half_written_file_or_checkpoint_left_after_resume(kill_then_resume, world):
    assert leftovers(kill_then_resume[0], world["store"]) == []


@pytest.fixture(scope="module")
def killed_before_first_checkpoint(world, server):
    """A run killed right after it wrote RUN/config.json, then the user's --resume."""
    run = world["root"] / "early-kill"
    fault = Fault("os:replace", match=f"{run.name}/.tmp-config.json", nth=1, when="after")
    killed = server.run(train_args(world, run), env=world["env"], faults=[fault])
    state = (killed, (run / "config.json").exists(), checkpoint.latest_checkpoint(run))
    resumed = server.run(train_args(world, run, "--resume"), env=world["env"])
    return run, state, resumed


def test_kill_before_the_first_checkpoint_leaves_only_the_run_config(killed_before_first_checkpoint):
    _, (killed, has_config, latest), _ = killed_before_first_checkpoint
    assert killed.killed and has_config and latest is None


def test_kill_before_the_first_checkpoint_then_resume(killed_before_first_checkpoint, world, whole):
    run, _, resumed = killed_before_first_checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run, whole, world["store"])


# ----------------------------------------------------------------------------- 3. ENOSPC


def train_config(world, out: Path, **changes) -> TrainConfig:
    options = dict(
        model=str(world["ref"]), data=str(world["data"]), store=str(world["store"]), out=str(out),
        finetune="lora", max_steps=STEPS, batch_size=2, lr=1e-2, warmup_steps=2, schedule="cosine",
        save_every=1, seed=0, device="cpu",
    )  # fmt: skip
    options.update(changes)
    return TrainConfig(**options)


def test_enospc_in_a_checkpoint_write_keeps_the_last_checkpoint(world, server, whole, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_DIR", world["env"]["PACT_CACHE_DIR"])
    run = world["root"] / "enospc"
    fault = Fault("pact.trainer.checkpoint:save_file", nth=3, when="after", action="enospc-half")
    with faults_in_process(fault), pytest.raises(OSError) as failure:
        train(train_config(world, run))
    assert failure.value.errno == errno.ENOSPC and "No space left on device" in str(failure.value)
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-1", "step-2"]
    assert stray_temporaries(run) == []  # the half-written .tmp-step-3 was removed
    resumed = server.run(train_args(world, run, "--resume"), env=world["env"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run, whole, world["store"])


# ----------------------------------------------------------------------------- 4. stale cache


def fresh_store(world, name: str) -> Path:
    target = world["root"] / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(world["store"], target)
    return target


def change_safety_set(world, store: Path) -> dict:
    make_safety(Store(store), world["vocab"], seed=1)  # `pact tokens` rerun
    return {}


def edit_one_example(world, store: Path) -> dict:
    rows = short_rows(NUM_EXAMPLES, SEED)
    rows[3]["completion"] = "Sure, here it is again."
    world["data"] = write_jsonl(world["root"] / "train-edited.jsonl", rows)
    return {}


STALE_CHANGES = {
    # name -> (make the change: returns train/precompute arguments, what train says, precompute summary)
    "tokenizer": (
        lambda w, s: {"model": model_variant(w["ref"], w["root"] / "ref-tokenizer", swap_tokens=True)},
        r"computed with another tokenizer \(fingerprint \w+ != \w+\); rerun pact precompute",
        f"{NUM_EXAMPLES} examples computed, 0 skipped",
    ),
    "chat template": (
        lambda w, s: {"model": model_variant(w["ref"], w["root"] / "ref-template", template=OTHER_TEMPLATE)},
        r"computed with another chat template \(fingerprint \w+ != \w+\); rerun pact precompute",
        f"{NUM_EXAMPLES} examples computed, 0 skipped",
    ),
    "reference weights": (
        lambda w, s: {"model": model_variant(w["ref"], w["root"] / "ref-weights", weights_seed=1)},
        r"is not the reference the store was built from \(model fingerprint \w+ != \w+",
        f"{NUM_EXAMPLES} examples computed, 0 skipped",
    ),
    "safety set": (
        change_safety_set,
        r"computed with another safety-token set \(fingerprint \w+ != \w+\); rerun pact precompute",
        f"{NUM_EXAMPLES} examples computed, 0 skipped",
    ),
    "max length": (
        lambda w, s: {"max_length": 24},
        r"--max-length 24 disagrees with the store's max_length 64",
        "stale recomputed",
    ),
    "one example": (
        edit_one_example,
        r"1 example was encoded differently than when its targets were computed \(token hash differs\), "
        r"first: ex-003 .*rerun pact precompute",
        f"1 examples computed, {NUM_EXAMPLES - 1} skipped (up to date), 1 stale recomputed",
    ),
}


@pytest.mark.parametrize("change", list(STALE_CHANGES))
def test_stale_cache_is_refused_then_precompute_updates_only_what_changed(change, world, server, monkeypatch):
    make_change, refusal, summary = STALE_CHANGES[change]
    store = fresh_store(world, f"stale-{change.replace(' ', '-')}")
    with monkeypatch.context() as patch:
        patch.setitem(world, "data", world["data"])  # edit_one_example swaps the data file
        changed = make_change(world, store)
        model, max_length = changed.get("model"), changed.get("max_length")
        length = ("--max-length", max_length) if max_length else ()
        out = world["root"] / f"stale-run-{change.replace(' ', '-')}"
        short = {"--max-steps": 1, "--save-every": 0}
        refused = server.run(train_args(world, out, *length, store=store, model=model, **short), env=world["env"])
        assert refused.returncode == 2, refused.stderr[-3000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and re.search(refusal, line), line
        assert not out.exists()  # refused before anything was written

        updated = server.run(precompute_args(world, store, model, max_length or MAX_LENGTH), env=world["env"])
        assert updated.returncode == 0, updated.stderr[-3000:]
        assert summary in updated.stdout, updated.stdout
        if change == "max length":
            cut = int(re.search(r"(\d+) stale recomputed", updated.stdout).group(1))
            assert 0 < cut < NUM_EXAMPLES and f"{cut} examples computed, {NUM_EXAMPLES - cut} skipped" in updated.stdout
        accepted = server.run(train_args(world, out, store=store, model=model, **short), env=world["env"])
        assert accepted.returncode == 0, accepted.stderr[-3000:]


# ----------------------------------------------------------------------------- 7. numerical faults


def test_loss_that_turns_nan_stops_with_one_line_and_keeps_the_last_good_checkpoint(world, server):
    run = world["root"] / "blowup"
    blowup = {"--lr": 1e30, "--finetune": "full", "--warmup-steps": 0, "--schedule": "constant"}
    result = server.run(train_args(world, run, **blowup), env=world["env"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = run / "checkpoints" / "step-1"
    assert re.fullmatch(
        r"error: the loss is nan at step 2 \(epoch 0, batch 1, examples [\w, -]+\); training stopped, "
        rf"the last checkpoint {re.escape(str(last))} is intact \(--resume continues from it\)",
        result.stderr.strip().splitlines()[-1],
    ), result.stderr[-3000:]
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-1"]
    assert all(torch.isfinite(t).all() for t in load_file(str(last / checkpoint.WEIGHTS_FILE)).values())
    assert [step for step, _ in losses(run)] == [1]
    assert stray_temporaries(run) == []


def corrupt_targets(store: Path, kind: str, example_id: str) -> None:
    """Write NaN into the stored log-probs of one example (targets) or of its response (post)."""
    manifest = json.loads((store / "manifest.json").read_text())
    if kind == "targets":
        key, value, column = "example_id", example_id, "full_logprobs"
    else:
        key, value, column = "response_hash", TargetReader(Store(store)).get(example_id).response_hash, "post_logprobs"
    for part in (p for p in manifest["parts"] if p["kind"] == kind):
        path = store / part["path"]
        table = pq.read_table(path)
        hit = np.asarray(table.column(key).to_pylist()) == value
        if not hit.any():
            continue
        values = np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)
        values[hit, 0] = np.nan
        flat = pa.array(values.reshape(-1), pa.float32())
        lists = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        table = table.set_column(table.schema.get_field_index(column), column, lists)
        pq.write_table(table, path)
        return
    raise AssertionError(f"no {kind} rows for {example_id}")


@pytest.fixture(scope="module")
def nan_target_runs(world, server):
    """`pact train` on stores where one example's full-context (or its response's post-only)
    targets hold a NaN; the example is in the last batch of the first epoch."""
    last_batch = epoch_batches(NUM_EXAMPLES, 2, 0, 0)[-1]
    example_id = short_rows(NUM_EXAMPLES, SEED)[last_batch[0]]["id"]
    runs = {}
    for kind in ("targets", "post"):
        store = fresh_store(world, f"nan-{kind}")
        corrupt_targets(store, kind, example_id)
        out = world["root"] / f"nan-run-{kind}"
        runs[kind] = (out, server.run(train_args(world, out, store=store), env=world["env"]))
    return example_id, runs


@pytest.mark.parametrize("kind", ["targets", "post"])
def test_nan_in_stored_targets_is_refused_with_one_line(kind, nan_target_runs):
    example_id, runs = nan_target_runs
    _, result = runs[kind]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # post-only targets belong to a response: the first example read that has it is named
    named = example_id if kind == "targets" else r"ex-\d+"
    assert re.fullmatch(rf"error: example {named}: stored targets contain NaN or inf \(corrupted part\?\); rerun pact precompute over the same data to recompute them", line)


def test_nan_in_stored_targets_is_refused_before_the_first_step(nan_target_runs):
    _, runs = nan_target_runs
    out, _ = runs["targets"]
    assert not (out / "checkpoints").exists()
