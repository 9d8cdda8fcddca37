"""`pact --help`, `pact data` and `pact sql` through the real entry point."""

from __future__ import annotations

import json

from cli_helpers import run_pact
from store_fixtures import fill, make_safety

from pact.store import Store


def test_help_lists_commands():
    result = run_pact("--help")
    assert result.returncode == 0
    for command in ("data", "sql"):
        assert command in result.stdout


def test_data_reports_counts_and_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "completion": "bb"}, {"prompt": "a", "completion": "bb"}, {"id": "z", "prompt": "c", "completion": "d e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_pact("data", path, "--ids")
    assert result.returncode == 0, result.stderr
    assert "format: prompt_completion" in result.stdout
    assert "examples: 3" in result.stdout
    assert "identical rows without id (kept, ids suffixed -N): 1" in result.stdout
    assert "response words: min 1, median 1, mean 1.3, p95 2, max 2" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "z"


def test_data_bad_input_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    result = run_pact("data", path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and "bad.jsonl:2: malformed JSON line" in result.stderr


def test_data_skip_invalid_lists_rows(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"id": "q", "prompt": "a", "completion": ""}\n')
    result = run_pact("data", path, "--skip-invalid")
    assert result.returncode == 0
    assert "invalid rows skipped: 1" in result.stdout
    assert "row 2 (id q): the response is empty" in result.stdout


def test_sql_formats(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store, count=3)
    table = run_pact("sql", store.root, "SELECT step, count(*) AS n FROM targets GROUP BY step ORDER BY step")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["step", "|", "n"]
    assert table.stdout.splitlines()[2:] == ["0    | 3", "1    | 3", "2    | 2", "3    | 1", "(4 rows)"]
    csv_out = run_pact("sql", store.root, "SELECT token_id, token FROM safety_tokens ORDER BY token_id", "--format", "csv")
    assert csv_out.stdout.splitlines() == ["token_id,token", "3,a", "5,b", "7,c"]
    js = run_pact("sql", store.root, "SELECT token_id FROM safety_tokens ORDER BY 1", "--format", "json")
    assert json.loads(js.stdout) == [{"token_id": 3}, {"token_id": 5}, {"token_id": 7}]


def test_sql_refuses_writes_with_one_line(tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store)
    result = run_pact("sql", store.root, "DROP VIEW targets")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: pact sql is read-only: DROP statements are not allowed (only SELECT)"
    missing = run_pact("sql", tmp_path / "nowhere", "SELECT 1")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_usage_errors_are_one_line_exit_2(tmp_path):
    """Click's usage errors (bad value, unknown option or command, missing argument) print
    one `error:` line that names the command's --help, not click's multi-line usage block."""
    cases = [
        (("data", tmp_path), "Invalid value for 'FILE'", "pact data --help"),
        (("data", "--nope", "x.jsonl"), "No such option '--nope'", "pact data --help"),
        (("trian",), "No such command 'trian'", "pact --help"),
        (("data",), "Missing argument 'FILE'", "pact data --help"),
    ]
    for args, message, hint in cases:
        result = run_pact(*args)
        assert result.returncode == 2, args
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert f"(see '{hint}')" in result.stderr
        assert "Usage:" not in result.stderr


def test_single_process_commands_refuse_torchrun(tmp_path):
    """Under torchrun every process would run the command: the same eval rows or files N
    times. Only precompute and train run distributed; WORLD_SIZE=1 is one process."""
    store = Store(tmp_path / "s")
    make_safety(store)
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    for command, args in [
        ("data", ["x.jsonl"]), ("tokens", []), ("eval", []), ("plot", [store.root]), ("sql", [store.root, "SELECT 1"]),
        ("demo", []),
    ]:  # fmt: skip
        result = run_pact(command, *args, env=torchrun)
        assert result.returncode == 2, command
        assert result.stderr.strip() == (
            f"error: pact {command} runs in one process, not under torchrun (WORLD_SIZE=2): "
            "only pact precompute and pact train run distributed"
        )
    assert run_pact("sql", store.root, "SELECT 1", env={"WORLD_SIZE": "1", "RANK": "0"}).returncode == 0
    for args in (["precompute", "--help"], ["eval", "--help"], ["--help"]):
        assert run_pact(*args, env=torchrun).returncode == 0, args
