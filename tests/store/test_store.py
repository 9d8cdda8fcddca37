"""The store: atomic parts, manifest, O(1) reader, read-only SQL views."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from store_fixtures import S, example_values, fill, make_safety

from pact.core.atomic import atomic_path
from pact.core.errors import PactError
from pact.store import (
    Store,
    TargetReader,
    TargetWriter,
    load_safety_set,
)
from pact.store.sql import query
from pact.store.tables import METRICS_SCHEMA, write_table


def test_round_trip_and_lookup(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    written = fill(store)
    reader = TargetReader(store)
    assert len(reader) == 7
    assert len(store.parts("targets")) == 3
    for example_id, values in written.items():
        got = reader.get(example_id)
        np.testing.assert_array_equal(got.full_logprobs, values["full_logprobs"])
        np.testing.assert_array_equal(got.token_ids, values["token_ids"])
        np.testing.assert_allclose(got.post_logprobs, np.log(1 / S), rtol=1e-6)
        assert got.token_hash == values["token_hash"] == reader.token_hash(example_id)
    with pytest.raises(PactError, match="example nope has no targets"):
        reader.get("nope")
    assert load_safety_set(store).token_ids.tolist() == [3, 5, 7]


def test_float16_values(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    writer = TargetWriter(store, S, value_dtype="float16")
    values = example_values(1, 4)
    writer.add_post(values["response_hash"], values["full_logprobs"])
    writer.add_example(**values)
    writer.close()
    got = TargetReader(store).get("ex1").full_logprobs
    np.testing.assert_allclose(got, values["full_logprobs"], atol=2e-3)


def test_unregistered_and_temporary_parts_are_invisible_and_cleaned(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store, count=2)
    manifest = store.read_manifest()
    orphan = store.root / "targets" / "part-s0of1-0123456789ab.parquet"
    orphan.write_bytes((store.root / manifest["parts"][1]["path"]).read_bytes())
    temporary = store.root / "targets" / ".tmp-part-s0of1-0123456789ab.parquet.k2x_9qab"
    temporary.write_bytes(b"half")
    assert len(TargetReader(store)) == 2
    TargetWriter(store, S)
    assert not orphan.exists() and not temporary.exists()


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "file.bin"
    with pytest.raises(OSError), atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_duplicate_example_across_parts_is_refused(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    for _ in range(2):
        writer = TargetWriter(store, S, shard_tag="s0of1" if _ == 0 else "s1of2")
        values = example_values(1, 2)
        writer.add_post(values["response_hash"], values["full_logprobs"])
        writer.add_example(**values)
        writer.close()
    with pytest.raises(PactError, match="example ex1 appears twice in the store"):
        TargetReader(store)


def test_non_finite_values_refused_at_write(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    values = example_values(1, 2)
    values["full_logprobs"][0, 0] = np.nan
    with pytest.raises(PactError, match="non-finite reference log-probabilities"):
        TargetWriter(store, S).add_example(**values)


@pytest.mark.parametrize("bad", ["../outside.parquet", "/etc/passwd", "targets/../../x.parquet"])
def test_manifest_paths_cannot_leave_the_store(tmp_path, bad):
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store, count=1)
    manifest = json.loads(store.manifest_path.read_text())
    manifest["parts"][0]["path"] = bad
    store.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PactError, match="points outside the store"):
        TargetReader(store)


def test_corrupted_manifest(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    store.manifest_path.write_text("{not json")
    with pytest.raises(PactError, match="not valid JSON"):
        store.read_manifest()
    store.manifest_path.write_text(json.dumps({"schema_version": 99, "parts": []}))
    with pytest.raises(PactError, match="schema_version 99"):
        store.read_manifest()


def test_missing_store_and_safety_set(tmp_path):
    with pytest.raises(PactError, match="does not exist"):
        TargetReader(Store(tmp_path / "none"))
    store = Store(tmp_path / "s")
    store.update_manifest(lambda m: None)
    with pytest.raises(PactError, match="no safety-token set: run `pact tokens` first"):
        load_safety_set(store)


def test_sql_views(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    written = fill(store)
    columns, rows = query(store, "SELECT count(*) FROM targets")
    assert rows == [(sum(len(v["token_ids"]) for v in written.values()),)]
    columns, rows = query(
        store,
        "SELECT prob, logprob, token FROM confidences WHERE example_id='ex2' AND step=1 AND context='full' ORDER BY token_id",
    )
    expected = written["ex2"]["full_logprobs"][1]
    np.testing.assert_allclose([r[1] for r in rows], expected, rtol=1e-6)
    np.testing.assert_allclose([r[0] for r in rows], np.exp(expected), rtol=1e-6)
    assert [r[2] for r in rows] == ["a", "b", "c"]
    _, rows = query(store, "SELECT DISTINCT context FROM confidences ORDER BY 1")
    assert rows == [("full",), ("post",)]
    write_table(store, "metrics", "run1", pa.Table.from_pylist([{n: 1 for n in METRICS_SCHEMA.names} | {"run_id": "run1", "method": "pact"}]))
    assert query(store, "SELECT run_id, step FROM metrics")[1] == [("run1", 1)]
    assert query(store, "SELECT count(*) FROM evals")[1] == [(0,)]


@pytest.mark.parametrize(
    "sql, kind",
    [
        ("DROP VIEW targets", "DROP"),
        ("INSERT INTO evals VALUES (1)", "INSERT"),
        ("COPY (SELECT 1) TO 'out.csv'", "COPY"),
        ("ATTACH 'other.db'", "ATTACH"),
        ("INSTALL httpfs", "LOAD"),
        ("LOAD httpfs", "LOAD"),
        ("SELECT 1; DROP VIEW targets", "DROP"),
        ("SET enable_external_access = true", "SET"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ],
)
def test_sql_is_read_only(tmp_path, sql, kind):
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store, count=2)
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(PactError, match=f"read-only: {kind} statements are not allowed"):
        query(store, sql)
    after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert before == after


def test_sql_cannot_read_outside_the_store(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(PactError, match="SQL error: Permission Error"):
        query(store, f"SELECT * FROM read_csv('{secret}')")
    with pytest.raises(PactError, match="SQL error"):
        query(store, "SELECT * FROM no_such_view")


def test_metrics_without_optional_probe_columns_get_nulls(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    required = [n for n in METRICS_SCHEMA.names if n not in ("probe_kl", "probe_mass")]
    row = {n: 2 for n in required} | {"run_id": "r", "method": "sft"}
    assert write_table(store, "metrics", "r", pa.Table.from_pylist([row])) == "metrics/r.parquet"
    assert query(store, "SELECT step, probe_kl, probe_mass FROM metrics")[1] == [(2, None, None)]
    with pytest.raises(PactError, match="metrics table does not match its schema"):
        write_table(store, "metrics", "bad", pa.Table.from_pylist([{"run_id": "r"}]))


def test_reader_memory_budget_bounds_the_cache(tmp_path, monkeypatch):
    import pact.store.targets as targets

    monkeypatch.setattr(targets, "ROW_GROUP_ROWS", 4)
    store = Store(tmp_path / "s")
    make_safety(store)
    written = fill(store, count=20, per_part=10)
    reader = TargetReader(store, memory_budget_mb=1e-6)
    for example_id in reversed(list(written)):
        got = reader.get(example_id)
        np.testing.assert_array_equal(got.full_logprobs, written[example_id]["full_logprobs"])
        assert len(reader._groups) == 1
