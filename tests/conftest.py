"""Shared fixtures: a tiny tokenizer built locally, the real data sets when present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from paths import SHARED_DATA  # noqa: E402

# Modules whose every test launches processes (torchrun ranks, killed or concurrent runs,
# benchmarks):
# marked slow, so `pytest -m "not slow"` is the inner loop; CI runs everything.
SLOW_MODULES = (
    "test_reliability_precompute.py",
    "test_reliability_train.py",
    "test_fault_harness.py",
    "test_bench_smoke.py",
    "trainer/test_distributed.py",
    "hostile/test_hostile_tokens_commit.py",
    "hostile/test_hostile_writers.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.relative_to(TESTS).as_posix() in SLOW_MODULES or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def single_process_hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """One weight-hash cache for the session's temporary tree, and no torchrun variables
    inherited from the environment (the test launches its own ranks)."""
    monkeypatch.setenv("PACT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hash-cache"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
