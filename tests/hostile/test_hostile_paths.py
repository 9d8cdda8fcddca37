"""Paths are data, never patterns, and outputs never land on inputs (issue 15, failures 6
and 7): a store directory or manifest path holding glob characters reads exactly its own
files; `pact plot --out` and `pact train --out` refuse to overwrite a store, its files or a
model."""

from __future__ import annotations

import json
import shutil

import pytest
from hostile.harness import assert_one_error_line, call_pact, describe_changes, snapshot
from store_fixtures import fill, make_safety

from pact.store import Store


def rows(store_root) -> int:
    result = call_pact("sql", store_root, "SELECT count(*) AS n FROM targets", "--format", "csv")
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[1])


@pytest.mark.parametrize(("name", "neighbour"), [("q?x", "qYx"), ("a[b]", "ab"), ("s*", "sX"), ("it's", "its")])
def test_a_store_named_like_a_pattern_reads_only_itself(tmp_path, name, neighbour):
    """The attack: a store named `q?x` opened beside `qYx` returned the other store's rows."""
    store, other = Store(tmp_path / name), Store(tmp_path / neighbour)
    for target, count in ((store, 2), (other, 7)):
        make_safety(target)
        fill(target, count=count)
    assert rows(store.root) == 2 + 3  # ex0 has 2 steps, ex1 has 3
    assert rows(other.root) == 20


def test_a_glob_in_a_manifest_path_is_not_expanded(tmp_path):
    """The attack: `targets/part-*.parquet` passed the path check and DuckDB counted every
    part, registered or not. Now it names one file, which does not exist."""
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store, count=7, per_part=3)
    manifest = json.loads(store.manifest_path.read_text())
    first = next(p for p in manifest["parts"] if p["kind"] == "targets")
    first["path"] = "targets/part-*.parquet"
    store.manifest_path.write_text(json.dumps(manifest))
    result = call_pact("sql", store.root, "SELECT count(*) FROM targets")
    assert_one_error_line(
        result, r"^error: store part targets/part-\*\.parquet is listed in the manifest but missing; run `pact store repair"
    )


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("s/manifest.json", r"lies inside the store"),
        ("s/new.png", r"lies inside the store"),
        ("s", r"Invalid value for '--out': File .* is a directory"),
        ("model/model.safetensors", r"exists and is not a PNG; refusing to overwrite it$"),
    ],
)
def test_plot_never_overwrites_the_store_or_a_model(tmp_path, store, out, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    before = snapshot(tmp_path)
    assert_one_error_line(call_pact("plot", store.root, "--out", tmp_path / out), message)
    assert describe_changes(before, snapshot(tmp_path)) == ""


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("s", r"overlaps the store"),
        ("s/run", r"overlaps the store"),
        (".", r"overlaps the store"),
        ("model", r"overlaps the model"),
        ("model/run", r"overlaps the model"),
    ],
)
def test_train_out_never_overlaps_the_store_or_the_model(tmp_path, store, out, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    before = snapshot(tmp_path)
    result = call_pact(
        "train", "--model", model, "--data", data, "--store", store.root, "--out", tmp_path / out, "--device", "cpu"
    )
    assert_one_error_line(result, rf"^error: --out .* {message} .*: a run directory must be apart from its inputs$")
    assert describe_changes(before, snapshot(tmp_path)) == ""
    shutil.rmtree(model)


def test_sql_cannot_reach_a_neighbour_through_a_store_named_like_a_pattern(tmp_path):
    store, other = Store(tmp_path / "q?x"), Store(tmp_path / "qYx")
    for target in (store, other):
        make_safety(target)
        fill(target, count=2)
    for pattern in ("q?x", "q[?]x"):
        sql = f"SELECT count(*) FROM read_parquet('{tmp_path}/{pattern}/targets/*.parquet')"
        result = call_pact("sql", store.root, sql)
        if pattern == "q?x":
            assert_one_error_line(result, r"^error: SQL error: Permission Error: Cannot access file .*/qYx/")
        else:
            assert result.returncode == 0 and result.stdout.split()[-3] == "5", result.stdout


def test_a_newline_in_a_file_name_cannot_forge_a_second_error_line(tmp_path):
    """Attack rerun N12: `pact data` of a file named `line<newline>error: fake.jsonl` printed
    its error on two lines, the second a forged `error:` line. Now the name is escaped."""
    path = tmp_path / "line\nerror: fake.jsonl"
    path.write_text("not json\n", encoding="utf-8")
    result = call_pact("data", path)
    assert_one_error_line(result, r"line\\nerror: fake\.jsonl:1: malformed JSON line")
