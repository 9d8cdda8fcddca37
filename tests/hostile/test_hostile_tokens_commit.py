"""`pact tokens` killed at any point of its commit (issue 15, failure 5): readers never pair
the manifest's safety set with another one's files. The attack: killed between writing the
safety set and the manifest, `pact sql` paired 50-wide stored arrays with a 30-row
`safety_tokens` table and returned wrong token labels without an error. Now every reader
refuses a half-replaced set with one line, and rerunning the interrupted command repairs it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fault_harness import Fault, ForkServer, short_rows
from hostile.harness import assert_one_error_line, assert_one_line_message, call_pact
from tiny import make_model, make_tokenizer
from train_fixtures import write_jsonl

from pact.core.errors import PactError
from pact.store import Store, TargetWriter, load_safety_set


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens-commit")
    tokenizer = make_tokenizer(root / "aligned")
    make_model(root / "aligned", len(tokenizer), seed=0)
    make_model(root / "base", len(tokenizer), seed=1)
    tokenizer.save_pretrained(str(root / "base"))
    data = write_jsonl(root / "safety.jsonl", short_rows(12, 3))
    store = Store(root / "template")
    args = tokens_args(root, store, "8")
    result = call_pact(*args)
    assert result.returncode == 0, result.stderr
    writer = TargetWriter(store, load_safety_set(store).size)  # a part 8 wide
    steps = np.log(np.full((2, 8), 1 / 8, np.float32))
    writer.add_post("r0", steps)
    writer.add_example("e0", "t0", "r0", np.array([1, 2]), np.zeros(2), np.zeros(2), steps)
    writer.close()
    with ForkServer(root / "fork-logs", preload=("torch", "transformers", "pact.pipeline.cli", "pact.pipeline.tokens")) as server:
        yield {"root": root, "template": store.root, "data": data, "server": server}


def tokens_args(root, store: Store, top_k: str) -> list:
    return [
        "tokens", "--aligned", root / "aligned", "--base", root / "base", "--data", root / "safety.jsonl",
        "--store", store.root, "--top-k", top_k, "--force", "--show", "0", "--device", "cpu",
    ]  # fmt: skip


POINTS = {
    "tokens_parquet_replaced": Fault("os:replace", match="tokens.parquet", when="after"),
    "safety_file_replaced": Fault("os:replace", match="safety_tokens.safetensors", when="after"),
    "manifest_written_not_renamed": Fault("os:replace", match="manifest.json", when="before"),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_killed_tokens_run_is_refused_then_repaired_by_its_rerun(world, tmp_path, point):
    store = Store(tmp_path / "s")
    shutil.copytree(world["template"], store.root)
    args = tokens_args(world["root"], store, "5")
    killed = world["server"].run(args, faults=[POINTS[point]])
    assert killed.killed, killed.stderr
    advice = r"rerun the `pact tokens` command that was interrupted$"
    sql = call_pact("sql", store.root, "SELECT token, count(*) FROM confidences GROUP BY token")
    safety_error = None
    try:
        load_safety_set(store)
    except PactError as exc:
        safety_error = str(exc)
    if point == "tokens_parquet_replaced" or point == "manifest_written_not_renamed":
        assert_one_error_line(sql, r"tokens\.parquet does not list the safety-token set the manifest records .*" + advice)
    if point != "tokens_parquet_replaced":
        assert safety_error is not None
        assert_one_line_message(safety_error, r"does not match the manifest's safety-token fingerprint")
    rerun = world["server"].run(args)
    assert rerun.returncode == 0, rerun.stderr
    assert load_safety_set(store).size == 5
    # the 8-wide part is stale now (the warning of `--force`): refused with advice that works
    stale = call_pact("sql", store.root, "SELECT count(*) FROM safety_tokens")
    assert_one_error_line(stale, r"does not have the expected columns and types for 5 safety tokens .*pact store repair")
    assert call_pact("store", "repair", store.root).returncode == 0
    result = call_pact("sql", store.root, "SELECT count(*) AS n FROM safety_tokens", "--format", "csv")
    assert (result.returncode, result.stdout) == (0, "n\n5\n")


def test_a_deleted_tokens_table_is_refused_and_its_advice_rebuilds_it(world, tmp_path):
    """Attack rerun N34: with tokens.parquet deleted, `pact sql` answered 0 rows with exit 0,
    and verify advised `pact store repair`, which cannot rebuild it."""
    store = Store(tmp_path / "s")
    shutil.copytree(world["template"], store.root)
    (store.root / "tokens.parquet").unlink()
    sql = call_pact("sql", store.root, "SELECT count(*) FROM confidences")
    assert_one_error_line(sql, r"tokens\.parquet is missing; rerun the `pact tokens` command that wrote the store .*")
    verify = call_pact("store", "verify", store.root)
    assert verify.returncode == 1
    assert "problem: tokens.parquet:" in verify.stdout
    assert verify.stdout.strip().splitlines()[-1].endswith("repair cannot fix it; do what the line above says")
    rerun = world["server"].run(tokens_args(world["root"], store, "8"))
    assert rerun.returncode == 0, rerun.stderr
    result = call_pact("sql", store.root, "SELECT count(*) AS n FROM targets", "--format", "csv")
    assert (result.returncode, result.stdout) == (0, "n\n2\n"), result.stderr  # e0, two steps, kept
    assert call_pact("store", "verify", store.root).returncode == 0
