"""One writer at a time (issue 15, failure 2 and the weak cases around it): two
`pact precompute` into one store, `pact tokens` during a precompute, two `pact train` into
one --out, shards of two splits, symlinked lock files, and start-up cleanup that must leave
a live writer's files alone. The other writer is a real process holding the lock
(`holding`), so every case is deterministic."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from fault_harness import registered_rows, short_rows, stray_temporaries, unregistered_parts
from hostile.harness import (
    ROOT,
    assert_one_error_line,
    call_pact,
    describe_changes,
    holding,
    snapshot,
)
from tiny import make_model, make_tokenizer
from train_fixtures import make_safety, write_jsonl

from pact.core.errors import PactError
from pact.store import Store, TargetReader, TargetWriter

ROWS = 24
HOLDER = r"\(pid \d+ on [^,]+, 'pact fake --holder', started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    tokenizer = make_tokenizer(root / "ref")
    make_model(root / "ref", len(tokenizer), seed=0)
    template = Store(root / "template")
    make_safety(template, len(tokenizer))
    data = write_jsonl(root / "train.jsonl", short_rows(ROWS, 7))
    return {"root": root, "ref": root / "ref", "template": template.root, "data": data}


@pytest.fixture
def store(world, tmp_path) -> Store:
    shutil.copytree(world["template"], tmp_path / "s")
    return Store(tmp_path / "s")


def precompute_args(world, store: Store, *extra: str) -> list:
    return [
        "precompute", "--reference", world["ref"], "--data", world["data"], "--store", store.root,
        "--device", "cpu", "--max-length", "48", "--batch-size", "8", "--no-progress", *extra,
    ]  # fmt: skip


def test_two_precomputes_started_together_store_every_example_once(world, store):
    """The attack: both exited 0 and every example was registered twice. Now the second is
    refused with one line (or, when the first had finished, skips every example)."""
    commands = [[sys.executable, "-m", "pact", *map(str, precompute_args(world, store))] for _ in range(2)]
    children = [
        subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    results = []
    try:
        for child in children:
            out, err = child.communicate(timeout=300)
            results.append((child.returncode, out, err))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for code, _, err in results:
        assert code == 0 or (code == 2 and "is being written by another pact process" in err), err
    assert 0 in [code for code, _, _ in results]
    assert len(TargetReader(store)) == ROWS  # refuses an example stored twice
    rows_once = registered_rows(store)
    assert call_pact(*precompute_args(world, store)).returncode == 0
    assert registered_rows(store) == rows_once
    assert stray_temporaries(store.root) == [] and unregistered_parts(store) == set()
    assert not list(store.root.glob(".writer*.lock"))  # released locks leave no file


def test_a_second_precompute_is_refused_naming_the_holder(world, store):
    before = snapshot(store.root)
    with holding(f"shard_writer({str(store.root)!r}, 's0of1', command='pact fake --holder')"):
        result = call_pact(*precompute_args(world, store))
        assert describe_changes(before, snapshot(store.root)) in ("", "added .writer-s0of1.lock, added .writer.lock")
    assert_one_error_line(
        result,
        rf"^error: shard s0of1 of store .* is being written by another pact process {HOLDER}; "
        r"wait for it to finish or pass --wait$",
    )
    assert describe_changes(before, snapshot(store.root)) == ""


def test_another_shard_of_the_same_split_may_run(world, store):
    with holding(f"shard_writer({str(store.root)!r}, 's1of2', command='pact fake --holder')"):
        result = call_pact(*precompute_args(world, store, "--shard", "0/2"))
    assert result.returncode == 0, result.stderr


def test_a_shard_of_another_split_is_refused(world, store):
    with holding(f"shard_writer({str(store.root)!r}, 's1of2', command='pact fake --holder')"):
        result = call_pact(*precompute_args(world, store))
    assert_one_error_line(
        result, rf"^error: store .*: shard s1of2 is being written {HOLDER} and overlaps shard s0of1"
    )


def test_precompute_is_refused_while_tokens_rewrites_the_store(world, store):
    with holding(f"store_writer({str(store.root)!r}, command='pact fake --holder')"):
        result = call_pact(*precompute_args(world, store))
    assert_one_error_line(result, rf"^error: store .* is being written by another pact process {HOLDER}; ")


def test_tokens_is_refused_while_a_precompute_runs(world, store):
    with holding(f"shard_writer({str(store.root)!r}, 's0of1', command='pact fake --holder')"):
        result = call_pact(
            "tokens", "--aligned", world["ref"], "--base", world["ref"], "--data", world["data"],
            "--store", store.root, "--force",
        )  # fmt: skip
    assert_one_error_line(result, rf"^error: store .* is being written by another pact process {HOLDER}; ")


def test_wait_lets_the_second_precompute_finish_after_the_first(world, store):
    with holding(f"shard_writer({str(store.root)!r}, 's0of1', command='pact fake --holder')") as holder:
        child = subprocess.Popen(
            [sys.executable, "-m", "pact", *map(str, precompute_args(world, store, "--wait"))],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            note = child.stderr.readline()  # printed once the lock was found busy
            assert note.startswith("waiting: shard s0of1 of store"), note
            assert child.poll() is None and holder.poll() is None
        except BaseException:
            child.kill()
            raise
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert len(TargetReader(store)) == ROWS


def test_a_second_train_into_one_out_is_refused(world, store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with holding(f"run_writer({str(run)!r}, command='pact fake --holder')"):
        result = call_pact(
            "train", "--model", world["ref"], "--data", world["data"], "--store", store.root,
            "--out", run, "--device", "cpu", "--max-steps", "1",
        )  # fmt: skip
    assert_one_error_line(
        result, rf"^error: run directory .*run is being written by another pact train {HOLDER}; "
    )
    assert sorted(p.name for p in run.iterdir()) == []


@pytest.mark.parametrize("name", [".writer.lock", ".writer-s0of1.lock"])
def test_a_symlinked_lock_file_is_refused_not_followed(world, store, tmp_path, name):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (store.root / name).symlink_to(outside)
    result = call_pact(*precompute_args(world, store))
    assert_one_error_line(result, rf"^error: lock file .*{name} is a symbolic link \(tampered directory\?\); remove it$")
    assert outside.read_text() == "keep me"


def test_a_symlinked_manifest_lock_is_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    store = Store(tmp_path / "s")
    store.root.mkdir()
    (store.root / ".lock").symlink_to(outside)
    with pytest.raises(PactError, match=r"lock file .*\.lock is a symbolic link"):
        store.update_manifest(lambda manifest: None)
    assert outside.read_text() == "keep me"


def test_start_up_cleanup_leaves_a_live_writers_files_alone(world, store):
    """The race of the attack: one run's cleanup deleted a part the other run had renamed
    but not yet registered. While the shard is held, nothing of it is removed."""
    targets = store.root / "targets"
    targets.mkdir()
    renamed = targets / "part-s0of1-0123456789ab.parquet"
    temporary = targets / ".tmp-part-s0of1-0123456789ab.parquet.k2x_9qab"
    for path in (renamed, temporary):
        path.write_bytes(b"being written")
    with holding(f"shard_writer({str(store.root)!r}, 's0of1', command='pact fake --holder')"):
        TargetWriter(store, 4, shard_tag="s0of1")
        assert renamed.exists() and temporary.exists()
    TargetWriter(store, 4, shard_tag="s0of1")  # the writer is gone: its debris goes
    assert not renamed.exists() and not temporary.exists()


def test_start_up_cleanup_removes_only_pacts_own_names(store):
    targets = store.root / "targets"
    targets.mkdir()
    kept = [
        "notes-s0of1-.txt", "part-s0of1-backup.parquet", "part-s0of1-0123456789ab.parquet.bak.old",
        "part-s0of1-0123456789ab.parquet.bak",
        "my-s0of1-data.parquet", "part-s0of10-0123456789ab.parquet", ".tmp-part-s1of2-0123456789ab.parquet.x",
    ]  # fmt: skip
    for name in kept:
        (targets / name).write_bytes(b"user data")
    TargetWriter(store, 4, shard_tag="s0of1")
    assert sorted(p.name for p in targets.iterdir()) == sorted(kept)
