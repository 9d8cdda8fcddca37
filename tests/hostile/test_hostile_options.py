"""Every option is checked before any work (issue 15, weak cases): `pact plot --out` must
be writable before the store is read, and tokens, precompute, train and eval refuse a bad
option value or combination before a model loads."""

from __future__ import annotations

import os

import pytest
from hostile.harness import assert_one_error_line, call_pact, describe_changes, snapshot
from store_fixtures import fill, make_safety

from pact.store import Store


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(tmp_path / "s")
    make_safety(store)
    fill(store)
    return store


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("missing/plot.png", r"^error: --out .*missing/plot\.png: the directory .*missing does not exist$"),
        ("afile/plot.png", r"^error: --out .*afile/plot\.png: .*afile is not a directory$"),
    ],
)
def test_plot_out_in_a_missing_directory_is_refused_before_the_store_is_read(tmp_path, out, message):
    """Before: `pact plot` read the store and drew the figure, then failed writing it (or,
    for a missing store, reported the store instead)."""
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    assert_one_error_line(call_pact("plot", tmp_path / "no-store", "--out", tmp_path / out), message)
    assert describe_changes(before, snapshot(tmp_path)) == ""


def test_plot_out_on_a_read_only_file_system_is_refused_before_the_store_is_read(tmp_path):
    if not os.path.ismount("/proc"):
        pytest.skip("no /proc file system here")
    assert_one_error_line(
        call_pact("plot", tmp_path / "no-store", "--out", "/proc/pact-plot.png"),
        r"^error: --out /proc/pact-plot\.png: cannot write in /proc \(",
    )


def test_plot_out_in_a_read_only_directory_is_refused(tmp_path, store):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert_one_error_line(
        call_pact("plot", store.root, "--out", locked / "p.png"), r"^error: --out .*: cannot write in .*locked \("
    )
