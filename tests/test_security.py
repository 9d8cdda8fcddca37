"""Security: weights only through safetensors, no unpickling, no remote code unless asked,
`pact sql` read-only and confined to the store (and the stores it attaches), manifest paths
relative and inside the store.

Static guards (an AST scan of pipeline/, trainer/, store/) cover what cannot be exercised;
everything else runs: tiny models built here, `pact sql` through `pact.pipeline.cli.main` (a
sample also as `python -m pact` subprocesses, which must print the same line).
Known bugs are strict xfails naming the fix they wait for.
"""

from __future__ import annotations

import ast
import inspect
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from hostile.harness import (
    ROOT,
    assert_one_error_line,
    call_pact,
    describe_changes,
    run_pact_many,
    snapshot,
)
from store_fixtures import fill, make_safety

import pact.core.models
from pact.core.errors import PactError
from pact.core.models import load_model, load_tokenizer, model_fingerprint
from pact.store import Store, TargetReader
from pact.store.manifest import check_relative_path

PACKAGES = ("pact", "pipeline", "trainer", "store", "tools")  # tools/: the demo asset builder
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
MODEL_CLASS = re.compile(r"^AutoModel\w*$|^\w+For[A-Z]\w*$")

# -- static guards ---------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _call_violations(call: ast.Call) -> list[str]:
    name = _dotted(call.func)
    found = []
    if name in ("eval", "exec"):
        found.append(f"{name}() of a string")
    if name == "torch.load" and not _is_const(_keyword(call, "weights_only"), True):
        found.append("torch.load without weights_only=True")
    if _is_const(_keyword(call, "allow_pickle"), True):
        found.append("allow_pickle=True")
    if _is_const(_keyword(call, "trust_remote_code"), True):
        found.append("trust_remote_code=True hard-coded")
    if _is_const(_keyword(call, "use_safetensors"), False):
        found.append("use_safetensors=False")
    if name.endswith(".from_pretrained") and MODEL_CLASS.match(name.split(".")[-2]):
        if not _is_const(_keyword(call, "use_safetensors"), True):
            found.append(f"{name}() without use_safetensors=True")
    if name.split(".")[-1] == "option" and call.args and _is_const_str(call.args[0], "--trust-remote-code"):
        if not _is_const(_keyword(call, "is_flag"), True) or _is_const(_keyword(call, "default"), True):
            found.append("--trust-remote-code is not an off-by-default flag")
    return found


def _is_const_str(node: ast.AST, text: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == text


def violations(source: str) -> list[str]:
    """Security rule violations in Python `source`, as 'line N: what' strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
            found += [f"line {line}: imports {b}" for b in bad]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"line {line}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            found += [f"line {line}: {v}" for v in _call_violations(node)]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True) if d is not None]
            found += [
                f"line {line}: {node.name}(trust_remote_code=...) does not default to False"
                for arg, default in pairs
                if arg.arg == "trust_remote_code" and not _is_const(default, False)
            ]
        elif isinstance(node, ast.AnnAssign) and _dotted(node.target) == "trust_remote_code":
            default = node.value
            if isinstance(default, ast.Call) and _dotted(default.func) == "setting" and default.args:
                default = default.args[0]  # pact.core.config.setting(default, help=...)
            if default is not None and not _is_const(default, False):
                found.append(f"line {line}: field trust_remote_code does not default to False")
    return found


def _package_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


KNOWN_VIOLATIONS: dict[str, str] = {}


def _file_params():
    for path in _package_files():
        relative = path.relative_to(ROOT).as_posix()
        reason = KNOWN_VIOLATIONS.get(relative)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(path, id=relative, marks=marks)


@pytest.mark.parametrize("path", list(_file_params()))
def test_source_follows_the_security_rules(path):
    assert violations(path.read_text(encoding="utf-8")) == []


def test_guard_catches_every_rule():
    """The scanner is not vacuous: each rule fires on a line that breaks it."""
    source = """
import pickle
from dill import loads
import torch, click
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
numpy.load("x.npy", allow_pickle=True)
AutoModelForCausalLM.from_pretrained("m")
transformers.LlamaForCausalLM.from_pretrained("m", use_safetensors=False)
AutoTokenizer.from_pretrained("m", trust_remote_code=True)
eval("1 + 1")
def load(path, trust_remote_code=True): ...
def load2(path, *, trust_remote_code=None): ...
class Options:
    trust_remote_code: bool = True
click.option("--trust-remote-code", default=True)
class Config:
    trust_remote_code: bool = setting(True, help="...")
"""
    found = violations(source)
    expected = [
        "line 2: imports pickle",
        "line 3: imports from dill",
        "line 5: torch.load without weights_only=True",
        "line 6: torch.load without weights_only=True",
        "line 7: allow_pickle=True",
        "line 8: AutoModelForCausalLM.from_pretrained() without use_safetensors=True",
        "line 9: use_safetensors=False",
        "line 9: transformers.LlamaForCausalLM.from_pretrained() without use_safetensors=True",
        "line 10: trust_remote_code=True hard-coded",
        "line 11: eval() of a string",
        "line 12: load(trust_remote_code=...) does not default to False",
        "line 13: load2(trust_remote_code=...) does not default to False",
        "line 15: field trust_remote_code does not default to False",
        "line 16: --trust-remote-code is not an off-by-default flag",
        "line 18: field trust_remote_code does not default to False",
    ]
    assert sorted(found) == sorted(expected)
    clean = """
torch.load("x.pt", map_location="cpu", weights_only=True)
AutoModelForCausalLM.from_pretrained("m", use_safetensors=True, trust_remote_code=flag)
AutoTokenizer.from_pretrained("m", trust_remote_code=trust_remote_code)
PeftModel.from_pretrained(model, "adapter")
model.eval()
def load(path, *, trust_remote_code: bool = False): ...
click.option("--trust-remote-code", is_flag=True)
"""
    assert violations(clean) == []


def test_guard_scans_the_packages():
    files = {p.relative_to(ROOT).as_posix() for p in _package_files()}
    assert {"pact/core/models.py", "store/sql.py", "store/manifest.py", "pact/core/data.py", "tools/demo_assets/build_assets.py"} <= files


@pytest.mark.parametrize("function", [load_model, load_tokenizer])
def test_trust_remote_code_is_off_by_default(function):
    parameter = inspect.signature(function).parameters["trust_remote_code"]
    assert parameter.default is False
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY


# -- model loading: safetensors only, no pickle, no remote code ------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny import make_model, make_tokenizer

    directory = tmp_path_factory.mktemp("model")
    tokenizer = make_tokenizer(directory)
    make_model(directory, len(tokenizer))
    return directory


class _FileCreatingPayload:
    """Unpickling this opens (creates) `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if anything calls torch.load; returns the list of attempted calls."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError(f"torch.load called with {args} {kwargs}")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def test_pickle_only_model_directory_is_refused(tmp_path, tiny_model_dir, no_torch_load):
    from safetensors.torch import load_file

    directory = tmp_path / "bin_only"
    directory.mkdir()
    shutil.copy(tiny_model_dir / "config.json", directory)
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), directory / "pytorch_model.bin")
    expected = r"has no \*\.safetensors weights \(found pytorch_model\.bin: pact loads safetensors only, no pickle\)"
    with pytest.raises(PactError, match=expected):
        load_model(directory, device="cpu")
    with pytest.raises(PactError, match=expected):
        model_fingerprint(directory)
    assert no_torch_load == []


def test_pickle_payload_beside_safetensors_never_runs(tmp_path, tiny_model_dir, no_torch_load):
    payload = pickle.dumps({"weights": _FileCreatingPayload(tmp_path / "control")})
    pickle.loads(payload)
    assert (tmp_path / "control").exists(), "the payload must be live for this test to mean anything"
    marker = tmp_path / "PWNED"
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (directory / name).write_bytes(pickle.dumps({"weights": _FileCreatingPayload(marker)}))
    model = load_model(directory, device="cpu")
    load_tokenizer(directory)
    model_fingerprint(directory)
    assert model.config.vocab_size > 0
    assert not marker.exists(), "a pickle from the model directory was unpickled"
    assert no_torch_load == []


def _with_remote_code(source: Path, destination: Path, marker: Path, *, config_file: str) -> Path:
    shutil.copytree(source, destination)
    module = (
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    (destination / "evil.py").write_text(module)
    config = json.loads((destination / config_file).read_text())
    if config_file == "config.json":
        config.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})
    (destination / config_file).write_text(json.dumps(config))
    return destination


def test_remote_model_code_is_not_run_by_default(tmp_path, tiny_model_dir):
    marker = tmp_path / "PWNED"
    directory = _with_remote_code(tiny_model_dir, tmp_path / "m", marker, config_file="config.json")
    with pytest.raises(PactError, match=r"cannot load a model from .*custom code"):
        load_model(directory, device="cpu")
    assert not marker.exists()


def test_custom_code_beside_a_known_model_type_is_never_imported(tmp_path, tiny_model_dir, capsys):
    """Attack rerun N17: `auto_map` to `evil.py` with `model_type` still `llama` loads
    transformers' own Llama class (as Phi-3's configs, which carry an auto_map, load);
    the custom module is never imported."""
    marker = tmp_path / "PWNED"
    directory = _with_remote_code(tiny_model_dir, tmp_path / "m", marker, config_file="config.json")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama"
    (directory / "config.json").write_text(json.dumps(config))
    model = load_model(directory, device="cpu")
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not marker.exists()
    assert capsys.readouterr().err.strip().endswith(
        "names custom model code (auto_map); it was not run: transformers' own LlamaForCausalLM was loaded "
        "(--trust-remote-code runs it)"
    )


def test_remote_tokenizer_code_is_not_run_by_default(tmp_path, tiny_model_dir):
    marker = tmp_path / "PWNED"
    directory = _with_remote_code(tiny_model_dir, tmp_path / "t", marker, config_file="tokenizer_config.json")
    with pytest.raises(PactError, match=r"cannot load a tokenizer from .*custom code"):
        load_tokenizer(directory)
    assert not marker.exists()


def test_models_module_documents_the_policy():
    assert "safetensors" in pact.core.models.__doc__ and "trust_remote_code" in pact.core.models.__doc__


# -- pact sql: read-only, confined to the store ----------------------------------------------

SECRET = "TOP-SECRET-7f3a"
READ_ONLY = r"^error: pact sql is read-only: {} statements are not allowed \(only SELECT\)$"
DENIED = r"^error: SQL error: Permission Error: Cannot access (file|directory) "
OK = "<query succeeds>"

SQL_CASES = [
    ("drop_view", "DROP VIEW targets", READ_ONLY.format("DROP")),
    ("insert", "INSERT INTO evals VALUES ('e', 'm', 'f', 'd', 'x', 0, 1.0, 1, 0.0)", READ_ONLY.format("INSERT")),
    ("update", "UPDATE evals SET value = 0", READ_ONLY.format("UPDATE")),
    ("delete", "DELETE FROM evals", READ_ONLY.format("DELETE")),
    ("create_table", "CREATE TABLE t AS SELECT * FROM targets", READ_ONLY.format("CREATE")),
    ("create_macro", "CREATE MACRO m() AS 1", READ_ONLY.format("CREATE")),
    ("alter_view", "ALTER VIEW targets RENAME TO t2", READ_ONLY.format("ALTER")),
    ("copy_to_manifest", "COPY (SELECT 1 AS a) TO '{store}/manifest.json' (FORMAT csv)", READ_ONLY.format("COPY")),
    ("copy_to_outside", "COPY targets TO '{outside}/leak.parquet'", READ_ONLY.format("COPY")),
    ("copy_from_outside", "COPY evals FROM '{outside}/secret.csv'", READ_ONLY.format("COPY")),
    ("export_database", "EXPORT DATABASE '{outside}/export'", READ_ONLY.format("EXPORT")),
    ("attach", "ATTACH '{store}/evil.duckdb' AS evil", READ_ONLY.format("ATTACH")),
    ("detach", "DETACH memory", READ_ONLY.format("DETACH")),
    ("install", "INSTALL httpfs", READ_ONLY.format("(INSTALL|LOAD)")),
    ("force_install_from_url", "FORCE INSTALL httpfs FROM 'http://127.0.0.1:9'", READ_ONLY.format("(INSTALL|LOAD)")),
    ("load_extension", "LOAD httpfs", READ_ONLY.format("LOAD")),
    ("load_extension_file", "LOAD '{outside}/evil.duckdb_extension'", READ_ONLY.format("LOAD")),
    ("set_external_access", "SET enable_external_access = true", READ_ONLY.format("SET")),
    ("set_allowed_directories", "SET allowed_directories = ['/']", READ_ONLY.format("SET")),
    ("reset_lock", "RESET lock_configuration", READ_ONLY.format("SET")),
    ("pragma", "PRAGMA enable_profiling", READ_ONLY.format("PRAGMA")),
    ("call", "CALL duckdb_settings()", READ_ONLY.format("CALL")),
    ("checkpoint", "CHECKPOINT", READ_ONLY.format(r"\w+")),
    ("prepare", "PREPARE p AS SELECT 1", READ_ONLY.format("PREPARE")),
    ("transaction", "BEGIN TRANSACTION", READ_ONLY.format("TRANSACTION")),
    ("vacuum", "VACUUM", READ_ONLY.format("VACUUM")),
    ("select_then_drop", "SELECT 1; DROP VIEW targets", READ_ONLY.format("DROP")),
    ("drop_after_comment", "SELECT 1 /* ; */; -- x\nDROP VIEW targets", READ_ONLY.format("DROP")),
    # EXPLAIN ANALYZE executes the statement it explains, so every EXPLAIN is refused.
    ("explain_analyze_copy_over_manifest",
     "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{store}/manifest.json' (FORMAT csv)", READ_ONLY.format("EXPLAIN")),
    ("explain_analyze_copy_new_part",
     "EXPLAIN ANALYZE COPY (SELECT * FROM targets) TO '{store}/targets/part-evil.parquet'",
     READ_ONLY.format("EXPLAIN")),
    ("explain_copy", "EXPLAIN COPY targets TO '{store}/x.parquet'", READ_ONLY.format("EXPLAIN")),
    ("explain_select", "EXPLAIN SELECT * FROM targets", READ_ONLY.format("EXPLAIN")),
    ("explain_analyze_select", "EXPLAIN ANALYZE SELECT count(*) FROM targets", READ_ONLY.format("EXPLAIN")),
    ("select_then_explain", "SELECT 1; EXPLAIN ANALYZE SELECT 1", READ_ONLY.format("EXPLAIN")),
    ("read_csv_outside", "SELECT * FROM read_csv('{outside}/secret.csv')", DENIED),
    ("read_text_traversal", "SELECT * FROM read_text('{store}/../outside/secret.csv')", DENIED),
    ("read_parquet_outside", "SELECT * FROM read_parquet('{outside}/secret.parquet')", DENIED),
    ("read_json_outside", "SELECT * FROM read_json('{outside}/secret.json')", DENIED),
    ("read_blob_etc", "SELECT * FROM read_blob('/etc/passwd')", DENIED),
    ("glob_outside", "SELECT * FROM glob('{outside}/*')", DENIED),
    ("file_url", "SELECT * FROM read_text('file://{outside}/secret.csv')", DENIED),
    ("symlink_in_store", "SELECT * FROM read_text('{store}/link.csv')", DENIED),
    ("parquet_metadata_outside", "SELECT * FROM parquet_metadata('{outside}/secret.parquet')", DENIED),
    ("control_select", "SELECT count(*) AS n FROM targets", OK),
    ("control_with_cte", "WITH t AS (SELECT * FROM targets) SELECT count(*) FROM t", OK),
    ("control_read_inside_store", "SELECT count(*) FROM read_text('{store}/manifest.json')", OK),
    ("control_glob_inside_store", "SELECT count(*) FROM glob('{store}/targets/*.parquet')", OK),
    # `attached_*` cases run with `--attach b={other}`: {other} is the attached store (holding
    # link.csv -> outside/secret.csv), {sibling} a directory beside it whose name starts with
    # the attached store's name. The attached store is as closed as the main one.
    ("attached_copy_over_its_manifest", "COPY (SELECT 1 AS a) TO '{other}/manifest.json' (FORMAT csv)", READ_ONLY.format("COPY")),
    ("attached_copy_new_part_into_it", "COPY (SELECT * FROM b.targets) TO '{other}/targets/part-evil.parquet'",
     READ_ONLY.format("COPY")),
    ("attached_copy_its_targets_outside", "COPY b.targets TO '{outside}/leak.parquet'", READ_ONLY.format("COPY")),
    ("attached_explain_analyze_copy_into_it", "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{other}/x.csv'",
     READ_ONLY.format("EXPLAIN")),
    ("attached_drop_view", "DROP VIEW b.targets", READ_ONLY.format("DROP")),
    ("attached_drop_schema", "DROP SCHEMA b CASCADE", READ_ONLY.format("DROP")),
    ("attached_create_view_in_it", "CREATE VIEW b.evil AS SELECT 1", READ_ONLY.format("CREATE")),
    ("attached_sql_attach_in_its_dir", "ATTACH '{other}/evil.duckdb' AS evil", READ_ONLY.format("ATTACH")),
    ("attached_sql_attach_outside_read_only", "ATTACH '{outside}/x.duckdb' AS x (READ_ONLY)", READ_ONLY.format("ATTACH")),
    ("attached_select_then_attach", "SELECT 1; ATTACH '{other}/evil.duckdb'", READ_ONLY.format("ATTACH")),
    ("attached_use_schema", "USE b", READ_ONLY.format("SET")),
    ("attached_widen_allowed_directories", "SET allowed_directories = ['{other}/', '{outside}/']", READ_ONLY.format("SET")),
    ("attached_read_csv_outside_both", "SELECT * FROM read_csv('{outside}/secret.csv')", DENIED),
    ("attached_read_text_traversal_from_it", "SELECT * FROM read_text('{other}/../outside/secret.csv')", DENIED),
    ("attached_read_text_sibling_with_same_prefix", "SELECT * FROM read_text('{sibling}/secret.csv')", DENIED),
    ("attached_symlink_in_it", "SELECT * FROM read_text('{other}/link.csv')", DENIED),
    ("attached_glob_outside_both", "SELECT * FROM glob('{outside}/*')", DENIED),
    ("attached_parquet_outside_joined_to_it",
     "SELECT * FROM b.targets, read_parquet('{outside}/secret.parquet')", DENIED),
    ("attached_control_join_both_stores", "SELECT count(*) FROM targets a JOIN b.targets b USING (example_id, step)", OK),
    ("attached_control_read_inside_it", "SELECT count(*) FROM read_text('{other}/manifest.json')", OK),
    ("attached_control_its_confidences", "SELECT count(*) FROM b.confidences", OK),
]


def _sql_params():
    for name, sql, expected, *bug in SQL_CASES:  # a 4th element: a known bug, the test a strict xfail
        marks = [pytest.mark.xfail(strict=True, reason=bug[0])] if bug else []
        yield pytest.param(name, sql, expected, id=name, marks=marks)


def _store_with_outside(case_dir: Path, template: Store) -> tuple[Store, Path]:
    """`case_dir/store` (a copy of `template`, plus link.csv -> outside) and `case_dir/outside`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(case_dir / "store")
    shutil.copytree(template.root, store.root)
    outside = case_dir / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(f"a\n{SECRET}\n")
    (outside / "secret.json").write_text(json.dumps([{"a": SECRET}]))
    pq.write_table(pa.table({"a": [SECRET]}), outside / "secret.parquet")
    (store.root / "link.csv").symlink_to(outside / "secret.csv")
    return store, outside


@pytest.fixture(scope="module")
def template_store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("template") / "store")
    make_safety(store)
    fill(store, count=4, per_part=2)
    return store


def _prepare(tmp_path: Path, template: Store, sql: str) -> tuple[Store, Store, str]:
    """The main store, the store to attach as `b` (`case/other`, a copy of `template` plus
    link.csv -> outside) and `sql` with its paths filled in; `case/other_evil` holds a secret
    beside the attached store."""
    store, outside = _store_with_outside(tmp_path / "case", template)
    other = Store(tmp_path / "case" / "other")
    shutil.copytree(template.root, other.root)
    (other.root / "link.csv").symlink_to(outside / "secret.csv")
    sibling = tmp_path / "case" / "other_evil"
    sibling.mkdir()
    (sibling / "secret.csv").write_text(f"a\n{SECRET}\n")
    query = sql.format(store=store.root.resolve(), other=other.root.resolve(), outside=outside.resolve(),
                       sibling=sibling.resolve())
    return store, other, query


@pytest.mark.parametrize("name, sql, expected", list(_sql_params()))
def test_pact_sql_refuses_writes_and_outside_reads(tmp_path, template_store, name, sql, expected):
    store, other, query = _prepare(tmp_path, template_store, sql)
    before = snapshot(tmp_path)
    attach = ["--attach", f"b={other.root}"] if name.startswith("attached_") else []
    result = call_pact("sql", store.root, query, *attach)
    assert SECRET not in result.stdout + result.stderr
    if expected == OK:
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        assert_one_error_line(result, expected)
    assert describe_changes(before, snapshot(tmp_path)) == ""


def test_real_entry_point_refuses_the_same_way(tmp_path, template_store):
    name, sql, expected = next(c for c in SQL_CASES if c[0] == "drop_after_comment")
    store, _, query = _prepare(tmp_path, template_store, sql)
    before = snapshot(tmp_path)
    [result] = run_pact_many([["sql", store.root, query]])
    assert describe_changes(before, snapshot(tmp_path)) == ""
    assert assert_one_error_line(result, expected) + "\n" == call_pact("sql", store.root, query).stderr


def test_pact_sql_cannot_read_the_working_directory_temp_folder(tmp_path, template_store, monkeypatch):
    store, _ = _store_with_outside(tmp_path / "case", template_store)
    work = tmp_path / "work"
    (work / ".tmp").mkdir(parents=True)
    (work / ".tmp" / "secret.csv").write_text(f"a\n{SECRET}\n")
    monkeypatch.chdir(work)
    result = call_pact("sql", store.root, f"SELECT * FROM read_csv('{work / '.tmp' / 'secret.csv'}')")
    assert SECRET not in result.stdout
    assert_one_error_line(result, DENIED)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("b; DROP VIEW targets; --", r"attach name .* is not a plain SQL identifier"),
        ("b.targets", r"attach name .* is not a plain SQL identifier"),
        ('b" AS SELECT 1; --', r"attach name .* is not a plain SQL identifier"),
        ("main", r"attach name 'main' is taken by DuckDB"),
        ("temp", r"attach name 'temp' is taken by DuckDB"),
        ("targets", r"attach name 'targets' is a view name"),
    ],
)
def test_attach_names_cannot_inject_sql(tmp_path, template_store, name, expected):
    store, other, query = _prepare(tmp_path, template_store, "SELECT 1")
    before = snapshot(tmp_path)
    result = call_pact("sql", store.root, query, "--attach", f"{name}={other.root}")
    assert_one_error_line(result, expected)
    assert describe_changes(before, snapshot(tmp_path)) == ""


def test_attached_store_with_an_escaping_manifest_is_refused(tmp_path, template_store):
    """A tampered manifest in the attached store cannot point the views outside it."""
    store, other, _ = _prepare(tmp_path, template_store, "SELECT 1")
    manifest = json.loads(other.manifest_path.read_text(encoding="utf-8"))
    manifest["parts"][0]["path"] = "../outside/secret.parquet"
    other.manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    before = snapshot(tmp_path)
    result = call_pact("sql", store.root, "SELECT count(*) FROM b.targets", "--attach", f"b={other.root}")
    assert SECRET not in result.stdout + result.stderr
    assert_one_error_line(result, r"^error: attached store b: manifest path '\.\./outside/secret\.parquet' points outside")
    assert describe_changes(before, snapshot(tmp_path)) == ""


# -- manifest paths --------------------------------------------------------------------------


def test_written_manifest_holds_only_relative_paths_and_the_store_relocates(tmp_path, template_store):
    text = template_store.manifest_path.read_text(encoding="utf-8")
    assert str(template_store.root.resolve()) not in text and str(tmp_path) not in text
    for part in json.loads(text)["parts"]:
        assert check_relative_path(part["path"]) == part["path"]
        assert template_store.resolve(part["path"]).is_relative_to(template_store.root.resolve())
    moved = Store(tmp_path / "elsewhere" / "store")
    shutil.copytree(template_store.root, moved.root)
    reader = TargetReader(moved)
    assert len(reader) == 4 and reader.get(reader.example_ids()[0]).full_logprobs.shape[1] == 3


@pytest.mark.parametrize(
    "path",
    [
        "../x.parquet", "../../etc/passwd", "/etc/passwd", "//etc/passwd", "targets/../../x",
        "./../x", "targets/./../../x", "targets\\..\\..\\x", "..", "", "targets/..",
    ],
)
def test_escaping_manifest_paths_are_refused(path):
    with pytest.raises(PactError, match=r"manifest path .* (points outside the store|is not a non-empty string)"):
        check_relative_path(path)


@pytest.mark.parametrize("path", ["targets/a\x00.parquet", "targets/a\n.parquet", "targets/\x1b[2Ja.parquet",
                                  "targets/a\x7f.parquet", "targets/a\r.parquet"])
def test_control_characters_in_manifest_paths_are_refused(path):
    with pytest.raises(PactError) as info:
        check_relative_path(path)
    message = str(info.value)
    assert message == f"manifest path {path!r} contains control characters (tampered manifest?)"
    assert "\n" not in message and "\x1b" not in message


@pytest.mark.parametrize("path", ["targets/part-s0of1-abc.parquet", "post/part-x.parquet", "targets//x.parquet"])
def test_plain_relative_paths_are_accepted(path):
    assert check_relative_path(path) == path


def test_pact_sql_installs_and_writes_nothing_under_home(template_store, tmp_path, monkeypatch):
    """No extension autoload/install (no network) and no files under HOME."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    result = call_pact("sql", template_store.root, f"SELECT count(*) FROM read_json_auto('{template_store.manifest_path}')")
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], "pact sql wrote under HOME"
