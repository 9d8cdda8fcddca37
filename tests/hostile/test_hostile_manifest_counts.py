"""A manifest with out-of-range counts (issue 15, weak case): a safety-token count that is
huge, negative or not an integer, or that disagrees with the safety set the manifest's
fingerprint names, is one `error:` line on every surface (no traceback), and `pact store
repair` refuses to act on it instead of deleting every part; part counts (rows, examples)
out of range or disagreeing with the parts are findings of `pact store verify`."""

from __future__ import annotations

import json

import pytest
from hostile.harness import assert_one_error_line, call_pact, describe_changes, snapshot
from store_fixtures import S

from pact.store import Store, TargetReader
from pact.store.safety import load_safety_set


def tamper(store: Store, change) -> None:
    manifest = json.loads(store.manifest_path.read_text())
    change(manifest)
    store.manifest_path.write_text(json.dumps(manifest))


def surfaces(store: Store) -> dict[str, list[str]]:
    return {
        "sql": ["sql", store.root, "SELECT count(*) FROM targets"],
        "verify": ["store", "verify", store.root],
        "repair": ["store", "repair", store.root],
    }


@pytest.mark.parametrize(
    ("count", "shown"),
    [(10**30, "10+"), (2**63, r"\d+"), (-3, "-3"), (1.5, r"1\.5"), ("3", "'3'"), (None, "None")],
)
def test_an_out_of_range_safety_count_is_one_line(store, count, shown):
    """Before: 10**30 gave an OverflowError traceback in `pact sql` and `pact store verify`."""
    tamper(store, lambda m: m["safety_tokens"].update(count=count))
    before = snapshot(store.root)
    for args in surfaces(store).values():
        assert_one_error_line(
            call_pact(*args), rf"safety_tokens\.count {shown} is not an integer from 1 to 16777216 \(corrupted manifest\?\)"
        )
    assert describe_changes(before, snapshot(store.root)) == ""


@pytest.mark.parametrize("count", [1, S + 1, 1000])
def test_a_safety_count_that_disagrees_with_the_set_is_a_corrupted_manifest(store, count):
    """Before: every part was reported as a foreign part with the advice `pact store repair`,
    and repair deleted all of them (the parts were right; the count was wrong)."""
    tamper(store, lambda m: m["safety_tokens"].update(count=count))
    before = snapshot(store.root)
    disagrees = rf"safety_tokens\.count {count} disagrees with (tokens\.parquet|safety_tokens\.safetensors) \({S} tokens, "
    for args in surfaces(store).values():
        line = assert_one_error_line(call_pact(*args), disagrees)
        assert "pact store repair" not in line and line.endswith("rerun `pact tokens` and `pact precompute`")
    assert describe_changes(before, snapshot(store.root)) == ""
    with pytest.raises(Exception, match=disagrees):
        load_safety_set(store)
    tamper(store, lambda m: m["safety_tokens"].update(count=S))  # restored: everything reads again
    assert call_pact("store", "verify", store.root).returncode == 0
    assert len(TargetReader(store).example_ids()) == 7


@pytest.mark.parametrize("key", ["rows", "examples", "bytes"])
@pytest.mark.parametrize("value", [-5, 10**30, 2.5, "7", True, None, [1]])
def test_part_counts_out_of_range_are_verify_findings(store, key, value):
    tamper(store, lambda m: m["parts"][0].update({key: value}))
    result = call_pact("store", "verify", store.root)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "1 problem: run `pact store repair" in result.stdout
    assert call_pact("store", "repair", store.root).returncode == 0
    assert call_pact("store", "verify", store.root).returncode == 0
