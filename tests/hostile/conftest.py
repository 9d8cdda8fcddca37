"""Fixtures of the hostile-input suites."""

from __future__ import annotations

import pytest
from store_fixtures import fill, make_safety

from pact.store import Store


@pytest.fixture
def store(tmp_path) -> Store:
    """A store with a safety set and 7 examples' targets (store_fixtures.fill)."""
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store)
    return store
