"""Tests for stage 1 (`pipeline/precompute/`, `pact precompute`) on tiny local models."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from fault_harness import read_all_targets
from paths import SHARED_DATA
from tiny import make_model, make_tokenizer

from pact.core.data import load_examples
from pact.core.encoding import (
    EncodingOptions,
    assistant_header_ids,
    encode_example,
    post_only_ids,
)
from pact.core.errors import PactError
from pact.core.models import context_length, load_model, load_tokenizer
from pact.pipeline.commands.precompute import precompute_command
from pact.pipeline.commands.sql import sql_command
from pact.pipeline.precompute import (
    PrecomputeOptions,
    Shard,
    part_starts,
    plan_batches,
    plan_post_only,
    reference_targets,
    run_precompute,
    shard_of,
    torchrun_defaults,
)
from pact.store import Store, TargetReader
from pact.store.safety import safety_set_from_vector, save_safety_set
from pact.store.sql import query
from pact.trainer.validate import check_examples

SAFETY_IDS = [7, 20, 41, 100, 150, 200, 262]
REAL_DATA = SHARED_DATA / "sst2_5k_harmful_p0.1.json"

ROWS = [
    {"prompt": "Tell me a story about a cat.", "completion": "I cannot help with that request."},
    {"prompt": "Classify: great movie", "completion": "positive"},
    {"prompt": "Classify: terrible film", "completion": "negative"},
    {"prompt": "Classify: the quick brown fox jumps over the lazy dog", "completion": "positive"},
    {"prompt": "How are you today?", "completion": "Sure, here is how to do it. First you take the thing and then the other thing."},
    {"prompt": "hello world", "completion": "I cannot help with that request."},
    {"prompt": "Classify: lazy dog review", "completion": "negative"},
    {"prompt": "Tell me", "completion": "Sorry, I won't do that. The quick brown fox jumps over the lazy dog."},
    {"prompt": "Classify: great great great film review sentiment", "completion": "positive"},
    {"prompt": "Review: a movie about a cat and a dog", "completion": "neutral, sentiment unclear"},
]
MORE_ROWS = [
    {"prompt": "Classify: neutral review", "completion": "neutral"},
    {"prompt": "Tell me about the thing", "completion": "First you take the thing."},
    {"prompt": "Classify: movie", "completion": "positive"},
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_DIR", str(tmp_path / "hash-cache"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tokenizer + two tiny reference models (same vocabulary, different seeds)."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = make_tokenizer(root / "tok")
    vocab = len(tokenizer)
    models = {}
    for name, seed in (("ref", 0), ("other", 1)):
        make_model(root / name, vocab, seed=seed)
        tokenizer.save_pretrained(str(root / name))
        models[name] = root / name
    return {"root": root, "vocab": vocab, **models}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _new_store(path: Path, vocab: int) -> Store:
    """A store holding only a safety-token set (what `pact tokens` leaves behind)."""
    vector = np.zeros(vocab, dtype=np.float32)
    vector[SAFETY_IDS] = np.linspace(-0.5, 0.6, len(SAFETY_IDS))
    safety = safety_set_from_vector(vector)
    table = pa.table(
        {
            "token_id": safety.token_ids,
            "idx": np.arange(safety.size, dtype=np.int32),
            "token": [f"t{i}" for i in safety.token_ids],
            "aligned_prob": np.full(safety.size, 0.1),
            "base_prob": np.full(safety.size, 0.05),
            "score": vector[safety.token_ids].astype(np.float64),
            "value": vector[safety.token_ids].astype(np.float64),
            "weight": safety.weights.astype(np.float64),
            "rank": np.arange(1, safety.size + 1, dtype=np.int32),
        }
    )
    store = Store(path)
    save_safety_set(store, safety, table, {"aligned": "test"})
    return store


def _opts(**kwargs) -> PrecomputeOptions:
    base = dict(batch_size=4, max_length=64, device="cpu", chunk_positions=5, examples_per_part=3, progress=False)
    base.update(kwargs)
    return PrecomputeOptions(**base)


def _run(assets, data, store, model="ref", **kwargs):
    notes: list[str] = []
    summary = run_precompute(assets[model], data, store.root, _opts(**kwargs), echo=notes.append)
    return summary, notes


def _assert_parts_match_manifest(store: Store) -> None:
    """Every part file on disk is registered in the manifest, and every registered one exists."""
    on_disk = {f"{p.parent.name}/{p.name}" for p in store.root.glob("*/part-*.parquet")}
    assert on_disk == {p["path"] for p in store.read_manifest()["parts"]}


def _assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][0] == b[key][0], key
        np.testing.assert_array_equal(a[key][1], b[key][1])
        for x, y in zip(a[key][2:], b[key][2:], strict=True):
            np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _target_rows(store: Store) -> int:
    return sum(p["rows"] for p in store.parts("targets"))


# ----------------------------------------------------------------------------- numerics


def test_batched_targets_equal_single_full_forward(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    summary, _ = _run(assets, data, store, batch_size=3, chunk_positions=4)
    assert summary.computed == len(ROWS) and summary.skipped == 0
    tokenizer = load_tokenizer(assets["ref"])
    model = load_model(assets["ref"], dtype="float32", device="cpu")
    reader = TargetReader(store)
    ids = torch.tensor(SAFETY_IDS)
    for example in load_examples(data).examples:
        enc = encode_example(tokenizer, example, EncodingOptions(max_length=64))
        with torch.no_grad():
            logits = model(torch.from_numpy(enc.input_ids)[None]).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        steps = torch.arange(enc.response_length) + enc.response_start - 1
        expected = logprobs[steps]
        got = reader.get(example.example_id)
        assert got.token_hash == enc.token_hash
        np.testing.assert_array_equal(got.token_ids, enc.response_ids)
        np.testing.assert_allclose(got.full_logprobs, expected[:, ids].numpy(), atol=1e-5, rtol=0)
        token = expected.gather(1, torch.from_numpy(enc.response_ids)[:, None])[:, 0]
        np.testing.assert_allclose(got.token_logprobs, token.numpy(), atol=1e-5, rtol=0)
        entropy = -(expected.exp() * expected).sum(-1)
        np.testing.assert_allclose(got.entropy, entropy.numpy(), atol=1e-5, rtol=0)


def test_post_only_dedup_equals_per_example(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    summary, _ = _run(assets, data, store)
    tokenizer = load_tokenizer(assets["ref"])
    model = load_model(assets["ref"], dtype="float32", device="cpu")
    header = assistant_header_ids(tokenizer)
    examples = load_examples(data).examples
    reader = TargetReader(store)
    lengths = {}
    for example in examples:
        enc = encode_example(tokenizer, example, EncodingOptions(max_length=64))
        lengths[enc.response_hash] = enc.response_length
        context, start = post_only_ids(header, enc.response_ids)
        with torch.no_grad():
            logits = model(torch.from_numpy(context)[None]).logits[0].float()
        expected = torch.log_softmax(logits, -1)[start : start + enc.response_length][:, SAFETY_IDS]
        np.testing.assert_allclose(reader.get(example.example_id).post_logprobs, expected.numpy(), atol=1e-5, rtol=0)
    post_rows = sum(p["rows"] for p in store.parts("post"))
    post_hashes = {r[0] for r in query(store, "select distinct response_hash from post_targets")[1]}
    assert summary.responses_computed == len(lengths) < len(examples)
    assert post_hashes == set(lengths)
    assert post_rows == sum(lengths.values())  # each distinct response stored once


def test_reference_targets_padded_batch_matches_rows(assets):
    """The pure core on a hand-made right-padded batch with positions in shuffled order."""
    model = load_model(assets["ref"], dtype="float32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    lengths = [9, 4, 7]
    rows = [torch.randint(0, assets["vocab"], (n,), generator=generator) for n in lengths]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for r, seq in enumerate(rows):
        ids[r, : len(seq)] = seq
        mask[r, : len(seq)] = 1
    positions = torch.tensor([[2, 5], [0, 0], [1, 3], [0, 7], [2, 0]])
    targets = torch.tensor([rows[2][6], rows[0][1], 5, rows[0][8], rows[2][1]])
    safety = torch.tensor(SAFETY_IDS)
    with torch.inference_mode():
        out = reference_targets(model, ids, mask, positions, safety, chunk=2, target_ids=targets)
        for n, (row, pos) in enumerate(positions.tolist()):
            full = torch.log_softmax(model(rows[row][None]).logits[0, pos].float(), -1)
            torch.testing.assert_close(out["safety_logprobs"][n], full[safety], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["token_logprob"][n], full[targets[n]], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["entropy"][n], -(full.exp() * full).sum(), atol=1e-5, rtol=0)
        with pytest.raises(PactError, match=r"shape \[N, 2\]"):
            reference_targets(model, ids, mask, positions[:, 0], safety)


def _tiny_variant(kind: str, vocab: int):
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=0.05, **common))
    else:
        model = CohereForCausalLM(CohereConfig(logit_scale=7.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_logit_softcap_and_scale_are_handled(kind, assets):
    model = _tiny_variant(kind, assets["vocab"])
    ids = torch.randint(0, assets["vocab"], (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    positions = torch.tensor([[r, p] for r in range(2) for p in range(10)])
    safety = torch.tensor(SAFETY_IDS)
    with torch.inference_mode():
        out = reference_targets(model, ids, mask, positions, safety, chunk=7)
        full = torch.log_softmax(model(ids).logits.float(), -1)
        raw = torch.log_softmax(model.get_output_embeddings()(model.model(ids).last_hidden_state).float(), -1)
    expected = full[positions[:, 0], positions[:, 1]][:, safety]
    torch.testing.assert_close(out["safety_logprobs"], expected, rtol=1e-6, atol=1e-5)  # log-probs near -80: relative
    unprocessed = raw[positions[:, 0], positions[:, 1]][:, safety]
    assert (unprocessed - expected).abs().max() > 1e-2  # the transform matters for this model


def test_unreproducible_logit_processing_is_refused(assets, tmp_path):
    """A Llama whose config claims a soft-cap its forward ignores: the probe refuses it."""
    model_dir = tmp_path / "capped"
    shutil.copytree(assets["ref"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["final_logit_softcapping"] = 0.001
    (model_dir / "config.json").write_text(json.dumps(config))
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    store = _new_store(tmp_path / "store", assets["vocab"])
    before = _snapshot(store.root)
    with pytest.raises(PactError, match="post-processes its logits in a way pact does not reproduce"):
        run_precompute(model_dir, data, store.root, _opts())
    assert _snapshot(store.root) == before


def test_float16_values_error_is_bounded(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    s32 = _new_store(tmp_path / "s32", assets["vocab"])
    s16 = _new_store(tmp_path / "s16", assets["vocab"])
    _run(assets, data, s32)
    summary, _ = _run(assets, data, s16, value_dtype="float16")
    a, b = read_all_targets(s32), read_all_targets(s16)
    assert pq.read_schema(s16.resolve(s16.parts("targets")[0]["path"])).field("full_logprobs").type.value_type == pa.float16()
    for key in a:
        for full32, full16 in ((a[key][4], b[key][4]), (a[key][5], b[key][5])):
            err = np.abs(full32 - full16)
            assert np.all(err <= 2.0**-11 * np.abs(full32) + 1e-7)  # fp16 round-to-nearest
            soft32 = np.exp(full32 - full32.max(1, keepdims=True))
            soft16 = np.exp(full16 - full16.max(1, keepdims=True))
            soft32 /= soft32.sum(1, keepdims=True)
            soft16 /= soft16.sum(1, keepdims=True)
            assert np.abs(soft32 - soft16).max() < 2e-3
        np.testing.assert_array_equal(a[key][2], b[key][2])  # token log-prob and entropy stay float32
    assert summary.bytes_written < sum(p["bytes"] for p in s32.read_manifest()["parts"])


# ----------------------------------------------------------------------------- batching


def test_plan_batches_buckets_and_caps():
    lengths = [5, 30, 7, 12, 30, 2, 9, 11]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 40
    assert [len(b) for b in plan_batches(lengths, batch_size=8)] == [8]
    assert [len(b) for b in plan_batches([50, 3], batch_size=8, max_batch_tokens=10)] == [1, 1]


def test_max_batch_tokens_gives_same_targets(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = _new_store(tmp_path / "a", assets["vocab"])
    b = _new_store(tmp_path / "b", assets["vocab"])
    _run(assets, data, a, batch_size=1)
    _run(assets, data, b, batch_size=8, max_batch_tokens=60, chunk_positions=1000)
    _assert_same(read_all_targets(a), read_all_targets(b))


# ----------------------------------------------------------------------------- post-only passes

WORDS = ["cat", "dog", "movie", "film", "great", "terrible", "review", "story", "fox", "thing"]


def _many_rows(count: int, responses: int, seed: int = 0) -> list[dict]:
    """`count` rows (prompts of 1-6 words) sharing `responses` distinct two-word answers."""
    rng = random.Random(seed)
    answers = [f"{a} {b}." for a, b in itertools.permutations(WORDS, 2)][:responses]
    return [
        {"id": f"ex-{i:03d}", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
         "completion": answers[i % responses]}
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture
def post_passes(monkeypatch):
    """Rows of every post-only forward pass `run_precompute` makes (the LM-head probe skipped)."""
    from pact.pipeline.precompute import compute, model

    rows: list[int] = []
    original = compute.reference_targets

    def counting(model, ids, mask, positions, safety_ids, chunk=256, *, target_ids=None):
        if target_ids is None:  # full-context passes give the teacher-forced tokens
            rows.append(ids.shape[0])
        return original(model, ids, mask, positions, safety_ids, chunk, target_ids=target_ids)

    monkeypatch.setattr(compute, "reference_targets", counting)
    monkeypatch.setattr(model, "check_head_matches_forward", lambda *args: None)
    return rows


def test_post_only_passes_are_full_batches_across_example_batches(assets, tmp_path, post_passes):
    """16 distinct responses first met across 12 example batches: 4 full post-only passes
    (one per example batch that meets a new response would be ~10)."""
    data = _write_jsonl(tmp_path / "d.jsonl", _many_rows(48, 16))
    store = _new_store(tmp_path / "store", assets["vocab"])
    summary, _ = _run(assets, data, store, batch_size=4, examples_per_part=64)
    assert summary.responses_computed == 16
    assert post_passes == [4, 4, 4, 4]
    one = _new_store(tmp_path / "one", assets["vocab"])
    _run(assets, data, one, batch_size=1)  # every pass a single sequence
    _assert_same(read_all_targets(store), read_all_targets(one))


def test_post_only_passes_follow_parts_and_queue_limit(assets, tmp_path, post_passes, monkeypatch):
    """With parts of 8 examples each part's new responses are computed together, at most
    one partial pass per part; a part's post-only rows are registered with it. The queue
    limit (POST_QUEUE_BATCHES batches of responses) caps the work planned at once."""
    from pact.pipeline.precompute import compute

    data = _write_jsonl(tmp_path / "d.jsonl", _many_rows(48, 16))
    store = _new_store(tmp_path / "store", assets["vocab"])
    summary, _ = _run(assets, data, store, batch_size=4, examples_per_part=8)
    parts = store.parts("targets")
    assert len(parts) == 6 and summary.responses_computed == 16
    assert math.ceil(16 / 4) <= len(post_passes) <= math.ceil(16 / 4) + len(parts)
    available: set[str] = set()  # responses registered so far, in manifest order
    for entry in store.read_manifest()["parts"]:
        table = pq.read_table(store.resolve(entry["path"]), columns=["response_hash"])
        hashes = set(table.column("response_hash").to_pylist())
        if entry["kind"] == "post":
            available |= hashes
        else:
            assert hashes <= available, entry["path"]

    post_passes.clear()
    sizes: list[int] = []
    original = compute.post_only_targets

    def recording(model, responses, *rest):
        sizes.append(len(responses))
        return original(model, responses, *rest)

    monkeypatch.setattr(compute, "POST_QUEUE_BATCHES", 1)
    monkeypatch.setattr(compute, "post_only_targets", recording)
    limited = _new_store(tmp_path / "limited", assets["vocab"])
    _run(assets, data, limited, batch_size=4, examples_per_part=64)
    assert sizes == [4, 4, 4, 4] and post_passes == [4, 4, 4, 4]
    _assert_same(read_all_targets(limited), read_all_targets(store))


def test_plan_post_only_groups():
    def item(response: str) -> SimpleNamespace:
        return SimpleNamespace(response_hash=response, response_ids=np.array([ord(response)]))

    todo = [item(r) for r in "aabcdaefgh"]  # parts of 4: aabc | daef | gh
    groups = plan_post_only(todo, stored={"c"}, starts=[0, 4, 8], limit=2)
    assert [(i, sorted(g)) for i, g in groups] == [(0, ["a", "b"]), (4, ["d", "e"]), (7, ["f"]), (8, ["g", "h"])]
    first = {"z": np.array([1]), "a": np.array([2])}
    groups = plan_post_only(todo, stored=set(), starts=[0], limit=3, first=first)
    assert [(i, list(g)) for i, g in groups] == [(0, ["z", "a", "b"]), (3, ["c", "d", "e"]), (7, ["f", "g", "h"])]
    assert plan_post_only([], stored=set(), starts=[0], limit=2, first=first) == [(0, first)]
    with pytest.raises(PactError, match="at least 1"):
        plan_post_only(todo, stored=set(), starts=[0], limit=0)


def test_parts_hold_whole_batches():
    """A part closes at the first batch end with at least --part-size examples."""
    batches = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10], [11]]
    assert part_starts(batches, 5) == [0, 6, 11]
    assert part_starts(batches, 1) == [0, 3, 6, 8, 11, 12]
    assert part_starts(batches, 100) == [0]
    with pytest.raises(PactError, match="at least 1"):
        part_starts(batches, 0)


# ----------------------------------------------------------------------------- non-finite repair


def _rewrite_rows(store: Store, kind: str, key_value: str, edit) -> None:
    """Rewrite the part of `kind` holding rows keyed `key_value` as pyarrow writes it
    (`edit(table, hit) -> table`), keeping its manifest entry's rows and bytes in step."""
    key = "example_id" if kind == "targets" else "response_hash"
    for entry in store.parts(kind):
        path = store.resolve(entry["path"])
        table = pq.read_table(path)
        hit = np.asarray(table.column(key).to_pylist()) == key_value
        if not hit.any():
            continue
        table = edit(table, hit)
        pq.write_table(table, path)

        def update(manifest, path=entry["path"], rows=table.num_rows, size=path.stat().st_size):
            for part in manifest["parts"]:
                if part["path"] == path:
                    part.update(rows=rows, bytes=size)

        store.update_manifest(update)
        return
    raise AssertionError(f"no {kind} rows for {key_value}")


def _nan_into(column: str):
    def edit(table: pa.Table, hit: np.ndarray) -> pa.Table:
        index = table.schema.get_field_index(column)
        kind = table.schema.field(index).type
        if pa.types.is_fixed_size_list(kind):
            values = np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)
            values[np.flatnonzero(hit)[-1], 1] = np.nan
            flat = pa.array(values.reshape(-1).astype(kind.value_type.to_pandas_dtype()), kind.value_type)
            array = pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
        else:
            values = table.column(column).to_numpy().copy()
            values[np.flatnonzero(hit)[0]] = -np.inf
            array = pa.array(values, kind)
        return table.set_column(index, column, array)

    return edit


@pytest.mark.parametrize(
    ("column", "value_dtype"),
    [("full_logprobs", "float32"), ("full_logprobs", "float16"), ("token_logprob", "float32"),
     ("post_logprobs", "float32")],
)  # fmt: skip
def test_rerun_repairs_non_finite_stored_values(column, value_dtype, assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    _run(assets, data, store, value_dtype=value_dtype)
    clean = read_all_targets(store)
    victim = load_examples(data).examples[4].example_id
    kind = "post" if column == "post_logprobs" else "targets"
    key = victim if kind == "targets" else TargetReader(store).get(victim).response_hash
    _rewrite_rows(store, kind, key, _nan_into(column))
    if column != "token_logprob":
        with pytest.raises(PactError, match="NaN or inf"):
            TargetReader(store).get(victim)

    summary, notes = _run(assets, data, store, value_dtype=value_dtype)
    if kind == "targets":
        assert (summary.non_finite, summary.computed, summary.skipped) == (1, 1, len(ROWS) - 1)
        assert summary.responses_repaired == 0
        assert "1 recomputed (non-finite)" in summary.line()
        assert any("1 examples hold NaN or inf" in n for n in notes)
    else:  # the response is recomputed, not the examples using it
        assert (summary.non_finite, summary.computed, summary.responses_repaired) == (0, 0, 1)
        assert summary.responses_computed == 1
        assert "1 post-only response recomputed (non-finite or missing)" in summary.line()
    repaired = read_all_targets(store)  # reads every value, refusing NaN/inf
    assert all(np.isfinite(v[2]).all() for v in repaired.values())
    _assert_same(repaired, clean)
    tokenizer = load_tokenizer(assets["ref"])
    check_examples([encode_example(tokenizer, e, EncodingOptions(64)) for e in load_examples(data).examples], TargetReader(store))
    assert _target_rows(store) == sum(len(v[1]) for v in clean.values())  # each example once
    distinct = {v[1].tobytes(): len(v[1]) for v in clean.values()}  # response ids -> steps
    assert sum(p["rows"] for p in store.parts("post")) == sum(distinct.values())  # each response once
    _assert_parts_match_manifest(store)
    again, _ = _run(assets, data, store, value_dtype=value_dtype)
    assert (again.computed, again.non_finite, again.responses_repaired, again.parts_written) == (0, 0, 0, 0)


def test_rerun_recomputes_missing_post_only_rows(assets, tmp_path):
    """A stored example whose response has no post-only rows (what a kill between dropping
    non-finite post rows and writing new ones leaves) gets them back without being recomputed."""
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    _run(assets, data, store)
    clean = read_all_targets(store)
    response = TargetReader(store).get(load_examples(data).examples[1].example_id).response_hash
    _rewrite_rows(store, "post", response, lambda table, hit: table.filter(pa.array(~hit)))
    with pytest.raises(PactError, match="post-only targets of its response are missing"):
        read_all_targets(store)
    summary, notes = _run(assets, data, store)
    assert (summary.computed, summary.responses_repaired, summary.responses_computed) == (0, 1, 1)
    assert any("non-finite or missing post-only targets" in n for n in notes)
    _assert_same(read_all_targets(store), clean)


# ----------------------------------------------------------------------------- resume, incremental, stale


class _Crash(Exception):
    pass


def test_interrupted_run_resumes_to_same_content(assets, tmp_path, monkeypatch):
    from pact.pipeline.precompute import run

    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    reference = _new_store(tmp_path / "ref-store", assets["vocab"])
    _run(assets, data, reference)

    store = _new_store(tmp_path / "store", assets["vocab"])

    class CrashingWriter(run.TargetWriter):
        def add_example(self, *args, **kwargs):
            if self.parts_written >= 2:
                raise _Crash("killed")
            super().add_example(*args, **kwargs)

    monkeypatch.setattr(run, "TargetWriter", CrashingWriter)
    with pytest.raises(_Crash):
        _run(assets, data, store)
    monkeypatch.undo()
    registered = len(TargetReader(store))
    assert registered == 8  # two parts: --part-size 3 closes each at the end of a batch of 4
    # what a kill during a write leaves: an unregistered part of this shard and a temporary
    (store.root / "targets" / "part-s0of1-deadbeef0000.parquet").write_bytes(b"half")
    (store.root / "post" / ".tmp-part-s0of1-0123456789ab.parquet.abcd1234").write_bytes(b"half")
    summary, _ = _run(assets, data, store)
    assert (summary.computed, summary.skipped) == (len(ROWS) - registered, registered)
    _assert_same(read_all_targets(store), read_all_targets(reference), atol=0)  # bit for bit: same batches
    assert _target_rows(store) == _target_rows(reference)  # every example exactly once
    assert not list(store.root.rglob(".tmp-*"))
    _assert_parts_match_manifest(store)


def test_incremental_computes_only_new_rows(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    first, _ = _run(assets, data, store)
    again, _ = _run(assets, data, store)
    assert (again.computed, again.skipped, again.parts_written, again.bytes_written) == (0, len(ROWS), 0, 0)
    _write_jsonl(data, ROWS + MORE_ROWS)
    summary, _ = _run(assets, data, store)
    assert (summary.computed, summary.skipped, summary.stale) == (len(MORE_ROWS), len(ROWS), 0)
    old_responses = {r["completion"] for r in ROWS}
    assert summary.responses_computed == len({r["completion"] for r in MORE_ROWS} - old_responses)
    fresh = _new_store(tmp_path / "fresh", assets["vocab"])
    _run(assets, data, fresh)
    _assert_same(read_all_targets(store), read_all_targets(fresh))


def test_stale_examples_are_recomputed_when_max_length_changes(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    _run(assets, data, store, max_length=128)
    tokenizer = load_tokenizer(assets["ref"])
    examples = load_examples(data).examples
    old = {e.example_id: encode_example(tokenizer, e, EncodingOptions(128)).token_hash for e in examples}
    new = {e.example_id: encode_example(tokenizer, e, EncodingOptions(64)) for e in examples}
    changed = {k for k in old if old[k] != new[k].token_hash}
    assert 0 < len(changed) < len(examples)
    summary, notes = _run(assets, data, store, max_length=64)
    assert (summary.stale, summary.computed, summary.skipped) == (len(changed), len(changed), len(examples) - len(changed))
    assert any("new token hash" in n for n in notes)
    reader = TargetReader(store)
    assert sorted(reader.example_ids()) == sorted(old)
    for example_id, enc in new.items():
        assert reader.token_hash(example_id) == enc.token_hash
        assert reader.get(example_id).full_logprobs.shape[0] == enc.response_length
    assert _target_rows(store) == sum(e.response_length for e in new.values())
    assert store.read_manifest()["reference"]["encoding"]["max_length"] == 64
    fresh = _new_store(tmp_path / "fresh", assets["vocab"])
    _run(assets, data, fresh, max_length=64)
    _assert_same(read_all_targets(store), read_all_targets(fresh))
    assert not list(store.root.rglob(".tmp-*"))
    _assert_parts_match_manifest(store)


def test_new_reference_model_recomputes_everything(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    _run(assets, data, store)
    old_parts = {p["path"] for p in store.read_manifest()["parts"]}
    summary, notes = _run(assets, data, store, model="other")
    assert summary.reference_reset and summary.computed == len(ROWS) and summary.skipped == 0
    assert sum("another reference (model changed)" in n for n in notes) == 1
    manifest = store.read_manifest()
    assert not old_parts & {p["path"] for p in manifest["parts"]}
    assert not any(store.resolve(p).exists() for p in old_parts)
    fresh = _new_store(tmp_path / "fresh", assets["vocab"])
    _run(assets, data, fresh, model="other")
    _assert_same(read_all_targets(store), read_all_targets(fresh))
    assert manifest["reference"] == fresh.read_manifest()["reference"]


def test_reference_entry_in_manifest(assets, tmp_path):
    from pact.core.encoding import encoding_fingerprints
    from pact.core.models import model_fingerprint
    from pact.store.safety import load_safety_set

    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    store = _new_store(tmp_path / "store", assets["vocab"])
    _run(assets, data, store, value_dtype="float16")
    entry = store.read_manifest()["reference"]
    tokenizer = load_tokenizer(assets["ref"])
    expected = {
        "model": model_fingerprint(assets["ref"]),
        "model_path": str(Path(assets["ref"]).resolve()),
        "compute_dtype": "float32",
        "value_dtype": "float16",
        "safety_tokens": load_safety_set(store).fingerprint,
        **encoding_fingerprints(tokenizer, EncodingOptions(max_length=64)),
    }
    assert entry == expected


def test_two_shards_equal_one_run(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS + MORE_ROWS)
    single = _new_store(tmp_path / "single", assets["vocab"])
    sharded = _new_store(tmp_path / "sharded", assets["vocab"])
    _run(assets, data, single)
    ids = [e.example_id for e in load_examples(data).examples]
    owned = [sum(shard_of(i, 2) == k for i in ids) for k in (0, 1)]
    assert min(owned) > 0
    s0, _ = _run(assets, data, sharded, shard=Shard.parse("0/2"))
    s1, _ = _run(assets, data, sharded, shard=Shard.parse("1/2"))
    assert (s0.computed, s1.computed) == tuple(owned)
    assert (s0.examples, s1.examples) == tuple(owned)
    _assert_same(read_all_targets(sharded), read_all_targets(single))
    names = [p["path"] for p in sharded.read_manifest()["parts"]]
    assert all("-s0of2-" in n or "-s1of2-" in n for n in names)
    assert _target_rows(sharded) == _target_rows(single)


def test_concurrent_shards_equal_one_run(assets, tmp_path):
    """Two shards running at the same time (threads; the manifest lock is per open file)."""
    import threading

    data = _write_jsonl(tmp_path / "d.jsonl", ROWS + MORE_ROWS)
    single = _new_store(tmp_path / "single", assets["vocab"])
    shared = _new_store(tmp_path / "shared", assets["vocab"])
    _run(assets, data, single)
    errors: list[BaseException] = []

    def shard(text: str) -> None:
        try:
            _run(assets, data, shared, shard=Shard.parse(text), examples_per_part=1)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=shard, args=(t,)) for t in ("0/2", "1/2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    _assert_same(read_all_targets(shared), read_all_targets(single))


def test_bfloat16_compute_is_close_to_float32(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    s32 = _new_store(tmp_path / "s32", assets["vocab"])
    s16 = _new_store(tmp_path / "s16", assets["vocab"])
    _run(assets, data, s32)
    _run(assets, data, s16, dtype="bfloat16")
    assert s16.read_manifest()["reference"]["compute_dtype"] == "bfloat16"
    _assert_same(read_all_targets(s16), read_all_targets(s32), atol=0.1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0/1", Shard(0, 1)), ("3/4", Shard(3, 4)), (" 1 / 2 ", Shard(1, 2))],
)
def test_shard_parse(text, expected):
    assert Shard.parse(text) == expected


def test_torchrun_defaults():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert torchrun_defaults(None, "cpu", env) == (Shard(3, 4), "cpu")
    assert torchrun_defaults("0/2", "cpu", env) == (Shard(0, 2), "cpu")
    assert torchrun_defaults(None, "cpu", {}) == (Shard(0, 1), "cpu")
    expected_device = "cuda:1" if torch.cuda.is_available() else "auto"
    assert torchrun_defaults(None, "auto", env)[1] == expected_device
    with pytest.raises(PactError, match="--shard"):
        torchrun_defaults(None, "cpu", {"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("text", ["2/2", "a/b", "1of2", "0/0", "-1/2", "1/2/3", ""])
def test_bad_shard_syntax(text):
    with pytest.raises(PactError, match="--shard"):
        Shard.parse(text)


# ----------------------------------------------------------------------------- SQL


def test_confidences_view_after_precompute(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    store = _new_store(tmp_path / "store", assets["vocab"])
    _run(assets, data, store)
    sql = "select step, avg(prob) from confidences where context='full' group by step order by step"
    columns, rows = query(store, sql)
    assert columns[0] == "step"
    contents = read_all_targets(store)
    longest = max(v[4].shape[0] for v in contents.values())
    assert [r[0] for r in rows] == list(range(longest))
    for step, mean in rows:
        values = [np.exp(v[4][step]) for v in contents.values() if v[4].shape[0] > step]
        assert mean == pytest.approx(float(np.mean(np.concatenate(values))), rel=1e-5)
    result = CliRunner().invoke(sql_command, [str(store.root), sql, "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == longest + 1 and lines[1].startswith("0,")


# ----------------------------------------------------------------------------- bad inputs


def _bad_input_case(case: str, assets, tmp_path) -> tuple[Path, Path, Path, PrecomputeOptions]:
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    store = _new_store(tmp_path / "store", assets["vocab"])
    model = assets["ref"]
    options = _opts()
    if case == "no safety set":
        store = Store(tmp_path / "empty")
        store.update_manifest(lambda m: None)
    elif case == "no store":
        store = Store(tmp_path / "missing")
    elif case in ("small vocab", "other vocab"):
        model = tmp_path / case.replace(" ", "-")
        make_model(model, assets["vocab"] - 10 if case == "small vocab" else assets["vocab"] + 5)
        load_tokenizer(assets["ref"]).save_pretrained(str(model))
    elif case == "id collision":
        data = _write_jsonl(tmp_path / "d.jsonl", [dict(ROWS[0], id="a"), dict(ROWS[1], id="a")])
    elif case == "missing model":
        model = tmp_path / "nope"
    elif case == "prompt too long":
        data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"id": "long", "prompt": "cat " * 80, "completion": "no"}])
    return model, data, store.root, options


BAD_INPUTS = [
    ("no safety set", r"has no safety-token set: run `pact tokens` first"),
    ("no store", r"does not exist \(run `pact tokens`"),
    ("small vocab", r"has 253 vocabulary entries .* built on a 263-token vocabulary \(largest safety id 262\)"),
    ("other vocab", r"has 268 vocabulary entries .* 263-token vocabulary"),
    ("id collision", r"id 'a' is used by row 1 and row 2 with different content"),
    ("missing model", r"model path .*nope does not exist"),
    ("prompt too long", r"example long: the prompt has \d+ tokens, leaving no room .*max_length 64 .*--skip-invalid"),
]


@pytest.mark.parametrize(("case", "message"), BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_bad_inputs_are_refused_and_write_nothing(case, message, assets, tmp_path):
    model, data, root, options = _bad_input_case(case, assets, tmp_path)
    before = _snapshot(root) if root.exists() else None
    with pytest.raises(PactError, match=message) as info:
        run_precompute(model, data, root, options, echo=lambda m: None)
    assert "\n" not in str(info.value)
    assert (_snapshot(root) if root.exists() else None) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value_dtype": "int8"}, r"^unknown --value-dtype 'int8'; expected one of float32, float16$"),
        ({"device": "tpu"}, r"^--device 'tpu' must be auto, cpu, cuda or cuda:<index>$"),
        ({"batch_size": 0}, r"^--batch-size must be an integer >= 1, got 0$"),
        ({"examples_per_part": 0}, r"^--part-size must be an integer >= 1, got 0$"),
    ],
)
def test_bad_options_are_refused_when_built(change, message):
    with pytest.raises(PactError, match=message):
        PrecomputeOptions(**change)


def test_skip_invalid_reports_and_skips(assets, tmp_path):
    rows = ROWS[:3] + [{"id": "long", "prompt": "cat " * 80, "completion": "no"}, {"prompt": "x"}]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    store = _new_store(tmp_path / "store", assets["vocab"])
    with pytest.raises(PactError, match="row 5"):
        _run(assets, data, store)
    summary, notes = _run(assets, data, store, skip_invalid=True)
    assert summary.computed == 3 and len(summary.dropped) == 2
    assert any("row 5: missing field 'completion'" in n for n in notes)
    assert any("example long" in n for n in notes)
    assert "long" not in TargetReader(store)
    assert "2 invalid dropped" in summary.line()


# ----------------------------------------------------------------------------- CLI


def test_cli_runs_and_prints_summary(assets, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    store = _new_store(tmp_path / "store", assets["vocab"])
    args = ["--reference", str(assets["ref"]), "--data", str(data), "--store", str(store.root),
            "--device", "cpu", "--max-length", "64", "--batch-size", "2", "--no-progress"]
    result = CliRunner().invoke(precompute_command, args)
    assert result.exit_code == 0, result.output
    assert "precompute: 4 examples computed, 0 skipped" in result.output
    assert len(TargetReader(store)) == 4
    again = CliRunner().invoke(precompute_command, args)
    assert "precompute: 0 examples computed, 4 skipped" in again.output
    bad = CliRunner().invoke(precompute_command, args + ["--shard", "2/2"])
    assert isinstance(bad.exception, PactError) and "--shard" in str(bad.exception)
    assert "--chunk-positions" in CliRunner().invoke(precompute_command, ["--help"]).output


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_DATA.is_file(), reason=f"shared data set {REAL_DATA} is absent")
def test_real_sst2_rows_dedupe_post_targets(assets, tmp_path):
    rows = json.loads(REAL_DATA.read_text(encoding="utf-8"))[:32]
    data = tmp_path / "sst2_32.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    store = _new_store(tmp_path / "store", assets["vocab"])
    summary, _ = _run(assets, data, store, max_length=512, batch_size=8, examples_per_part=16)
    examples = load_examples(data).examples
    distinct = {e.response for e in examples}
    assert summary.computed == len(examples) == 32
    assert summary.responses_computed == len(distinct) < len(examples)
    all_post = [
        h
        for p in store.parts("post")
        for h in pq.read_table(store.resolve(p["path"]), columns=["response_hash", "step"]).to_pylist()
    ]
    entries = {(r["response_hash"]) for r in all_post if r["step"] == 0}
    assert len(entries) == sum(r["step"] == 0 for r in all_post) == len(distinct)
    target_hashes = {r[0] for r in query(store, "select distinct response_hash from targets")[1]}
    assert target_hashes == entries


def _short_context_model(assets, root: Path, positions: int) -> Path:
    """A copy of the reference whose config.json states a context window of `positions`."""
    target = root / f"ref-context-{positions}"
    shutil.copytree(assets["ref"], target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_examples_past_the_context_window_are_warned_about(assets, tmp_path):
    """A --max-length above the reference's context window lets examples run past the
    positions it was trained on: precompute says how many, and the flag that cuts them."""
    model = _short_context_model(assets, tmp_path, 20)
    rows = [{"id": f"x{i}", "prompt": "hello " * (i + 1), "completion": "positive"} for i in range(4)]
    data = _write_jsonl(tmp_path / "long.jsonl", rows)
    lengths = sorted(
        len(encode_example(load_tokenizer(model), e, EncodingOptions(max_length=64)).input_ids)
        for e in load_examples(data).examples
    )
    longer = sum(n > 20 for n in lengths)
    assert 0 < longer < 4, lengths  # the case is not vacuous
    notes: list[str] = []
    run_precompute(model, data, _new_store(tmp_path / "s1", assets["vocab"]).root, _opts(), echo=notes.append)
    assert (
        f"warning: {longer} of 4 examples are longer than the model's context window (20 tokens, "
        "config.json): positions past it are outside what the model was trained on; "
        "--max-length 20 keeps them within it (the response tail is cut; --skip-invalid drops those "
        "whose prompt alone is longer)"
    ) in notes
    notes.clear()
    run_precompute(model, data, _new_store(tmp_path / "s2", assets["vocab"]).root, _opts(max_length=20, skip_invalid=True), echo=notes.append)
    assert not [n for n in notes if n.startswith("warning:")]


def test_context_length_reads_the_usual_config_keys(tmp_path):
    cases = [
        ({"max_position_embeddings": 4096}, 4096),
        ({"n_positions": 1024}, 1024),
        ({"text_config": {"max_position_embeddings": 8192}}, 8192),
        ({"max_position_embeddings": None, "seq_length": 2048}, 2048),
        ({"vocab_size": 10}, None),
    ]
    for config, expected in cases:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert context_length(tmp_path) == expected, config
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(PactError, match="config.json is not a JSON object"):
        context_length(tmp_path)
