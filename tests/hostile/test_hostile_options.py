"""Every option is checked before any work (issue 15, weak cases): `pact plot --out` must
be writable before the store is read, and tokens, precompute, train and eval refuse a bad
option value or combination before a model loads."""

from __future__ import annotations

import os

import pytest
from hostile.harness import assert_one_error_line, call_pact, describe_changes, snapshot


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


@pytest.fixture(scope="module")
def unloadable(tmp_path_factory):
    """A world whose model directory has a tokenizer and a config but weights that cannot be
    read: any option error reported instead of `cannot load a model` came before the load."""
    import json
    import shutil

    from train_fixtures import build_world

    root = tmp_path_factory.mktemp("options")
    world = build_world(root)
    model = shutil.copytree(world.model_dir, root / "unloadable")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    safety = root / "safety.jsonl"
    safety.write_text(json.dumps({"prompt": "how to do harm", "completion": "I cannot help with that."}) + "\n")
    return world, model, safety, root


def commands(unloadable, tmp_path) -> dict[str, list]:
    world, model, safety, _ = unloadable
    return {
        "tokens": ["tokens", "--aligned", model, "--base", model, "--data", safety, "--store", tmp_path / "t", "--show", "0"],
        "precompute": ["precompute", "--reference", model, "--data", world.data, "--store", world.store_dir, "--no-progress"],
        "train": ["train", "--model", model, "--data", world.data, "--store", world.store_dir, "--out", tmp_path / "run"],
        "eval": ["eval", "--model", model, "--store", world.store_dir, "--harmful", safety],
    }


def test_the_unloadable_model_is_what_a_valid_command_reports(unloadable, tmp_path):
    """The control: without a bad option, tokens, precompute and eval reach the model."""
    for name, args in commands(unloadable, tmp_path).items():
        if name != "train":  # train stops earlier: the model is not the store's reference
            assert_one_error_line(call_pact(*args, "--device", "cpu"), r"^error: cannot load a model from .*unloadable: ")


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        *[(c, ["--device", "bogus"], r"--device 'bogus' must be auto, cpu, cuda or cuda:<index>$")
          for c in ("tokens", "precompute", "train", "eval")],
        *[(c, ["--device", "cuda:x"], r"--device 'cuda:x' must be auto, cpu, cuda or cuda:<index>$")
          for c in ("tokens", "train", "eval")],
        ("eval", ["--reference", "REFERENCE"], r"--reference is the drift probe's reference model: pass --probe too$"),
        ("eval", ["--metric", "exact"], r"--metric exact scores --task: pass --task too$"),
        ("tokens", ["--top-k", "1"], r"--top-k must be at least 2"),
        ("tokens", ["--store", "AFILE"], r"--store .*afile exists and is not a directory$"),
        ("precompute", ["--max-batch-tokens", "0"], r"--max-batch-tokens must be an integer >= 1"),
        ("train", ["--run-id", "../x"], r"--run-id '\.\./x' must start with a letter or digit"),
        ("eval", ["--refusal-keywords", "MISSING"], r"refusal keywords file .*missing\.txt does not exist$"),
    ],
)
def test_a_bad_option_is_refused_before_the_model_loads(unloadable, tmp_path, command, extra, message):
    """Before: `--device bogus` reached the model (tokens, eval: the load error; train: a
    RuntimeError traceback from torch after the data was encoded), and eval ignored
    `--reference` without `--probe` and `--metric` without `--task`; a file as the store of
    `pact tokens` was `error: File exists`."""
    _, model, _, _ = unloadable
    (tmp_path / "afile").write_text("x")
    named = {"REFERENCE": str(model), "MISSING": str(tmp_path / "missing.txt"), "AFILE": str(tmp_path / "afile")}
    extra = [named.get(e, e) for e in extra]
    args = commands(unloadable, tmp_path)[command]
    if "--device" not in extra:
        args = [*args, "--device", "cpu"]
    result = call_pact(*args, *extra)
    assert "cannot load a model" not in result.stderr
    assert_one_error_line(result, "^error: " + message)


def test_eval_refuses_a_store_it_cannot_write_its_rows_to_before_the_model_loads(unloadable, tmp_path):
    """Before: the generations ran, then writing STORE/evals/<id>.parquet failed at the end."""
    import shutil

    world, model, safety, _ = unloadable
    store = shutil.copytree(world.store_dir, tmp_path / "store")
    (store / "evals").write_text("not a directory")
    result = call_pact("eval", "--model", model, "--store", store, "--harmful", safety, "--device", "cpu")
    assert "cannot load a model" not in result.stderr
    assert_one_error_line(result, r"^error: --store .*/store: .*/store/evals is not a directory$")
