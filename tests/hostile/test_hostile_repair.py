"""`pact store verify` / `pact store repair`, and every piece of advice an error gives about a
damaged store, followed to the letter until the store works again (issue 15, failures 2-4).

Each case damages a store that a real `pact precompute` wrote, reads it through the surface
that finds the damage (TargetReader, `pact sql` or `pact precompute`), checks the one line
and the advice it gives, does what the advice says, and then requires the store to equal the
undamaged one: every example once, values equal to float32 rounding, `pact store verify` clean.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_harness import (
    read_all_targets,
    registered_rows,
    short_rows,
    stray_temporaries,
    unregistered_parts,
)
from hostile.harness import assert_one_error_line, assert_one_line_message, call_pact, holding
from tiny import make_model, make_tokenizer
from train_fixtures import make_safety, write_jsonl

from pact.core.errors import PactError
from pact.store import Store, TargetReader
from pact.store.verify import verify

ROWS = 16
ROUNDING = 1e-5
REPAIR = "run `pact store repair {root}`, then rerun `pact precompute`"
RERUN = "rerun pact precompute over the same data to compute them"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair")
    tokenizer = make_tokenizer(root / "ref")
    make_model(root / "ref", len(tokenizer), seed=0)
    template = Store(root / "template")
    make_safety(template, len(tokenizer))
    world = {"root": root, "ref": root / "ref", "template": template.root}
    world["data"] = write_jsonl(root / "train.jsonl", short_rows(ROWS, 11))
    baseline = fresh(world, root / "baseline")
    assert precompute(world, baseline).returncode == 0
    world["baseline"] = baseline.root
    world["contents"] = read_all_targets(baseline)
    world["rows"] = registered_rows(baseline)
    return world


def fresh(world, path: Path) -> Store:
    shutil.copytree(world["template"], path)
    return Store(path)


def precompute(world, store: Store):
    return call_pact(
        "precompute", "--reference", world["ref"], "--data", world["data"], "--store", store.root,
        "--device", "cpu", "--max-length", "48", "--batch-size", "4", "--part-size", "4", "--no-progress",
    )  # fmt: skip


@pytest.fixture
def store(world, tmp_path) -> Store:
    shutil.copytree(world["baseline"], tmp_path / "store")
    return Store(tmp_path / "store")


def assert_works(world, store: Store) -> None:
    """The store equals the undamaged one and verifies clean."""
    contents = read_all_targets(store)
    assert sorted(contents) == sorted(world["contents"])
    for example_id, values in contents.items():
        want = world["contents"][example_id]
        assert values[0] == want[0]
        for got, expected in zip(values[1:], want[1:], strict=True):
            np.testing.assert_allclose(got, expected, rtol=ROUNDING, atol=ROUNDING, err_msg=example_id)
    assert registered_rows(store) == world["rows"]
    assert stray_temporaries(store.root) == [] and unregistered_parts(store) == set()
    assert verify(store).problems == []
    assert call_pact("sql", store.root, "SELECT count(*) FROM targets").returncode == 0


def manifest(store: Store) -> dict:
    return json.loads(store.manifest_path.read_text())


def write_manifest(store: Store, value: dict) -> None:
    store.manifest_path.write_text(json.dumps(value))


def first(store: Store, kind: str = "targets", index: int = 0) -> Path:
    return store.root / [p for p in manifest(store)["parts"] if p["kind"] == kind][index]["path"]


def truncate(store: Store, outside: Path) -> None:
    path = first(store)
    path.write_bytes(path.read_bytes()[:-100])


def delete(store: Store, outside: Path) -> None:
    first(store).unlink()


def registered_twice_by_two_writers(store: Store, outside: Path) -> None:
    """What two concurrent precomputes left: every part written and registered twice."""
    value = manifest(store)
    copies = []
    for index, entry in enumerate(value["parts"]):
        relative = f"{entry['kind']}/part-s0of1-{index:012x}.parquet"
        shutil.copyfile(store.root / entry["path"], store.root / relative)
        copies.append({**entry, "path": relative})
    value["parts"] += copies
    write_manifest(store, value)


def same_entry_twice(store: Store, outside: Path) -> None:
    value = manifest(store)
    value["parts"].append(next(p for p in value["parts"] if p["kind"] == "targets"))
    write_manifest(store, value)


def foreign_part(store: Store, outside: Path) -> None:
    shutil.copyfile(first(store, "post"), first(store))


def scramble_steps(store: Store, outside: Path) -> None:
    path = first(store)
    table = pq.read_table(path)
    steps = table.column("step").to_numpy().copy()
    steps[[0, 1]] = steps[[1, 0]]
    pq.write_table(table.set_column(3, "step", pa.array(steps, pa.int32())), path)


def symlinked_targets(store: Store, outside: Path) -> None:
    """The attack: targets/ moved to a bigger disk and linked back."""
    shutil.move(str(store.root / "targets"), str(outside / "targets"))
    os.symlink(outside / "targets", store.root / "targets")


def symlinked_part(store: Store, outside: Path) -> None:
    path = first(store)
    shutil.move(str(path), str(outside / path.name))
    os.symlink(outside / path.name, path)


def manifest_as_part(store: Store, outside: Path) -> None:
    value = manifest(store)
    value["parts"][0]["path"] = "manifest.json"
    write_manifest(store, value)


def post_rows_gone(store: Store, outside: Path) -> None:
    path = first(store, "post")
    value = manifest(store)
    value["parts"] = [p for p in value["parts"] if store.root / p["path"] != path]
    write_manifest(store, value)
    path.unlink()


def nan_values(store: Store, outside: Path) -> None:
    path = first(store)
    table = pq.read_table(path)
    column = table.column("full_logprobs").combine_chunks()
    values = column.flatten().to_numpy().copy().reshape(len(column), -1)
    values[0, 0] = np.nan
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    pq.write_table(table.set_column(7, "full_logprobs", array), path)


def read_targets(store: Store) -> None:
    reader = TargetReader(store)
    for example_id in reader.example_ids():
        reader.get(example_id)


@dataclass(frozen=True)
class Advice:
    """A damage, the surface that finds it, the line it must give, and what to do then."""

    name: str
    damage: Callable[[Store, Path], None]
    surface: str  # reader | sql | precompute
    message: str  # regex; {advice} is the repair advice of this store
    steps: tuple[str, ...] = ("repair", "precompute")


ADVICE = [
    Advice("truncated_part", truncate, "reader", r"store part part-s0of1-\w+\.parquet is unreadable \(.+\); {advice}$"),
    Advice("deleted_part", delete, "sql", r"^error: store part targets/part-s0of1-\w+\.parquet is listed in the manifest but missing; {advice}$"),
    Advice("deleted_part_precompute", delete, "precompute", r"^error: store part targets/part-s0of1-\w+\.parquet is listed in the manifest but missing; {advice}$"),
    Advice("every_part_registered_twice", registered_twice_by_two_writers, "reader", r"^example ex-\d+ appears twice in the store \(part-s0of1-\w+\.parquet and part-s0of1-\w+\.parquet\); {advice}$"),
    Advice("every_part_registered_twice_precompute", registered_twice_by_two_writers, "precompute", r"^error: example ex-\d+ appears twice in the store .*; {advice}$"),
    Advice("same_entry_twice", same_entry_twice, "reader", r"^example ex-\d+ appears twice in the store .*; {advice}$"),
    Advice("foreign_part", foreign_part, "sql", r"^error: store part part-s0of1-\w+\.parquet does not have the expected columns and types for \d+ safety tokens \(corrupted or foreign part\?\); {advice}$"),
    Advice("steps_out_of_order", scramble_steps, "reader", r"^store part part-s0of1-\w+\.parquet: steps are not 0\.\.T-1 per example \(corrupted part\?\); {advice}$"),
    Advice("symlinked_targets_dir_precompute", symlinked_targets, "precompute", r"^error: targets/ in store .* is a symbolic link \(a store is one directory: move the whole store instead\); {advice}$"),
    Advice("symlinked_targets_dir", symlinked_targets, "sql", r"^error: manifest path 'targets/part-s0of1-\w+\.parquet' is reached through the symbolic link targets \(a store is one directory: move the whole store instead\); {advice}$"),
    Advice("symlinked_part", symlinked_part, "sql", r"^error: manifest path 'targets/part-s0of1-\w+\.parquet' is reached through the symbolic link targets/part-s0of1-\w+\.parquet .*; {advice}$"),
    Advice("manifest_registered_as_a_part", manifest_as_part, "reader", r"^store part manifest\.json is unreadable \(.+\); {advice}$"),
    Advice("post_rows_missing", post_rows_gone, "reader", rf"^example ex-\d+: post-only targets of its response are missing; {RERUN}$", ("precompute",)),
    Advice("nan_values", nan_values, "reader", r"^example ex-\d+: stored targets contain NaN or inf \(corrupted part\?\); rerun pact precompute over the same data to recompute them$", ("precompute",)),
]


@pytest.mark.parametrize("case", ADVICE, ids=[a.name for a in ADVICE])
def test_the_advice_leads_to_a_working_store(world, store, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    case.damage(store, outside)
    outside_before = sorted((p.relative_to(outside), p.stat().st_size) for p in outside.rglob("*") if p.is_file())
    pattern = case.message.replace("{advice}", re.escape(REPAIR.format(root=store.root)))
    if case.surface == "reader":
        with pytest.raises(PactError) as info:
            read_targets(store)
        assert_one_line_message(str(info.value), pattern)
    else:
        args = ("sql", store.root, "SELECT count(*) FROM confidences") if case.surface == "sql" else ()
        result = call_pact(*args) if args else precompute(world, store)
        assert_one_error_line(result, pattern)
    for step in case.steps:
        result = call_pact("store", "repair", store.root) if step == "repair" else precompute(world, store)
        assert result.returncode == 0, result.stdout + result.stderr
    assert_works(world, store)
    after = sorted((p.relative_to(outside), p.stat().st_size) for p in outside.rglob("*") if p.is_file())
    assert after == outside_before  # repair removes links, never what they point to


def test_a_symlinked_empty_targets_dir_is_refused_by_the_writer(world, tmp_path):
    """The attack: precompute wrote through the link and exited 0, then every reader
    refused the store. Now the writer refuses first, and the advice works."""
    store = fresh(world, tmp_path / "store")
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", store.root / "targets")
    advice = re.escape(REPAIR.format(root=store.root))
    assert_one_error_line(
        precompute(world, store),
        rf"^error: targets/ in store .* is a symbolic link \(a store is one directory: move the whole store instead\); {advice}$",
    )
    assert list((tmp_path / "disk").iterdir()) == []
    assert call_pact("store", "repair", store.root).returncode == 0
    assert precompute(world, store).returncode == 0
    assert_works(world, store)


def test_verify_reports_each_problem_and_repair_fixes_what_pact_owns(world, store, tmp_path):
    targets = store.root / "targets"
    orphan = targets / "part-s0of1-0123456789ab.parquet"
    shutil.copyfile(first(store), orphan)
    temporary = targets / ".tmp-part-s0of1-0123456789ab.parquet.abcd1234"
    temporary.write_bytes(b"half")
    foreign = targets / "notes.txt"
    foreign.write_text("mine")
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", store.root / "evals")
    truncate(store, tmp_path)
    bad = first(store).relative_to(store.root)

    result = call_pact("store", "verify", store.root)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and result.stderr == ""
    assert f"problem: {bad}: unreadable or not a targets part (" in lines[0]
    assert sorted(lines[1:-1]) == sorted([
        f"problem: targets/{temporary.name}: temporary file of a writer that is not running",
        f"problem: targets/{orphan.name}: part not listed in the manifest (orphan of a killed writer)",
        "warning: targets/notes.txt: foreign file (not written by pact); left alone",
        f"problem: evals: symbolic link to {tmp_path / 'secret'} (pact keeps a store in one directory)",
    ])  # fmt: skip
    assert re.fullmatch(rf"store .*: \d+ parts, \d+ examples; 4 problems: run `pact store repair {re.escape(str(store.root))}`", lines[-1])

    result = call_pact("store", "repair", store.root)
    assert result.returncode == 0, result.stdout
    assert "repaired 4 problems" in result.stdout.splitlines()[-1]
    assert not orphan.exists() and not temporary.exists() and not (store.root / "evals").is_symlink()
    assert foreign.read_text() == "mine" and (tmp_path / "secret").read_text() == "outside"
    result = call_pact("store", "verify", store.root)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].endswith("; no problem")
    foreign.unlink()
    assert precompute(world, store).returncode == 0
    assert_works(world, store)


def test_verify_of_a_sound_store_is_clean(world, store):
    result = call_pact("store", "verify", store.root)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"store {store.root}: {len(manifest(store)['parts'])} parts, {ROWS} examples; no problem\n"


@pytest.mark.parametrize("text", ['{"schema_version": 1, "parts": [', "[]", '{"schema_version": 2, "parts": []}'])
def test_an_unreadable_manifest_gives_advice_that_works(world, store, text):
    store.manifest_path.write_text(text)
    for command in ("verify", "repair"):
        assert_one_error_line(
            call_pact("store", command, store.root),
            r"repair cannot rebuild it: restore it from a backup, or delete the store and rerun `pact tokens` and `pact precompute`$",
        )


def test_repair_is_refused_while_a_writer_runs(world, store):
    with holding(f"shard_writer({str(store.root)!r}, 's0of1', command='pact fake --holder')"):
        result = call_pact("store", "repair", store.root)
    assert_one_error_line(result, r"^error: store .* is being written by another pact process \(pid \d+")


def test_verify_and_repair_of_a_missing_store(tmp_path):
    for command in ("verify", "repair"):
        assert_one_error_line(call_pact("store", command, tmp_path / "nope"), r"store .*nope does not exist$")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    ("kind", "content", "reason"),
    [
        ("metrics", b"PAR1 not parquet PAR1", r"is not a readable Parquet file \(.*\)"),
        ("evals", "table", r"is not a pact evals table \(no column eval_id\)"),
    ],
)
def test_a_stray_file_among_the_tables_is_left_out_with_advice_that_works(tmp_path, kind, content, reason):
    """Attack rerun N40: a garbage `metrics/junk.parquet` broke every `pact sql` query with
    DuckDB's footer error and no advice, and verify called the store clean. Now queries
    answer, with one warning naming the file, and verify reports it."""
    from store_fixtures import fill
    from store_fixtures import make_safety as make_store_safety

    store = Store(tmp_path / "s")
    make_store_safety(store)
    fill(store, count=2)
    stray = store.root / kind / "junk.parquet"
    stray.parent.mkdir(exist_ok=True)
    if content == "table":
        pq.write_table(pa.table({"x": [1]}), stray)
    else:
        stray.write_bytes(content)
    advice = rf"; move it out of the store \(pact writes only its own tables there\); left out of the {kind} view$"
    for table in ("targets", kind):
        sql = call_pact("sql", store.root, f"SELECT count(*) AS n FROM {table}", "--format", "csv")
        assert (sql.returncode, sql.stdout) == (0, f"n\n{5 if table == 'targets' else 0}\n"), sql.stderr
        assert re.fullmatch("warning: " + re.escape(str(stray)) + " " + reason + advice, sql.stderr.strip())
    checked = call_pact("store", "verify", store.root)
    assert checked.returncode == 1 and f"problem: {kind}/junk.parquet: " in checked.stdout
    assert checked.stdout.strip().splitlines()[-1].endswith("repair cannot fix it; do what the line above says")
    stray.rename(tmp_path / "junk.parquet")
    assert call_pact("sql", store.root, "SELECT count(*) FROM targets").stderr == ""
    assert call_pact("store", "verify", store.root).returncode == 0
