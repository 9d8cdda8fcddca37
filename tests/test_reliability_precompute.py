"""Reliability of `pact precompute` under faults (docs/reliability.md, "Faults").

- SIGKILL at seeded random moments of real CLI runs, then a rerun: every example
  exactly once, values bitwise equal to an uninterrupted run (parts of whole
  batches; else equal to float32 rounding), no temporary left.
- SIGKILL at chosen points of the write path (temporary written, part renamed but
  not registered, manifest temporary written, stale-part rewrite half done).
- ENOSPC part-way through a write: the store stays valid, the error is clear, a
  rerun completes.
- A stale cache (tokenizer, chat template, max length, reference weights, safety
  set changed): precompute recomputes only what the change affects.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from fault_harness import (
    OTHER_TEMPLATE,
    Fault,
    ForkServer,
    faults_in_process,
    model_variant,
    read_all_targets,
    registered_rows,
    short_rows,
    stray_temporaries,
    unregistered_parts,
)
from tiny import make_model, make_tokenizer
from train_fixtures import make_safety, write_jsonl

from pact.core.data import load_examples
from pact.core.encoding import EncodingOptions, encode_example
from pact.core.models import load_tokenizer
from pact.pipeline.precompute import PrecomputeOptions, run_precompute
from pact.store import Store

SEED = 20260307
KILL_TRIALS = 20
KILLS_PER_CHAIN = 4  # a chain: kill, kill (a killed rerun), ..., then an uninterrupted rerun
NUM_EXAMPLES = 240
BATCH_SIZE = 8
# Parts of one batch, and parts of 5 (not a multiple of the batch): a part is closed at
# the end of a batch (`pact.pipeline.precompute.part_starts`), so a killed run has registered
# whole batches, the rerun forms the same batches, and its values are bitwise equal to an
# uninterrupted run's either way.
ALIGNED_PART_SIZE = 8
PART_SIZE = 5
# A rerun that recomputes only some examples (stale ones) batches them differently from a
# clean run: equal to float32 rounding (a few ulp seen).
ROUNDING = 1e-6
MANIFEST_TEMPORARY = ".tmp-manifest.json."
MAX_LENGTH = 64


# ----------------------------------------------------------------------------- world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Reference model dir (tiny Llama + tokenizer), data files, an empty store template."""
    root = tmp_path_factory.mktemp("reliability-precompute")
    tokenizer = make_tokenizer(root / "ref")
    vocab = len(tokenizer)
    make_model(root / "ref", vocab, seed=0)
    template = Store(root / "template")
    make_safety(template, vocab)
    rows = short_rows(NUM_EXAMPLES, SEED)
    return {
        "root": root,
        "ref": root / "ref",
        "vocab": vocab,
        "template": template.root,
        "data": write_jsonl(root / "train.jsonl", rows),
        "small": write_jsonl(root / "small.jsonl", rows[:40]),
        "env": {"PACT_CACHE_DIR": str(root / "hash-cache")},
    }


@pytest.fixture(scope="module")
def server(world):
    with ForkServer(world["root"] / "fork-logs") as forks:
        yield forks


def fresh_store(world, name: str) -> Store:
    """A copy of the template: a store holding only the safety-token set."""
    target = world["root"] / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(world["template"], target)
    return Store(target)


def cli_args(
    world, store: Store, data: Path | None = None, max_length: int = MAX_LENGTH, part_size: int = PART_SIZE
) -> list:
    return [
        "precompute", "--reference", world["ref"], "--data", data or world["data"], "--store", store.root,
        "--device", "cpu", "--max-length", max_length, "--batch-size", BATCH_SIZE,
        "--part-size", part_size, "--no-progress",
    ]  # fmt: skip


def assert_subset_of(contents: dict, baseline: dict, atol: float = ROUNDING) -> None:
    """Every example in `contents` is in `baseline` with the same token hash and ids and
    values equal within `atol` absolute and relative (0: bitwise)."""
    assert set(contents) <= set(baseline)
    for example_id, values in contents.items():
        expected = baseline[example_id]
        assert values[0] == expected[0], example_id
        np.testing.assert_array_equal(values[1], expected[1], err_msg=example_id)
        for got, want in zip(values[2:], expected[2:], strict=True):
            if atol == 0:
                np.testing.assert_array_equal(got, want, err_msg=example_id)
            else:
                np.testing.assert_allclose(got, want, rtol=atol, atol=atol, err_msg=example_id)


def assert_complete(store: Store, baseline: dict, baseline_rows: int, atol: float = ROUNDING) -> None:
    """The store equals the uninterrupted run: each example once, same values, no leftovers."""
    contents = read_all_targets(store)
    assert sorted(contents) == sorted(baseline)
    assert_subset_of(contents, baseline, atol)
    assert registered_rows(store) == baseline_rows  # no example registered twice
    assert stray_temporaries(store.root) == []
    assert unregistered_parts(store) == set()


@pytest.fixture(scope="module")
def baseline(world, server):
    """An uninterrupted CLI run: its contents, target rows and duration (s)."""
    store = fresh_store(world, "baseline")
    result = server.run(cli_args(world, store, part_size=ALIGNED_PART_SIZE), env=world["env"])
    assert result.returncode == 0, result.stderr
    assert f"precompute: {NUM_EXAMPLES} examples computed" in result.stdout
    contents = read_all_targets(store)
    assert len(contents) == NUM_EXAMPLES
    return {"contents": contents, "rows": registered_rows(store), "seconds": result.elapsed}


# ----------------------------------------------------------------------------- 1. SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted_run(world, server, baseline):
    """KILL_TRIALS SIGKILLs at seeded uniform moments of [0, one run's duration]; bitwise equality.

    A resumed run has less left to do and may finish before its kill moment: attempts go on
    until KILL_TRIALS runs were really killed. Where the moments land depends on the
    machine's speed (set-up can take most of a run): if fewer than 3 kills landed after the
    run had registered new parts, further moments are drawn from the second half of a run
    until 3 did (at most 4 x KILL_TRIALS attempts in all).
    """
    rng = random.Random(SEED)
    interrupted_with_progress = killed = kills_in_chain = 0
    chain, store = 0, fresh_store(world, "kill-chain-0")
    args = cli_args(world, store, part_size=ALIGNED_PART_SIZE)

    def finish_chain(last_killed: bool, done: int) -> None:
        nonlocal chain, kills_in_chain, store, args
        if last_killed:
            rerun = server.run(args, env=world["env"])
            assert rerun.returncode == 0, rerun.stderr
            assert f"{NUM_EXAMPLES - done} examples computed, {done} skipped" in rerun.stdout
        assert_complete(store, baseline["contents"], baseline["rows"], atol=0)
        chain, kills_in_chain = chain + 1, 0
        store = fresh_store(world, f"kill-chain-{chain}")
        args = cli_args(world, store, part_size=ALIGNED_PART_SIZE)

    for attempt in range(4 * KILL_TRIALS):
        if killed >= KILL_TRIALS and interrupted_with_progress >= 3:
            break
        low = 0.0 if killed < KILL_TRIALS else 0.5
        moment = rng.uniform(low, 1.0) * baseline["seconds"]
        before = len(read_all_targets(store))
        result = server.run(args, env=world["env"], kill_after=moment)
        assert result.killed or result.returncode == 0, f"attempt {attempt}: {result.stderr[-2000:]}"
        # after a kill the store opens, and what it holds is exact and unique
        contents = read_all_targets(store)
        assert_subset_of(contents, baseline["contents"], atol=0)
        assert registered_rows(store) == sum(len(v[1]) for v in contents.values())
        killed += result.killed
        kills_in_chain += result.killed
        interrupted_with_progress += result.killed and before < len(contents) < NUM_EXAMPLES
        if not result.killed or kills_in_chain == KILLS_PER_CHAIN:
            finish_chain(result.killed, len(contents))
    if kills_in_chain:
        finish_chain(True, len(read_all_targets(store)))
    # the trials did interrupt runs mid-way (else this test would prove nothing)
    assert killed >= KILL_TRIALS
    assert interrupted_with_progress >= 3, f"{interrupted_with_progress} of {killed} kills came after new parts"


WRITE_PATH_KILLS = [
    # (what the kill leaves behind, fault)
    ("a post part written to its temporary, not renamed",
     Fault("os:replace", match="post/.tmp-part", nth=2, when="before")),
    ("a targets part renamed into place but not in the manifest",
     Fault("os:replace", match="targets/.tmp-part", nth=3, when="after")),
    ("a targets part's temporary, killed inside its fsync",
     Fault("os:fsync", match="targets/.tmp-part", nth=2, when="before")),
]  # fmt: skip


def test_sigkill_at_each_step_of_the_part_write(world, server, baseline):
    """One store, killed in turn at each point of a part's write, then rerun to the end."""
    store = fresh_store(world, "write-path")
    for what, fault in WRITE_PATH_KILLS:
        result = server.run(cli_args(world, store), env=world["env"], faults=[fault])
        assert result.killed, f"{what}: the fault did not fire ({result.returncode}) {result.stderr[-2000:]}"
        assert stray_temporaries(store.root) or unregistered_parts(store), what  # the debris it leaves
        assert_subset_of(read_all_targets(store), baseline["contents"])  # ... which no reader sees
    rerun = server.run(cli_args(world, store), env=world["env"])
    assert rerun.returncode == 0, rerun.stderr
    assert_complete(store, baseline["contents"], baseline["rows"], atol=0)


@pytest.fixture(scope="module")
def manifest_kill(world, server):
    """A run killed after writing the new manifest's temporary, before renaming it; the rerun."""
    store = fresh_store(world, "manifest-kill")
    fault = Fault("os:replace", match=".tmp-manifest.json", nth=4, when="before")
    killed = server.run(cli_args(world, store, world["small"]), env=world["env"], faults=[fault])
    left = stray_temporaries(store.root)
    rerun = server.run(cli_args(world, store, world["small"]), env=world["env"])
    return store, killed, left, rerun


def test_sigkill_during_manifest_write_then_rerun_completes(manifest_kill, small_baseline):
    store, killed, left, rerun = manifest_kill
    assert killed.killed, killed.stderr[-2000:]
    assert [name for name in left if name.startswith(MANIFEST_TEMPORARY)]
    assert rerun.returncode == 0, rerun.stderr
    contents = read_all_targets(store)
    assert sorted(contents) == sorted(small_baseline["contents"])
    assert_subset_of(contents, small_baseline["contents"])
    assert registered_rows(store) == small_baseline["rows"]
    assert unregistered_parts(store) == set()


def test_no_manifest_temporary_left_after_rerun(manifest_kill):
    store, _, _, _ = manifest_kill
    assert stray_temporaries(store.root) == []


def short_max_length(data: Path, tokenizer) -> tuple[int, int]:
    """A max length that fits every prompt but cuts some responses; how many it cuts."""
    encoded = [encode_example(tokenizer, e, EncodingOptions(max_length=MAX_LENGTH)) for e in load_examples(data).examples]
    limit = max(e.response_start for e in encoded) + 2
    cut = sum(len(e.input_ids) > limit for e in encoded)
    assert 0 < cut < len(encoded)
    return limit, cut


def test_sigkill_while_stale_parts_are_rewritten(world, server):
    """A max-length change rewrites parts without the stale rows; kills inside that rewrite."""
    limit, cut = short_max_length(world["small"], load_tokenizer(world["ref"]))
    clean = fresh_store(world, "stale-clean")
    assert server.run(cli_args(world, clean, world["small"], limit), env=world["env"]).returncode == 0
    expected = read_all_targets(clean)

    store = fresh_store(world, "stale-kill")
    assert server.run(cli_args(world, store, world["small"]), env=world["env"]).returncode == 0
    # (fault, examples the store holds after it): the manifest writes of this run are
    # 1 = its reference entry, 2 = the swap of the rewritten parts for the old ones
    kills = [
        (Fault("os:replace", match="targets/.tmp-part", nth=1, when="after"), 40),  # rewritten part not swapped in
        (Fault("os:replace", match=".tmp-manifest.json", nth=2, when="after"), 40 - cut),  # stale rows dropped
    ]
    for fault, held in kills:
        result = server.run(cli_args(world, store, world["small"], limit), env=world["env"], faults=[fault])
        assert result.killed, result.stderr[-2000:]
        assert unregistered_parts(store)  # the new part, then the replaced old parts
        assert len(read_all_targets(store)) == held  # still opens, each example once
    rerun = server.run(cli_args(world, store, world["small"], limit), env=world["env"])
    assert rerun.returncode == 0, rerun.stderr
    assert_complete(store, expected, registered_rows(clean))


# ----------------------------------------------------------------------------- 3. ENOSPC


def in_process_options(**changes) -> PrecomputeOptions:
    options = dict(batch_size=BATCH_SIZE, max_length=MAX_LENGTH, device="cpu", examples_per_part=PART_SIZE, progress=False)
    options.update(changes)
    return PrecomputeOptions(**options)


def precompute(world, store: Store, data: Path | None = None, model: Path | None = None, **changes):
    notes: list[str] = []
    summary = run_precompute(
        model or world["ref"], data or world["small"], store.root, in_process_options(**changes), echo=notes.append
    )
    return summary, notes


@pytest.fixture(scope="module")
def small_baseline(world):
    store = fresh_store(world, "small-baseline")
    precompute(world, store)
    return {"contents": read_all_targets(store), "rows": registered_rows(store)}


ENOSPC_FAULTS = {
    "parquet part cut half-way": Fault("pyarrow.parquet:write_table", match="targets/.tmp-part", nth=3, when="after", action="enospc-half"),
    "post part cut half-way": Fault("pyarrow.parquet:write_table", match="post/.tmp-part", nth=2, when="after", action="enospc-half"),
    "fsync of a part": Fault("os:fsync", match="targets/.tmp-part", nth=3, action="enospc"),
    "manifest cut half-way": Fault("pathlib:Path.write_bytes", match=".tmp-manifest.json", nth=5, when="after", action="enospc-half"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ENOSPC_FAULTS))
def test_enospc_part_way_leaves_a_valid_store_and_a_rerun_completes(name, world, small_baseline, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_DIR", world["env"]["PACT_CACHE_DIR"])
    store = fresh_store(world, "enospc")
    with faults_in_process(ENOSPC_FAULTS[name]), pytest.raises(OSError) as failure:
        precompute(world, store)
    assert failure.value.errno == errno.ENOSPC
    assert "No space left on device" in str(failure.value)
    held = read_all_targets(store)  # the manifest and every registered part still read
    assert 0 < len(held) < 40
    assert_subset_of(held, small_baseline["contents"])
    assert stray_temporaries(store.root) == []  # the failed temporary was removed
    summary, _ = precompute(world, store)
    assert (summary.computed, summary.skipped) == (40 - len(held), len(held))
    assert_complete(store, small_baseline["contents"], small_baseline["rows"])


@pytest.fixture(scope="module")
def enospc_cli_run(world, server):
    """The real CLI, its second targets part cut half-way by a full disk."""
    store = fresh_store(world, "enospc-cli")
    fault = Fault("pyarrow.parquet:write_table", match="targets/.tmp-part", nth=2, when="after", action="enospc-half")
    return store, server.run(cli_args(world, store, world["small"]), env=world["env"], faults=[fault])


def test_cli_enospc_stops_and_leaves_a_valid_store(enospc_cli_run, world, server, small_baseline):
    store, result = enospc_cli_run
    assert result.returncode != 0 and "No space left on device" in result.stderr
    assert len(read_all_targets(store)) == BATCH_SIZE  # the first part only: one batch (>= PART_SIZE)
    assert stray_temporaries(store.root) == []
    rerun = server.run(cli_args(world, store, world["small"]), env=world["env"])
    assert rerun.returncode == 0, rerun.stderr
    assert_complete(store, small_baseline["contents"], small_baseline["rows"], atol=0)


def test_cli_reports_enospc_in_one_line(enospc_cli_run):
    _, result = enospc_cli_run
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


# ----------------------------------------------------------------------------- 4. stale cache


GLOBAL_CHANGES = {
    # change -> (the key the note names, how to make the variant)
    "reference weights": ("model", dict(weights_seed=1)),
    "tokenizer": ("tokenizer", dict(swap_tokens=True)),
    "chat template": ("chat_template", dict(template=OTHER_TEMPLATE)),
}


@pytest.mark.parametrize("change", list(GLOBAL_CHANGES))
def test_reference_change_recomputes_everything_once(change, world, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_DIR", world["env"]["PACT_CACHE_DIR"])
    key, how = GLOBAL_CHANGES[change]
    variant = model_variant(world["ref"], world["root"] / change.replace(" ", "-"), **how)
    clean = fresh_store(world, "clean")
    precompute(world, clean, model=variant)
    store = fresh_store(world, "changed")
    precompute(world, store)
    summary, notes = precompute(world, store, model=variant)
    assert summary.reference_reset and (summary.computed, summary.skipped) == (40, 0)
    assert any("another reference" in n and key in n for n in notes), notes
    assert_complete(store, read_all_targets(clean), registered_rows(clean))


def test_safety_set_change_recomputes_everything(world, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_DIR", world["env"]["PACT_CACHE_DIR"])
    clean = Store(world["root"] / "safety-clean")
    shutil.rmtree(clean.root, ignore_errors=True)
    make_safety(clean, world["vocab"], seed=1)
    precompute(world, clean)
    store = fresh_store(world, "safety-changed")
    precompute(world, store)
    make_safety(store, world["vocab"], seed=1)  # `pact tokens` rerun with other settings
    summary, notes = precompute(world, store)
    assert summary.reference_reset and (summary.computed, summary.skipped) == (40, 0)
    assert any("safety_tokens" in n for n in notes), notes
    assert_complete(store, read_all_targets(clean), registered_rows(clean))


def test_max_length_change_recomputes_only_the_cut_examples(world, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_DIR", world["env"]["PACT_CACHE_DIR"])
    limit, cut = short_max_length(world["small"], load_tokenizer(world["ref"]))
    clean = fresh_store(world, "length-clean")
    precompute(world, clean, max_length=limit)
    store = fresh_store(world, "length-changed")
    precompute(world, store)
    summary, notes = precompute(world, store, max_length=limit)
    assert not summary.reference_reset
    assert (summary.computed, summary.stale, summary.skipped) == (cut, cut, 40 - cut)
    assert any(f"{cut} examples have a new token hash" in n for n in notes), notes
    assert_complete(store, read_all_targets(clean), registered_rows(clean))


def test_edited_row_and_moved_model_recompute_only_what_changed(world, small_baseline, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_DIR", world["env"]["PACT_CACHE_DIR"])
    store = fresh_store(world, "edited")
    precompute(world, store)
    moved = world["root"] / "moved-ref"
    if not moved.exists():
        shutil.copytree(world["ref"], moved)
    summary, _ = precompute(world, store, model=moved)  # same weights, other path
    assert (summary.computed, summary.skipped, summary.reference_reset) == (0, 40, False)
    rows = [json.loads(line) for line in world["small"].read_text().splitlines()]
    rows[7]["completion"] = "Sure, here it is again."
    edited = write_jsonl(world["root"] / "small-edited.jsonl", rows)
    summary, _ = precompute(world, store, data=edited)
    assert (summary.computed, summary.stale, summary.skipped) == (1, 1, 39)
    contents = read_all_targets(store)
    assert registered_rows(store) == sum(len(v[1]) for v in contents.values())
    unchanged = {k: v for k, v in contents.items() if k != rows[7]["id"]}
    assert_subset_of(unchanged, small_baseline["contents"])
    assert contents[rows[7]["id"]][0] != small_baseline["contents"][rows[7]["id"]][0]

