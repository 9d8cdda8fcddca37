"""Hostile model directories (issue 15, failure 8 and the weak cases on models): every load
failure is one line; weights that do not fill the configured model, non-finite weights and
non-regular files are refused; the weight-hash cache sees an in-place edit that restores
the mtime."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hostile.harness import assert_one_error_line, assert_one_line_message, call_pact
from safetensors.torch import load_file, save_file
from tiny import make_model, make_tokenizer
from train_fixtures import make_safety, write_jsonl

from pact.core.errors import PactError
from pact.core.models import load_model, model_fingerprint
from pact.store import Store


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer(root / "m")
    make_model(root / "m", len(tokenizer), seed=0)
    return root / "m"


@pytest.fixture
def model(source, tmp_path):
    return shutil.copytree(source, tmp_path / "m")


def edit_config(model, **change) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(change)
    (model / "config.json").write_text(json.dumps(config))


def refused(model, pattern: str, **kwargs) -> None:
    with pytest.raises(PactError) as info:
        load_model(model, device="cpu", **kwargs)
    assert_one_line_message(str(info.value), pattern)


def test_weights_linked_to_dev_zero_are_refused_at_once(model, tmp_path):
    """The attack: precompute hashed /dev/zero forever."""
    (model / "model.safetensors").unlink()
    os.symlink("/dev/zero", model / "model.safetensors")
    for call in (lambda: model_fingerprint(model), lambda: load_model(model, device="cpu")):
        with pytest.raises(PactError) as info:
            call()
        assert_one_line_message(str(info.value), r"model file .*model\.safetensors is not a regular file \(a device, FIFO or socket\); refusing to read it$")


def test_a_fifo_tokenizer_is_refused(model):
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    refused(model, r"tokenizer\.json is not a regular file")


@pytest.mark.parametrize(
    "content",
    ['{"version": "1.0", "model": {"type": "Nope"}}', "{not json", '{"model": 5}', ""],
)
def test_a_garbage_tokenizer_json_is_one_line(model, content):
    """Attack rerun N15: a tokenizer.json of an unknown model type ended in transformers'
    KeyError traceback."""
    from pact.core.models import load_tokenizer

    (model / "tokenizer.json").write_text(content)
    with pytest.raises(PactError) as info:
        load_tokenizer(model)
    assert_one_line_message(str(info.value), r"^cannot load a tokenizer from .*: ")


def test_precompute_with_weights_linked_to_dev_zero_is_one_line(model, tmp_path):
    store = Store(tmp_path / "s")
    make_safety(store, 263)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    (model / "model.safetensors").unlink()
    os.symlink("/dev/zero", model / "model.safetensors")
    result = call_pact("precompute", "--reference", model, "--data", data, "--store", store.root, "--device", "cpu")
    assert_one_error_line(result, r"^error: model file .*model\.safetensors is not a regular file")


def test_a_truncated_checkpoint_is_one_line(model):
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    refused(model, r"^cannot load a model from .*: Error while deserializing header")


def test_a_config_with_more_layers_than_the_weights_is_refused(model):
    """Before: loaded silently, the third layer at random init."""
    edit_config(model, num_hidden_layers=3)
    refused(model, r"do not match its config\.json: \d+ missing \(first: model\.layers\.2\.")
    assert len(load_model(model, device="cpu", allow_partial_weights=True).model.layers) == 3


def test_a_config_with_fewer_layers_than_the_weights_is_refused(model):
    edit_config(model, num_hidden_layers=1)
    refused(model, r"do not match its config\.json: \d+ unexpected \(first: model\.layers\.1\.")


def test_a_config_of_another_width_is_refused(model):
    """Before: a traceback and transformers' multi-line load report."""
    edit_config(model, hidden_size=64)
    refused(model, r"do not match its config\.json: \d+ of another shape \(first: ")


def test_non_finite_weights_have_their_own_message(model):
    path = model / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    refused(model, rf"hold NaN or inf \(first in {name.replace('.', '[.]')}\); refusing to use them$")


def test_the_hash_cache_sees_an_edit_that_restores_the_mtime(model, monkeypatch, tmp_path):
    monkeypatch.setenv("PACT_CACHE_DIR", str(tmp_path / "cache"))
    path = model / "model.safetensors"
    before = model_fingerprint(model)
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # same size, other bytes
    with open(path, "r+b") as handle:  # in place: same inode
        handle.write(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_mtime_ns == info.st_mtime_ns and path.stat().st_size == info.st_size
    assert model_fingerprint(model) != before


def test_a_sound_model_loads(model):
    assert torch.isfinite(next(load_model(model, device="cpu").parameters())).all()


@pytest.mark.parametrize("command", ["tokens", "precompute", "train", "eval"])
def test_every_command_that_loads_a_model_has_the_partial_weights_flag(command):
    result = call_pact(command, "--help")
    assert result.returncode == 0 and "--allow-partial-weights" in result.stdout


def test_partial_weights_are_refused_unless_the_flag_allows_them(model, tmp_path):
    """Before: the refusal had no flag to lift it (load_model's `allow_partial_weights` was
    Python-only). Refused naming the flag; with it, loaded with one warning line."""
    edit_config(model, num_hidden_layers=3)
    store = Store(tmp_path / "s")
    make_safety(store, 263)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    args = ("precompute", "--reference", model, "--data", data, "--store", store.root, "--device", "cpu", "--no-progress")
    assert_one_error_line(
        call_pact(*args), r"do not match its config\.json: \d+ missing .*; --allow-partial-weights loads it anyway$"
    )
    result = call_pact(*args, "--allow-partial-weights")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: the weights")]
    assert len(warnings) == 1 and warnings[0].endswith("loaded anyway (--allow-partial-weights)")
    assert "Traceback" not in result.stderr
