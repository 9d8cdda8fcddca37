"""Hostile and broken inputs: every bad file or damaged store gives one clear line, exit code 2,
no traceback, and changes nothing on disk.

Data files: the committed corpus tests/hostile/files (see tests/hostile/README.md), each run
as `pact data FILE`. Stores: a valid store is built here, damaged one way per case, then read
through `pact sql`, `TargetReader` and `load_safety_set`. `pact` runs in this process through
`pact.pipeline.cli.main` (the code `python -m pact` runs; fast); a sample of cases also runs as
real `python -m pact` subprocesses and must print byte-identical errors.
Cases marked as known bugs are strict xfails naming the fix they wait for; once one XPASSes,
clear its `known_bug` (tests/hostile/make_corpus.py, then rerun it) or delete its entry from `bugs`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile.harness import (
    assert_one_error_line,
    assert_one_line_message,
    call_pact,
    describe_changes,
    run_pact_many,
    snapshot,
)
from hostile.make_corpus import CASES, FILES, README, readme_text, write_corpus
from safetensors.numpy import save_file
from store_fixtures import S, fill, make_safety

from pact.core.data import load_examples
from pact.core.errors import PactError
from pact.store import Store, TargetReader, load_safety_set

# -- the data-file corpus --------------------------------------------------------------------


def _case_param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.known_bug)] if case.known_bug else []
    return pytest.param(case, id=case.name, marks=marks)


def test_corpus_is_complete_and_small():
    names = sorted(p.name for p in FILES.iterdir())
    assert names == sorted(c.name for c in CASES), "rerun python tests/hostile/make_corpus.py"
    sizes = [(FILES / c.name).stat().st_size for c in CASES]
    assert len(CASES) >= 30
    assert max(sizes) <= 1_500_000 and sum(sizes) <= 5_000_000


def test_corpus_is_deterministic_and_current(tmp_path):
    first, second = write_corpus(tmp_path / "a"), write_corpus(tmp_path / "b")
    for one, two in zip(first, second, strict=True):
        assert one.read_bytes() == two.read_bytes(), f"{one.name} is not deterministic"
        if one.suffix != ".parquet":  # Parquet bytes carry the pyarrow version
            assert one.read_bytes() == (FILES / one.name).read_bytes(), f"{one.name} is stale"
    assert README.read_text(encoding="utf-8") == readme_text(), "rerun python tests/hostile/make_corpus.py"


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_bad_file_gives_one_clear_line(case):
    before = snapshot(FILES)
    line = assert_one_error_line(call_pact("data", FILES / case.name), case.error)
    assert case.name in line
    assert describe_changes(before, snapshot(FILES)) == ""


VALID_BUT_UNUSUAL = [
    pytest.param(
        "u2028.jsonl",
        json.dumps({"prompt": "line\u2028separator", "completion": "b\u2029"}, ensure_ascii=False) + "\n"
        + json.dumps({"prompt": "next\x85line", "completion": "c"}, ensure_ascii=False) + "\n",
        2,
        id="raw_unicode_line_separators",
    ),
    pytest.param("long_prompt.jsonl", json.dumps({"prompt": "p" * 10**6, "completion": "b"}) + "\n", 1, id="prompt_1e6_chars"),
    pytest.param(
        "crlf.jsonl",
        '{"prompt": "a", "completion": "b"}\r\n{"prompt": "\U0001F600 \u00e9", "completion": "\u4e2d"}\r\n',
        2,
        id="crlf_and_astral_characters",
    ),
    pytest.param(
        "id_512.jsonl", json.dumps({"id": "i" * 512, "prompt": "a", "completion": "b"}) + "\n", 1, id="id_of_512_chars"
    ),
]


@pytest.mark.parametrize("name, content, count", VALID_BUT_UNUSUAL)
def test_valid_but_unusual_file_is_accepted(tmp_path, name, content, count):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", newline="")
    result = call_pact("data", path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"examples: {count}\n" in result.stdout


def test_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    outcome: list[Exception | None] = []

    def load() -> None:
        try:
            load_examples(fifo)
            outcome.append(None)
        except Exception as exc:  # handed to the main thread
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(2)
    blocked = reader.is_alive()
    if blocked:  # unblock the reader: open and close the write end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
    assert not blocked, "load_examples blocked on a FIFO"
    assert isinstance(outcome[0], PactError)
    assert_one_line_message(str(outcome[0]), r"^data file .*/rows\.jsonl is not a regular file$")


def test_unreadable_file_gives_one_line(tmp_path, monkeypatch):
    path = tmp_path / "locked.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(PactError) as info:
        load_examples(path)
    assert_one_line_message(str(info.value), r"^cannot read data file .*/locked\.jsonl: Permission denied$")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_device_file_is_refused_not_read():
    """/dev/zero never ends: reading it would fill memory."""
    with pytest.raises(PactError) as info:
        load_examples(Path("/dev/zero"))
    assert_one_line_message(str(info.value), r"^data file /dev/zero is not a regular file$")


# -- damaged stores ----------------------------------------------------------------------------

OK = "<query succeeds>"
SURFACES = ("sql", "reader", "safety")
SQL_PROBE = "SELECT count(*) AS n, sum(logprob) AS total FROM confidences"


@dataclass(frozen=True)
class Damage:
    """One way to break a store. Expectations per surface: a regex for the one error line,
    OK (sql only: the query must still succeed), or None (surface not concerned)."""

    name: str
    apply: Callable[[Store, Path], None]
    sql: str | None = None
    reader: str | None = None
    safety: str | None = None
    bugs: dict[str, str] = field(default_factory=dict)


def _read_manifest(store: Store) -> dict:
    return json.loads(store.manifest_path.read_text(encoding="utf-8"))


def _write_manifest(store: Store, manifest: object) -> None:
    store.manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


def _manifest_text(content: str | bytes) -> Callable[[Store, Path], None]:
    def apply(store: Store, outside: Path) -> None:
        data = content.encode("utf-8") if isinstance(content, str) else content
        store.manifest_path.write_bytes(data)

    return apply


def _edit_manifest(change: Callable[[dict, Store, Path], None]) -> Callable[[Store, Path], None]:
    def apply(store: Store, outside: Path) -> None:
        manifest = _read_manifest(store)
        change(manifest, store, outside)
        _write_manifest(store, manifest)

    return apply


def _first_path(value: object) -> Callable[[Store, Path], None]:
    """Point the manifest's first part at `value` (a callable gets (store, outside))."""

    def change(manifest: dict, store: Store, outside: Path) -> None:
        manifest["parts"][0]["path"] = value(store, outside) if callable(value) else value

    return _edit_manifest(change)


def _part(store: Store, kind: str = "targets") -> Path:
    entry = next(p for p in _read_manifest(store)["parts"] if p["kind"] == kind)
    return store.root / entry["path"]


def _flip(path: Path, positions: range) -> None:
    data = bytearray(path.read_bytes())
    for i in positions:
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def _flip_values_page_header(store: Store, outside: Path) -> None:
    path = _part(store)
    column = pq.ParquetFile(path).metadata.row_group(0).column(7)  # full_logprobs
    _flip(path, range(column.data_page_offset, column.data_page_offset + 12))


def _flip_footer(store: Store, outside: Path) -> None:
    path = _part(store)
    data = path.read_bytes()
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    _flip(path, range(footer_start + 4, footer_start + 40, 2))


def _truncate_part(store: Store, outside: Path) -> None:
    path = _part(store)
    path.write_bytes(path.read_bytes()[:-100])


def _rewrite_part(kind: str, change: Callable[[pa.Table], pa.Table]) -> Callable[[Store, Path], None]:
    def apply(store: Store, outside: Path) -> None:
        path = _part(store, kind)
        pq.write_table(change(pq.read_table(path)), path)

    return apply


def _values(table: pa.Table, column: str) -> np.ndarray:
    array = table.column(column).combine_chunks()
    return array.flatten().to_numpy().astype(np.float32).reshape(len(array), -1)


def _set_values(table: pa.Table, column: str, values: np.ndarray) -> pa.Table:
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return table.set_column(table.schema.get_field_index(column), column, array)


def _poke(column: str, value: float) -> Callable[[pa.Table], pa.Table]:
    def change(table: pa.Table) -> pa.Table:
        values = _values(table, column)
        values[1, 1] = value
        return _set_values(table, column, values)

    return change


def _narrow_values(table: pa.Table) -> pa.Table:
    return _set_values(table, "full_logprobs", _values(table, "full_logprobs")[:, :2].copy())


def _scramble_steps(table: pa.Table) -> pa.Table:
    steps = table.column("step").to_numpy().copy()
    first = table.column("example_id").to_pylist().count(table.column("example_id")[0].as_py())
    steps[:first] = steps[:first][::-1]
    return table.set_column(table.schema.get_field_index("step"), "step", pa.array(steps, pa.int32()))


def _symlink_part(store: Store, outside: Path) -> None:
    link = store.root / "targets" / "part-s0of1-link.parquet"
    os.symlink(outside / "outside.parquet", link)
    manifest = _read_manifest(store)
    next(p for p in manifest["parts"] if p["kind"] == "targets")["path"] = "targets/part-s0of1-link.parquet"
    _write_manifest(store, manifest)


def _symlink_targets_dir(store: Store, outside: Path) -> None:
    shutil.move(str(store.root / "targets"), str(outside / "targets"))
    os.symlink(outside / "targets", store.root / "targets")


def _safety_bytes(change: Callable[[bytes], bytes]) -> Callable[[Store, Path], None]:
    def apply(store: Store, outside: Path) -> None:
        path = store.root / "safety_tokens.safetensors"
        path.write_bytes(change(path.read_bytes()))

    return apply


def _safety_tensors(ids: list[int], vector_entries: dict[int, float], *, drop: tuple = ()) -> Callable[[Store, Path], None]:
    def apply(store: Store, outside: Path) -> None:
        vector = np.zeros(20, np.float32)
        for index, value in vector_entries.items():
            vector[index] = value
        tensors = {
            "ids": np.array(ids, np.int64),
            "weights": np.maximum(vector[[i for i in ids if i < 20]], 0).astype(np.float32),
            "vector": vector,
        }
        save_file({k: v for k, v in tensors.items() if k not in drop}, str(store.root / "safety_tokens.safetensors"))

    return apply


def _replace_safety_with_directory(store: Store, outside: Path) -> None:
    path = store.root / "safety_tokens.safetensors"
    path.unlink()
    path.mkdir()


OUTSIDE = r"manifest path .* points outside the store"
REPAIR = r"run `pact store repair .*/store`, then rerun `pact precompute`$"  # followed in tests/hostile/test_hostile_repair.py
UNREADABLE = r"store part part-s0of1-\w+\.parquet is unreadable \(.+\); " + REPAIR
WRONG_SCHEMA = (
    rf"store part part-s0of1-\w+\.parquet does not have the expected columns and types for {S} safety "
    r"tokens \(corrupted or foreign part\?\); " + REPAIR
)
SYMLINKED = r"manifest path .* is reached through the symbolic link targets(/part-s0of1-\w+\.parquet)? \(a store is one directory: move the whole store instead\); " + REPAIR
SQL_ERROR = r"^error: SQL error: "
NOT_JSON = r"manifest\.json is not valid JSON \(.+\); corrupted manifest\?$"
BAD_SAFETY_FILE = r"safety_tokens\.safetensors is not a readable safetensors file \(.+\)$"
BAD_COUNT = r"manifest\.json: safety_tokens\.count {} is not an integer from 1 to 16777216 \(corrupted manifest\?\)$"
CONTROL_PATH = r"manifest path 'targets/part\\x00\.parquet' contains control characters \(tampered manifest\?\)$"
PART = r"targets/part-s0of1-\w+\.parquet"

DAMAGES = [
    Damage("part_values_page_header_corrupted", _flip_values_page_header, sql=SQL_ERROR + r".*TProtocolException",
           reader=UNREADABLE),
    Damage("part_footer_corrupted", _flip_footer, sql=UNREADABLE, reader=UNREADABLE),
    Damage("part_truncated", _truncate_part, sql=UNREADABLE, reader=UNREADABLE),
    Damage("part_zero_bytes", lambda s, o: _part(s).write_bytes(b""), sql=UNREADABLE, reader=UNREADABLE),
    Damage("part_missing", lambda s, o: _part(s).unlink(),
           sql=rf"^error: store part {PART} is listed in the manifest but missing; " + REPAIR,
           reader=rf"^store part {PART} is listed in the manifest but missing; " + REPAIR),
    Damage("part_without_values_column", _rewrite_part("targets", lambda t: t.drop_columns(["full_logprobs"])),
           sql=WRONG_SCHEMA, reader=WRONG_SCHEMA),
    Damage("part_values_of_wrong_width", _rewrite_part("targets", _narrow_values), sql=WRONG_SCHEMA,
           reader=WRONG_SCHEMA),
    Damage("part_step_as_string", _rewrite_part("targets", lambda t: t.set_column(
        3, "step", pa.array([str(v) for v in t.column("step").to_pylist()]))), sql=WRONG_SCHEMA,
           reader=WRONG_SCHEMA),
    Damage("part_steps_out_of_order", _rewrite_part("targets", _scramble_steps),
           reader=r"^store part part-s0of1-\w+\.parquet: steps are not 0\.\.T-1 per example \(corrupted part\?\); " + REPAIR),
    Damage("part_nan_in_full_logprobs", _rewrite_part("targets", _poke("full_logprobs", np.nan)), sql=OK,
           reader=r"^example ex\d: stored targets contain NaN or inf \(corrupted part\?\); rerun pact precompute over the same data to recompute them$"),
    Damage("part_inf_in_post_logprobs", _rewrite_part("post", _poke("post_logprobs", np.inf)), sql=OK,
           reader=r"^example ex\d: stored targets contain NaN or inf \(corrupted part\?\); rerun pact precompute over the same data to recompute them$"),
    Damage("tokens_parquet_garbage", lambda s, o: (s.root / "tokens.parquet").write_bytes(b"PAR1 junk"),
           sql=r"tokens\.parquet is unreadable \(.+\); rerun the `pact tokens` command that wrote the store$"),
    Damage("manifest_truncated_json", _manifest_text('{"schema_version": 1, "parts": ['),
           sql=NOT_JSON, reader=NOT_JSON, safety=NOT_JSON),
    Damage("manifest_empty", _manifest_text(""), sql=NOT_JSON, reader=NOT_JSON, safety=NOT_JSON),
    Damage("manifest_invalid_utf8", _manifest_text(b'{"schema_version": 1, "parts": [], "x": "\xff"}'),
           sql=NOT_JSON, reader=NOT_JSON, safety=NOT_JSON),
    Damage("manifest_deeply_nested", _manifest_text("[" * 50_000 + "]" * 50_000),
           **dict.fromkeys(SURFACES, r"manifest\.json is not valid JSON \(nested too deeply\); corrupted manifest\?$")),
    Damage("manifest_is_a_list", _manifest_text("[]"), sql=r"is not a JSON object", reader=r"is not a JSON object",
           safety=r"is not a JSON object"),
    Damage("manifest_schema_version_2", _edit_manifest(lambda m, s, o: m.update(schema_version=2)),
           sql=r"schema_version 2; this pact reads version 1", reader=r"schema_version 2", safety=r"schema_version 2"),
    Damage("manifest_schema_version_missing", _edit_manifest(lambda m, s, o: m.pop("schema_version")),
           sql=r"schema_version None", reader=r"schema_version None", safety=r"schema_version None"),
    Damage("manifest_parts_not_a_list", _edit_manifest(lambda m, s, o: m.update(parts="targets/x.parquet")),
           sql=r"'parts' is not a list", reader=r"'parts' is not a list", safety=r"'parts' is not a list"),
    Damage("manifest_part_not_an_object", _edit_manifest(lambda m, s, o: m["parts"].append(7)),
           sql=r"malformed part entry 7", reader=r"malformed part entry 7", safety=r"malformed part entry 7"),
    Damage("manifest_part_unknown_kind", _edit_manifest(lambda m, s, o: m["parts"][0].update(kind="evil")),
           sql=r"malformed part entry", reader=r"malformed part entry", safety=r"malformed part entry"),
    Damage("manifest_safety_entry_not_an_object", _edit_manifest(lambda m, s, o: m.update(safety_tokens="x")),
           sql=r"'safety_tokens' is not an object", reader=r"'safety_tokens' is not an object",
           safety=r"'safety_tokens' is not an object"),
    Damage("manifest_safety_count_not_an_int",
           _edit_manifest(lambda m, s, o: m["safety_tokens"].update(count="3; DROP VIEW targets")),
           **dict.fromkeys(SURFACES, BAD_COUNT.format(r"'3; DROP VIEW targets'"))),
    Damage("manifest_safety_count_is_a_bool", _edit_manifest(lambda m, s, o: m["safety_tokens"].update(count=True)),
           **dict.fromkeys(SURFACES, BAD_COUNT.format("True"))),
    Damage("manifest_safety_count_zero", _edit_manifest(lambda m, s, o: m["safety_tokens"].update(count=0)),
           **dict.fromkeys(SURFACES, BAD_COUNT.format("0"))),
    Damage("path_parent_traversal", _first_path("../outside/outside.parquet"), sql=OUTSIDE, reader=OUTSIDE,
           safety=OUTSIDE),
    Damage("path_absolute", _first_path(lambda s, o: str(o / "outside.parquet")), sql=OUTSIDE, reader=OUTSIDE,
           safety=OUTSIDE),
    Damage("path_traversal_inside_targets", _first_path("targets/../../outside/outside.parquet"),
           sql=OUTSIDE, reader=OUTSIDE, safety=OUTSIDE),
    Damage("path_backslashes", _first_path("targets\\..\\..\\outside\\outside.parquet"), sql=OUTSIDE, reader=OUTSIDE,
           safety=OUTSIDE),
    Damage("path_not_a_string", _first_path(5), sql=r"manifest path 5 is not a non-empty string",
           reader=r"manifest path 5 is not a non-empty string", safety=r"manifest path 5 is not a non-empty string"),
    Damage("path_empty", _first_path(""), sql=r"manifest path '' is not a non-empty string",
           reader=r"manifest path '' is not a non-empty string", safety=r"manifest path '' is not a non-empty string"),
    Damage("path_nul_byte", _first_path("targets/part\x00.parquet"), **dict.fromkeys(SURFACES, CONTROL_PATH)),
    Damage("path_symlink_to_outside_file", _symlink_part, sql=SYMLINKED, reader=SYMLINKED),
    Damage("path_through_symlinked_directory", _symlink_targets_dir, sql=SYMLINKED, reader=SYMLINKED),
    Damage("path_names_the_manifest", _first_path("manifest.json"),
           sql=r"store part manifest\.json is unreadable \(.+\); " + REPAIR,
           reader=r"^store part manifest\.json is unreadable \(.+\); " + REPAIR),
    Damage("safety_file_garbage", _safety_bytes(lambda b: b"\x00" * 100), sql=OK, safety=BAD_SAFETY_FILE),
    Damage("safety_file_truncated", _safety_bytes(lambda b: b[:-10]), safety=BAD_SAFETY_FILE),
    Damage("safety_file_header_too_large", _safety_bytes(lambda b: (2**62).to_bytes(8, "little") + b"{}"),
           safety=BAD_SAFETY_FILE),
    Damage("safety_file_replaced", _safety_tensors([2, 5, 7], {2: 0.5, 5: -0.2, 7: 0.1}),
           safety=r"does not match the manifest's safety-token fingerprint \(file replaced after `pact tokens`\?\)"),
    Damage("safety_file_nan", _safety_tensors([3, 5, 7], {3: 0.5, 5: np.nan, 7: 0.1}),
           safety=r"safety_tokens\.safetensors holds non-finite values"),
    Damage("safety_file_missing_tensors", _safety_tensors([3, 5, 7], {3: 0.5, 5: -0.2, 7: 0.1}, drop=("ids", "weights")),
           safety=r"lacks tensors \['ids', 'weights'\]"),
    Damage("safety_file_ids_tampered", _safety_tensors([3, 5, 8], {3: 0.5, 5: -0.2, 7: 0.1}),
           safety=r"ids/weights disagree with the stored vector \(tampered file\?\)"),
    Damage("safety_file_deleted", lambda s, o: (s.root / "safety_tokens.safetensors").unlink(),
           sql=OK, safety=r"has no safety-token set: run `pact tokens` first"),
    Damage("safety_file_is_a_directory", _replace_safety_with_directory,
           safety=r"has no safety-token set: run `pact tokens` first"),
]


@pytest.fixture(scope="module")
def damaged_stores(tmp_path_factory):
    """name -> (case dir, store, snapshot). Each case dir holds `store/` (a valid store, then
    damaged) and `outside/` (a copy of a part, for tampered paths to point at)."""
    template = Store(tmp_path_factory.mktemp("template") / "store")
    make_safety(template)
    fill(template, count=7, per_part=3)
    cases = {}
    for damage in DAMAGES:
        case_dir = tmp_path_factory.mktemp(damage.name)
        store = Store(case_dir / "store")
        shutil.copytree(template.root, store.root)
        outside = case_dir / "outside"
        outside.mkdir()
        shutil.copy(_part(store), outside / "outside.parquet")
        damage.apply(store, outside)
        cases[damage.name] = (case_dir, store, snapshot(case_dir))
    return cases


def _damage_params():
    for damage in DAMAGES:
        for surface in SURFACES:
            if getattr(damage, surface) is None:
                continue
            bug = damage.bugs.get(surface)
            marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
            yield pytest.param(damage, surface, id=f"{damage.name}-{surface}", marks=marks)


def _read_everything(store: Store) -> None:
    reader = TargetReader(store)
    for example_id in reader.example_ids():
        reader.get(example_id)


def test_damage_cases_are_many_and_distinct():
    assert len(DAMAGES) >= 30
    assert len({d.name for d in DAMAGES}) == len(DAMAGES)


@pytest.mark.parametrize("damage, surface", list(_damage_params()))
def test_damaged_store_gives_one_clear_line(damaged_stores, damage, surface):
    case_dir, store, before = damaged_stores[damage.name]
    expected = getattr(damage, surface)
    if surface == "sql":
        result = call_pact("sql", store.root, SQL_PROBE)
        if expected == OK:
            assert result.returncode == 0, result.stderr[-2000:]
        else:
            assert_one_error_line(result, expected)
    else:
        check = _read_everything if surface == "reader" else load_safety_set
        with pytest.raises(PactError) as info:
            check(store)
        assert_one_line_message(str(info.value), expected)
    assert describe_changes(before, snapshot(case_dir)) == ""


def test_real_entry_point_prints_the_same_line(damaged_stores):
    """`python -m pact ...` subprocesses print exactly the line call_pact captured."""
    data_cases = [c for c in CASES if c.name in ("truncated_last_line.jsonl", "nan_completion.parquet")]
    damage = next(d for d in DAMAGES if d.name == "path_parent_traversal")
    store_root = damaged_stores[damage.name][1].root
    commands = [["data", FILES / c.name] for c in data_cases] + [["sql", store_root, SQL_PROBE]]
    patterns = [c.error for c in data_cases] + [damage.sql]
    for command, pattern, result in zip(commands, patterns, run_pact_many(commands), strict=True):
        assert assert_one_error_line(result, pattern) + "\n" == call_pact(*command).stderr


def test_undamaged_template_reads_cleanly(tmp_path):
    """Control: the same checks pass on the store before any damage."""
    store = Store(tmp_path / "store")
    make_safety(store)
    fill(store, count=7, per_part=3)
    before = snapshot(tmp_path)
    _read_everything(store)
    assert load_safety_set(store).size == S
    result = call_pact("sql", store.root, SQL_PROBE)
    assert result.returncode == 0, result.stderr
    assert describe_changes(before, snapshot(tmp_path)) == ""
