"""Scale-out under torchrun, on CPU with gloo and 2 processes: precompute shards, DDP and
FSDP training against a single process with the same global batch, resume across world
sizes, the targets memory budget, and docs/examples/slurm.sbatch as a 2-node job.

Launches go through `python -m torch.distributed.run --standalone` (a free port) with
OMP_NUM_THREADS=1, except the SLURM job's two torchrun agents, which meet through the
c10d rendezvous. Training launches share one torchrun process group (a script that
runs several trainings), so the suite pays the start-up of 2 processes five times
(two precompute launches, the training script, the SLURM job's two stages).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from launch import LAUNCH_TIMEOUT_S, launch_env, torchrun
from paths import DOCS
from safetensors.torch import load_file
from train_fixtures import World, build_world, data_rows, make_safety, write_jsonl

from pact.core import distributed
from pact.core.distributed import Ranks
from pact.core.errors import PactError
from pact.pipeline.commands.precompute import precompute_command
from pact.pipeline.precompute import (
    PrecomputeOptions,
    PrecomputeSummary,
    Shard,
    missing_examples,
    run_precompute,
    shard_of,
    torchrun_defaults,
)
from pact.store.manifest import Store
from pact.store.sql import query
from pact.store.targets import TargetReader
from pact.trainer import checkpoint
from pact.trainer.batches import epoch_batches, rank_share
from pact.trainer.config import TrainConfig
from pact.trainer.train import TrainResult, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_process_hash_cache")]
FP_TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- helpers


def store_contents(store_dir: Path) -> dict[str, tuple]:
    """example_id -> (token_hash, token ids, token logprobs, entropy, full, post)."""
    reader = TargetReader(Store(store_dir))
    out = {}
    for example_id in reader.example_ids():
        t = reader.get(example_id)
        out[example_id] = (t.token_hash, t.token_ids, t.token_logprobs, t.entropy, t.full_logprobs, t.post_logprobs)
    return out


def assert_same_contents(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][0] == b[key][0], key
        np.testing.assert_array_equal(a[key][1], b[key][1])
        for x, y in zip(a[key][2:], b[key][2:], strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run_dir / "model" / "model.safetensors"))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0.0, msg=name)


def metrics_of(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def assert_same_curves(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "ce", "kl", "gate_mean", "grad_norm", "lr"):
            if x[key] is None:
                assert y[key] is None, key
            else:
                assert x[key] == pytest.approx(y[key], abs=FP_TOLERANCE), (x["step"], key)
        assert x["epoch"] == y["epoch"]


def resumable_copy(run_dir: Path, target: Path, step: int) -> Path:
    """A copy of a finished run holding only its checkpoints up to `step` (what a run
    killed after that checkpoint leaves)."""
    shutil.copytree(run_dir, target)
    for path in checkpoint.complete_checkpoints(target):
        if checkpoint.checkpoint_step(path) > step:
            shutil.rmtree(path)
    for output in ("model", "adapter"):
        shutil.rmtree(target / output, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Tiny model + 10 examples + a store with their targets; `nine.jsonl` holds 9 of them,
    so a global micro-batch of 2 leaves one example for the last micro-batch (rank 1 idle)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PACT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hash-cache"))
        built = build_world(tmp_path_factory.mktemp("world"))
        write_jsonl(built.root / "nine.jsonl", data_rows()[:9])
        yield built


def config_for(world: World, out: Path, **overrides: object) -> TrainConfig:
    """Full fine-tuning, 4 optimizer steps over 9 examples (3 steps per epoch at a global
    batch of 2 x 2 micro-batches: the run crosses an epoch boundary), checkpoints at 2 and 4."""
    values: dict[str, object] = dict(
        model=str(world.model_dir), data=str(world.root / "nine.jsonl"), store=str(world.store_dir),
        out=str(out), finetune="full", batch_size=2, grad_accum=2, max_steps=4, lr=1e-2,
        save_every=2, device="cpu",
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- the training launch

SCENARIOS = textwrap.dedent(
    """
    import importlib, json, sys
    from pact.pipeline.cli import cli
    from pact.core.errors import PactError
    from pact.core import distributed
    from pact.trainer.train import train
    from pact.trainer.config import TrainConfig

    spec = json.loads(open(sys.argv[1]).read())
    steps = importlib.import_module("pact.trainer.steps")
    real_loss = steps.batch_loss


    def poisoned_loss(model, batch, **options):
        terms = real_loss(model, batch, **options)
        if spec["poisoned"] in batch.example_ids:
            terms.loss = terms.loss * float("nan")
        return terms


    with distributed.process_group("cpu") as ranks:
        cli.main(args=spec["cli"], standalone_mode=False)
        for values in spec["configs"]:
            train(TrainConfig(**values))
        for name in ("changed", "nan"):
            if name == "nan":
                steps.batch_loss = poisoned_loss
            try:
                train(TrainConfig(**spec[name]))
            except PactError as exc:
                open(spec["stopped"].format(name=name, rank=ranks.rank), "w").write(str(exc))
    """
)


@dataclass
class Runs:
    single_full: TrainResult
    single_lora: TrainResult
    launch: subprocess.CompletedProcess
    root: Path

    def out(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def runs(world: World, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Single-process baselines (global batch 2 per micro-batch) and one 2-rank launch
    (batch 1 per rank) that trains: DDP full via `pact train`, DDP LoRA (cached and
    online reference), FSDP full, FSDP resuming the single-process run's step-2
    checkpoint, then a run whose data fails the token-hash check on rank 1 only and one
    whose loss turns NaN on rank 1."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PACT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hash-cache"))
        single_full = train(config_for(world, root / "single-full"))
        single_lora = train(config_for(world, root / "single-lora", finetune="lora", lora_dropout=0.0))
    resumable_copy(single_full.run_dir, root / "fsdp-resumed", step=2)
    rows = data_rows()[:9]
    rows[1] = dict(rows[1], completion="A different answer, so another token hash.")
    changed = write_jsonl(root / "changed.jsonl", rows)

    def per_rank(name: str, **overrides: object) -> dict:
        values = config_for(world, root / name, batch_size=1, **overrides).__dict__.copy()
        values.pop("pact")
        return values

    cli_args = [
        "train", "--model", str(world.model_dir), "--data", str(world.root / "nine.jsonl"),
        "--store", str(world.store_dir), "--out", str(root / "ddp-full"), "--finetune", "full",
        "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4", "--lr", "0.01",
        "--save-every", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    spec = {
        "cli": [a for a in cli_args if a != "--no-progress"],
        "configs": [
            per_rank("ddp-lora", finetune="lora", lora_dropout=0.0),
            per_rank("ddp-lora-online", finetune="lora", lora_dropout=0.0, reference="online", save_every=0),
            per_rank("fsdp-full", fsdp=True),
            per_rank("fsdp-resumed", fsdp=True, resume=True),
        ],
        "changed": per_rank("changed", data=str(changed)),
        "nan": per_rank("nan", save_every=1),
        "poisoned": "ex-5",
        "stopped": str(root / "{name}-stopped-rank{rank}.txt"),
    }
    script = root / "script"
    script.mkdir()
    (script / "spec.json").write_text(json.dumps(spec))
    (script / "scenarios.py").write_text(SCENARIOS)
    launch = torchrun(root, str(script / "scenarios.py"), str(script / "spec.json"))
    assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-4000:]
    return Runs(single_full, single_lora, launch, root)


def test_ddp_full_finetuning_matches_one_process_with_the_same_global_batch(runs: Runs) -> None:
    assert_same_curves(metrics_of(runs.out("ddp-full")), runs.single_full.metrics)
    assert_close_weights(weights_of(runs.out("ddp-full")), weights_of(runs.single_full.run_dir), atol=FP_TOLERANCE)
    assert metrics_of(runs.out("ddp-full"))[2]["epoch"] == 0 and metrics_of(runs.out("ddp-full"))[3]["epoch"] == 1


def test_ddp_lora_matches_one_process(runs: Runs) -> None:
    assert_same_curves(metrics_of(runs.out("ddp-lora")), runs.single_lora.metrics)
    assert_close_weights(weights_of(runs.out("ddp-lora")), weights_of(runs.single_lora.run_dir), atol=FP_TOLERANCE)


def test_ddp_with_an_online_reference_matches_one_process_with_cached_targets(runs: Runs) -> None:
    """LoRA: each rank's reference is its own model with the adapters disabled, outside DDP."""
    assert_same_curves(metrics_of(runs.out("ddp-lora-online")), runs.single_lora.metrics)
    assert_close_weights(
        weights_of(runs.out("ddp-lora-online")), weights_of(runs.single_lora.run_dir), atol=FP_TOLERANCE
    )


def test_fsdp_matches_one_process(runs: Runs) -> None:
    assert_same_curves(metrics_of(runs.out("fsdp-full")), runs.single_full.metrics)
    assert_close_weights(weights_of(runs.out("fsdp-full")), weights_of(runs.single_full.run_dir), atol=FP_TOLERANCE)
    # the checkpoint holds full weights and an index-keyed optimizer state, as one process writes them
    sharded = runs.out("fsdp-full") / "checkpoints" / "step-2"
    single = runs.single_full.run_dir / "checkpoints" / "step-2"
    assert_close_weights(
        load_file(str(sharded / checkpoint.WEIGHTS_FILE)), load_file(str(single / checkpoint.WEIGHTS_FILE)), atol=FP_TOLERANCE
    )
    ours, theirs = (torch.load(p / "optimizer.pt", weights_only=True) for p in (sharded, single))
    assert ours["param_groups"] == theirs["param_groups"]
    assert sorted(ours["state"]) == sorted(theirs["state"])


def test_rank0_alone_writes_outputs_and_metrics(runs: Runs, world: World) -> None:
    run = runs.out("ddp-full")
    record = json.loads((run / "config.json").read_text())
    assert record["world_size"] == 2 and record["options"]["batch_size"] == 1
    assert record["steps_per_epoch"] == 3  # ceil(ceil(9 / (1 x 2 ranks)) / 2 micro-batches)
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-2", "step-4"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "metrics.parquet", "model"]
    _, rows = query(Store(world.store_dir), "select step from metrics where run_id = 'ddp-full' order by step")
    assert rows == [(1,), (2,), (3,), (4,)]
    # `pact train` printed its report once (rank 0)
    assert runs.launch.stdout.count(f"run: {run} (run_id ddp-full)") == 1


def test_a_failed_check_on_one_rank_stops_every_rank(runs: Runs) -> None:
    """The changed example sits at index 1: rank 1 checks it; both ranks raise its error."""
    messages = {(runs.root / f"changed-stopped-rank{rank}.txt").read_text() for rank in (0, 1)}
    assert len(messages) == 1
    assert messages.pop().startswith(
        "rank 1: 1 example was encoded differently than when its targets were computed (token hash differs), first: ex-1"
    )
    assert not (runs.out("changed") / "config.json").exists()


def test_a_nan_loss_on_one_rank_stops_every_rank_before_the_step(runs: Runs, world: World) -> None:
    """ex-5 poisons the loss on the rank that reads it (rank 1: only it knows where);
    both ranks stop before the optimizer step with the same message, the checkpoint of
    the step before intact."""
    batches = epoch_batches(9, 2, seed=0, epoch=0)  # global micro-batches of 2 examples
    micro_batch = next(k for k, batch in enumerate(batches) if 5 in batch)
    assert rank_share(batches[micro_batch], 1, 2) == [5]
    step = micro_batch // 2 + 1  # 2 micro-batches per optimizer step
    assert step > 1
    last = runs.out("nan") / "checkpoints" / f"step-{step - 1}"
    messages = {(runs.root / f"nan-stopped-rank{rank}.txt").read_text() for rank in (0, 1)}
    assert messages == {
        f"the loss is nan at step {step} (epoch 0, batch {micro_batch}, examples ex-5); training stopped, "
        f"the last checkpoint {last} is intact (--resume continues from it)"
    }
    assert [m["step"] for m in metrics_of(runs.out("nan"))] == list(range(1, step))
    assert checkpoint.latest_checkpoint(runs.out("nan")) == last


@pytest.mark.parametrize("launched", ["ddp-full", "fsdp-full"])
def test_resume_on_one_process_from_a_two_rank_checkpoint(
    runs: Runs, world: World, tmp_path: Path, launched: str
) -> None:
    """Killed after step 2 on 2 ranks (batch 1 each), resumed in one process with batch 2."""
    copy = resumable_copy(runs.out(launched), tmp_path / "resumed", step=2)
    with pytest.raises(PactError, match=(
        r"--resume: step-2 was trained with 2 rank\(s\) x --batch-size 1 examples per micro-batch, "
        r"this run has 1 x 1; keep the global micro-batch: pass --batch-size 2"
    )):  # fmt: skip
        train(config_for(world, copy, batch_size=1, resume=True))
    resumed = train(config_for(world, copy, resume=True))
    assert resumed.steps == 4
    assert_close_weights(weights_of(copy), weights_of(runs.single_full.run_dir), atol=FP_TOLERANCE)
    assert_same_curves(resumed.metrics, runs.single_full.metrics)


def test_fsdp_resumes_a_one_process_checkpoint(runs: Runs) -> None:
    resumed = runs.out("fsdp-resumed")
    assert_close_weights(weights_of(resumed), weights_of(runs.single_full.run_dir), atol=FP_TOLERANCE)
    assert_same_curves(metrics_of(resumed), runs.single_full.metrics)
    assert json.loads((resumed / "config.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- targets beyond RAM


class _RecordingReader(TargetReader):
    """A TargetReader that records its cache's largest size and the largest row group."""

    instances: list[_RecordingReader] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.peak_bytes = 0
        self.largest_group = 0
        self.groups_read = 0
        _RecordingReader.instances.append(self)

    def _group(self, kind: str, part: int, group: int):  # noqa: ANN202 - the parent's signature
        cached = (kind, part, group) in self._groups
        table = super()._group(kind, part, group)
        self.groups_read += 0 if cached else 1
        self.largest_group = max(self.largest_group, table.nbytes)
        self.peak_bytes = max(self.peak_bytes, self._cached_bytes)
        return table


def test_targets_memory_budget_below_the_cache_trains_the_same(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pact.trainer.inputs.TargetReader", _RecordingReader)  # prepare_inputs reads the targets
    _RecordingReader.instances = []
    roomy = train(config_for(world, tmp_path / "roomy", finetune="lora", save_every=0))
    tight = train(config_for(world, tmp_path / "tight", finetune="lora", save_every=0, targets_memory_mb=1e-4))
    unlimited, bounded = _RecordingReader.instances
    whole_cache = unlimited.peak_bytes  # every row group the run read, never evicted
    budget = int(1e-4 * 2**20)
    assert budget < unlimited.largest_group < whole_cache
    assert bounded.peak_bytes <= max(budget, bounded.largest_group) < whole_cache
    assert bounded.groups_read > unlimited.groups_read  # evicted groups were read again
    assert_close_weights(weights_of(tight.run_dir), weights_of(roomy.run_dir), atol=0.0)
    assert [m["loss"] for m in tight.metrics] == [m["loss"] for m in roomy.metrics]


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"targets_memory_mb": 0}, r"--targets-memory-mb must be a finite number > 0, got 0"),
        ({"fsdp": True, "finetune": "lora"}, r"--fsdp supports full fine-tuning only \(pact does not save or merge the adapters"),
        ({"fsdp": True, "reference": "online"}, r"--fsdp needs --reference cached"),
        ({"fsdp": True}, r"--fsdp shards the model over the processes of a torchrun launch; this is a single process"),
    ],
)
def test_distributed_options_refused(world: World, tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(PactError, match=message):
        train(config_for(world, tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_rank_share_cuts_each_global_micro_batch_into_contiguous_runs() -> None:
    for batch in epoch_batches(9, 4, seed=0, epoch=0):
        shares = [rank_share(batch, rank, 3) for rank in range(3)]
        assert sum(shares, []) == batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [rank_share([7], rank, 2) for rank in range(2)] == [[7], []]
    assert [rank_share([1, 2, 3, 4], rank, 2) for rank in range(2)] == [[1, 2], [3, 4]]


def test_launch_ranks_reads_the_torchrun_environment() -> None:
    assert distributed.launch_ranks({}) == Ranks()
    assert distributed.launch_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    assert not Ranks().enabled and Ranks(1, 2).enabled and not Ranks(1, 2).is_main
    with pytest.raises(PactError, match=r"WORLD_SIZE is set but RANK is not: launch with torchrun"):
        distributed.launch_ranks({"WORLD_SIZE": "2"})
    with pytest.raises(PactError, match=r"RANK=2 WORLD_SIZE=2: need WORLD_SIZE >= 1 and RANK < WORLD_SIZE"):
        distributed.launch_ranks({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(PactError, match=r"environment variable WORLD_SIZE='two' is not a non-negative integer"):
        distributed.launch_ranks({"RANK": "0", "WORLD_SIZE": "two"})
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:1") == "nccl"
    assert distributed.rank_device("cpu", Ranks(1, 2, 1)) == "cpu"


def test_cli_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from pact.pipeline.commands import train as command_module

    captured = {}

    def fake_train(config: TrainConfig) -> TrainResult:
        captured["config"] = config
        return TrainResult(Path(config.out), "r", 0, [], None, None)

    monkeypatch.setattr(command_module, "train", fake_train)
    args = ["--model", "M", "--data", "D", "--out", "RUN", "--store", "S", "--finetune", "full", "--targets-memory-mb", "64", "--fsdp"]
    result = CliRunner().invoke(command_module.train_command, args)
    assert result.exit_code == 0, result.output
    assert captured["config"] == TrainConfig(
        model="M", data="D", out="RUN", store="S", finetune="full", targets_memory_mb=64.0, fsdp=True
    )
    assert "--targets-memory-mb" in CliRunner().invoke(command_module.train_command, ["--help"]).output
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert torchrun_defaults(None, "cuda", env)[1] == ("cuda:1" if torch.cuda.is_available() else "cuda")


def test_a_device_that_cannot_serve_the_rank_is_refused_before_any_group() -> None:
    problem = distributed.rank_device_problem
    assert problem("cuda:3", Ranks(0, 1, 0), cuda_devices=0) is None  # one process: not this check's business
    for device in ("cpu", "auto"):
        assert problem(device, Ranks(1, 2, 1), cuda_devices=0) is None  # gloo
    assert problem("auto", Ranks(1, 2, 1), cuda_devices=2) is None
    assert problem("cuda:1", Ranks(3, 4, 1), cuda_devices=2) is None  # the rank's own GPU, named
    assert problem("cuda:0", Ranks(1, 2, 1), cuda_devices=2) == (
        "--device cuda:0 under torchrun (rank 1 of 2, LOCAL_RANK=1): the ranks would share that one GPU; "
        "pass --device cuda (each rank takes cuda:LOCAL_RANK)"
    )
    assert problem("cuda", Ranks(1, 2, 1), cuda_devices=0) == (
        "--device cuda under torchrun (rank 1 of 2), but this node has no CUDA device: use --device cpu (gloo)"
    )
    for device in ("cuda", "auto", "cuda:2"):
        assert problem(device, Ranks(2, 4, 2), cuda_devices=2) == (
            "rank 2 of 4 has LOCAL_RANK=2, but this node has 2 CUDA device(s): "
            "start at most 2 processes per node (--nproc_per_node 2)"
        ), device
    if not torch.cuda.is_available():  # this machine: the check runs before any process group exists
        environ = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
        with pytest.raises(PactError, match=r"^--device cuda under torchrun \(rank 1 of 2\), but this node has no CUDA"):
            with distributed.process_group("cuda", environ):
                pass
        assert not torch.distributed.is_initialized()


def test_single_process_helpers_are_the_identity() -> None:
    with distributed.process_group("cpu", {}) as ranks:
        assert ranks == Ranks()
        assert distributed.all_reduce([1.5, 2.0]) == [1.5, 2.0]
        assert distributed.all_gather_objects("x") == ["x"]
        assert distributed.on_main(lambda: 7) == 7
        distributed.agree(None)
        with pytest.raises(PactError, match="^boom$"):
            distributed.agree(PactError("boom"))


# ----------------------------------------------------------------------------- precompute


def precompute_args(world: World, store: Path) -> list[str]:
    return [
        "--reference", str(world.model_dir), "--data", str(world.data), "--store", str(store),
        "--max-length", "64", "--batch-size", "3", "--part-size", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def fresh_store(world: World, path: Path) -> Path:
    """A store holding only the world's safety set (what `pact tokens` leaves)."""
    make_safety(Store(path), int(world.safety.vocab_size))
    return path


def one_rank_store(world: World, path: Path, options: PrecomputeOptions | None = None) -> Path:
    """A one-process precompute of the world's data; by default with `precompute_args`'s options."""
    store = fresh_store(world, path)
    options = options or PrecomputeOptions(max_length=64, batch_size=3, examples_per_part=2, device="cpu", progress=False)
    run_precompute(world.model_dir, world.data, store, options, echo=lambda _: None)
    return store


def test_precompute_on_two_ranks_equals_one_rank(world: World, tmp_path: Path) -> None:
    single = one_rank_store(world, tmp_path / "single")
    sharded = fresh_store(world, tmp_path / "sharded")
    launch = torchrun(tmp_path, "-m", "pact", "precompute", *precompute_args(world, sharded))
    assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-4000:]
    owned = [sum(shard_of(r["id"], 2) == k for r in data_rows()) for k in (0, 1)]
    assert launch.stdout.count("precompute (2 ranks") == 1  # rank 0 prints the merged summary
    assert f"computed per rank: {owned[0]} + {owned[1]}): 10 examples computed, 0 skipped" in launch.stdout
    assert_same_contents(store_contents(sharded), store_contents(single))
    names = [p["path"] for p in Store(sharded).read_manifest()["parts"]]
    assert {n.split("-")[1] for n in names} == {"s0of2", "s1of2"}


def test_precompute_rerun_after_a_rank_died_computes_only_its_missing_slice(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 finished its shard; rank 1 died after registering one part (one batch: a
    part holds whole batches). A 2-rank rerun computes nothing on rank 0 and the rest of
    shard 1 on rank 1."""
    from pact.pipeline.precompute import run as precompute_run

    single = one_rank_store(world, tmp_path / "single")
    store = fresh_store(world, tmp_path / "store")
    base = dict(max_length=64, batch_size=3, device="cpu", progress=False)
    run_precompute(world.model_dir, world.data, store, PrecomputeOptions(**base, shard=Shard(0, 2)))

    class DiesAfterOnePart(precompute_run.TargetWriter):
        def flush(self) -> None:
            super().flush()
            if self.parts_written:
                raise RuntimeError("rank 1 died")

    monkeypatch.setattr(precompute_run, "TargetWriter", DiesAfterOnePart)
    with pytest.raises(RuntimeError, match="rank 1 died"):
        run_precompute(
            world.model_dir, world.data, store,
            PrecomputeOptions(**base, shard=Shard(1, 2), examples_per_part=1),
        )  # fmt: skip
    monkeypatch.undo()
    owned = [sum(shard_of(r["id"], 2) == k for r in data_rows()) for k in (0, 1)]
    done = len(TargetReader(Store(store))) - owned[0]  # rank 1's first part: its first batch
    assert 0 < done <= 3 and done < owned[1]

    launch = torchrun(tmp_path, "-m", "pact", "precompute", *precompute_args(world, store))
    assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-4000:]
    left = owned[1] - done
    assert f"computed per rank: 0 + {left}): {left} examples computed, {owned[0] + done} skipped" in launch.stdout
    assert_same_contents(store_contents(store), store_contents(single))


def test_precompute_shard_flag_is_refused_under_torchrun(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    store = fresh_store(world, tmp_path / "store")
    result = CliRunner().invoke(precompute_command, [*precompute_args(world, store), "--shard", "0/2"])
    assert isinstance(result.exception, PactError)
    assert str(result.exception) == (
        "--shard 0/2 under torchrun (WORLD_SIZE=2): each rank already computes shard "
        "RANK/WORLD_SIZE; drop --shard, or run without torchrun"
    )


def test_missing_examples_and_merged_summary(world: World) -> None:
    assert missing_examples(Store(world.store_dir), ["ex-0", "nope", "ex-9", "gone"]) == ["nope", "gone"]
    ranks = [
        PrecomputeSummary(examples=4, computed=4, response_tokens=40, parts_written=2, seconds=3.0),
        PrecomputeSummary(examples=6, computed=5, skipped=1, response_tokens=50, parts_written=3, seconds=5.0,
                          reference_reset=True, dropped=["row 3: bad"]),
    ]  # fmt: skip
    merged = PrecomputeSummary.merge(ranks)
    assert (merged.examples, merged.computed, merged.skipped, merged.parts_written) == (10, 9, 1, 5)
    assert (merged.seconds, merged.reference_reset, merged.dropped) == (5.0, True, ["row 3: bad"])
    assert merged.line().startswith(
        "precompute (2 ranks, computed per rank: 4 + 5): 9 examples computed, 1 skipped (up to date), 1 invalid dropped;"
    )
    assert PrecomputeSummary(computed=3).line().startswith("precompute: 3 examples computed")


# ----------------------------------------------------------------------------- several nodes (SLURM)


SLURM_EXAMPLE = DOCS / "examples" / "slurm.sbatch"

SRUN = """#!/bin/bash
# srun of a job with SLURM_NNODES nodes, all on this machine: the command once per node,
# in parallel; fails when one of them fails.
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""

SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || { echo "scontrol: only 'show hostnames' here" >&2; exit 2; }
echo 127.0.0.1
"""


PACT_REPORTING_THREADS = """
import os, sys
import torch.distributed as dist
from pact.pipeline.cli import main


def report(when):  # gloo's worker threads still running (docs/distributed.md, "Shutdown")
    left = sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop" for t in os.listdir("/proc/self/task"))
    with open(os.environ["GLOO_THREADS_REPORT"], "a") as out:
        out.write(f"{sys.argv[1]} rank {os.environ['RANK']} {when}: {left}\\n")


destroy = dist.destroy_process_group


def destroy_and_report(*args, **kwargs):
    destroy(*args, **kwargs)
    report("after destroy_process_group")


dist.destroy_process_group = destroy_and_report
try:
    main()
finally:
    report("at exit")
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_on_this_machine(bin_dir: Path) -> Path:
    """`srun` and `scontrol` standing in for a SLURM allocation whose nodes are all this
    machine; `torchrun` and `pact` of the interpreter under test (`pact` also reports the
    gloo worker threads left when the command is done)."""
    bin_dir.mkdir()
    scripts = {
        "srun": SRUN,
        "scontrol": SCONTROL,
        "torchrun": f'#!/bin/bash\nexec "{sys.executable}" -m torch.distributed.run "$@"\n',
        "pact": f'#!/bin/bash\nexec "{sys.executable}" "{bin_dir / "pact_threads.py"}" "$@"\n',
        "pact_threads.py": PACT_REPORTING_THREADS,
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_example_precomputes_and_trains_on_two_nodes(world: World, tmp_path: Path) -> None:
    """docs/examples/slurm.sbatch as a 2-node job (one process per node, the c10d
    rendezvous on 127.0.0.1): the store equals a one-process precompute, the DDP training
    equals one process with the same global batch (2 x 4 examples), and no command leaves
    gloo's worker threads running into interpreter shutdown (where they could abort it)."""
    single = one_rank_store(world, tmp_path / "single", PrecomputeOptions(device="cpu", progress=False))  # CLI defaults
    store = fresh_store(world, tmp_path / "store")
    bin_dir = slurm_on_this_machine(tmp_path / "bin")
    env = launch_env(tmp_path)
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": "1", "RDZV_PORT": str(free_port()),
        "MODEL": str(world.model_dir), "DATA": str(world.data), "STORE": str(store), "OUT": str(tmp_path / "run"),
        "GLOO_THREADS_REPORT": str(tmp_path / "gloo-threads.txt"),
    }  # fmt: skip
    (tmp_path / "launch").mkdir()
    job = subprocess.run(
        ["bash", str(SLURM_EXAMPLE)], capture_output=True, text=True, timeout=2 * LAUNCH_TIMEOUT_S,
        env=env, cwd=tmp_path / "launch",
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
    assert job.stdout.count("precompute (2 ranks") == 1
    assert_same_contents(store_contents(store), store_contents(single))

    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (record["world_size"], record["options"]["batch_size"]) == (2, 4)
    one = train(TrainConfig(
        model=str(world.model_dir), data=str(world.data), store=str(store), out=str(tmp_path / "one"),
        finetune="full", batch_size=8, device="cpu",
    ))  # fmt: skip
    assert len(one.metrics) == 2  # 10 examples, global batch 8: two steps
    assert_same_curves(metrics_of(tmp_path / "run"), one.metrics)
    assert_close_weights(weights_of(tmp_path / "run"), weights_of(one.run_dir), atol=FP_TOLERANCE)
    reports = sorted((tmp_path / "gloo-threads.txt").read_text().splitlines())
    assert reports == sorted(
        f"{command} rank {rank} {when}: 0"
        for command in ("precompute", "train") for rank in (0, 1) for when in ("after destroy_process_group", "at exit")
    )  # fmt: skip


FAILING_WITH_A_DDP_MODEL = """
import os
import sys
import torch
import torch.distributed as dist
from pact.core import distributed
from pact.core.errors import PactError


def gloo_threads():
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop" for t in os.listdir("/proc/self/task"))


destroy = dist.destroy_process_group


def report(line):
    with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.txt", "a") as out:
        out.write(line + "\\n")


def destroy_and_count():
    destroy()
    report(f"{gloo_threads()} gloo threads after destroy_process_group")


dist.destroy_process_group = destroy_and_count


def fail_while_holding_a_ddp_model():
    model = distributed.wrap_model(torch.nn.Linear(4, 4), distributed.current_ranks(), "cpu", fsdp=False)
    model(torch.ones(2, 4)).sum().backward()
    distributed.all_gather_objects("the last collective")
    raise PactError("stopped while the DDP model was alive")


try:
    with distributed.process_group("cpu"):
        fail_while_holding_a_ddp_model()
except PactError as exc:
    report(str(exc))
"""


def test_a_failed_block_frees_its_ddp_model_before_the_group_is_destroyed(tmp_path: Path) -> None:
    """The frames of a block that raised hold its DDP model, whose reducer holds the
    group: were it freed after destroy_process_group, it would join gloo's threads
    while holding the GIL, which a thread still releasing the last collective's tensors
    waits for (a deadlock seen under load). So the group goes with destroy_process_group."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_WITH_A_DDP_MODEL)
    launch = torchrun(tmp_path, str(script), str(tmp_path))
    assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == [
            "0 gloo threads after destroy_process_group", "stopped while the DDP model was alive",
        ]  # fmt: skip


def test_an_fsdp_run_leaves_no_gloo_thread_behind(world: World, tmp_path: Path) -> None:
    """`pact train --fsdp` on 2 ranks: FSDP's device mesh keeps the group in a registry
    of its own and outlives the model (DTensor's caches hold it), so pact empties it
    before destroying the group; else gloo's threads run on into interpreter shutdown."""
    bin_dir = slurm_on_this_machine(tmp_path / "bin")
    report = tmp_path / "gloo-threads.txt"
    command = [
        str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(bin_dir / "pact"),
        "train", "--model", str(world.model_dir), "--data", str(world.data), "--store", str(world.store_dir),
        "--out", str(tmp_path / "run"), "--finetune", "full", "--batch-size", "2", "--max-steps", "1",
        "--fsdp", "--device", "cpu",
    ]  # fmt: skip
    (tmp_path / "launch").mkdir()
    job = subprocess.run(
        command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
        env=launch_env(tmp_path) | {"GLOO_THREADS_REPORT": str(report)}, cwd=tmp_path / "launch",
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
    assert sorted(report.read_text().splitlines()) == sorted(
        f"train rank {rank} {when}: 0" for rank in (0, 1) for when in ("after destroy_process_group", "at exit")
    )
