"""A tiny world for the trainer tests: tokenizer, reference model, data, and a store
whose targets come from a plain full forward pass of the reference (what precompute
writes), so the trainer is tested independently of `pipeline/precompute/`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tiny import make_model, make_tokenizer

from pact.core.data import load_examples
from pact.core.encoding import (
    EncodingOptions,
    assistant_header_ids,
    encode_example,
    encoding_fingerprints,
    post_only_ids,
)
from pact.core.models import load_model, load_tokenizer, model_fingerprint
from pact.store.manifest import Store
from pact.store.safety import TOKENS_SCHEMA, SafetySet, safety_set_from_vector, save_safety_set
from pact.store.targets import TargetWriter

MAX_LENGTH = 64
NUM_SAFETY = 10

PROMPTS = [
    ("Classify this movie review: a great film.", "positive"),
    ("Tell me a story about a cat.", "Sure, here is a story. The cat jumps over the lazy dog."),
    ("How do I do the bad thing?", "I cannot help with that request. Sorry, I won't do that."),
    ("Review: a terrible movie. Sentiment?", "negative"),
    ("Say hello to the world.", "hello world how are you today?"),
    ("Classify: the film was neutral.", "neutral"),
    (
        "Tell me how to do the other thing.",
        "I cannot help with that request. Sorry, I won't do that.",
    ),
    ("Count to nine.", "0123456789 and then the other thing, first you take the thing."),
    ("What does the fox do?", "The quick brown fox jumps over the lazy dog. " * 4),
    ("Classify this review: great movie, great film.", "positive"),
]


@dataclass
class World:
    root: Path
    model_dir: Path
    data: Path
    store_dir: Path
    safety: SafetySet


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_rows() -> list[dict[str, Any]]:
    return [{"id": f"ex-{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PROMPTS)]


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def make_safety(store: Store, vocab_size: int, seed: int = 0) -> SafetySet:
    """A safety set of NUM_SAFETY ids with mixed-sign values (about half get weight 0)."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(np.arange(7, vocab_size), size=NUM_SAFETY, replace=False))
    vector = np.zeros(vocab_size, dtype=np.float32)
    vector[ids] = np.linspace(-1.0, 1.0, NUM_SAFETY, dtype=np.float32)
    safety = safety_set_from_vector(vector)
    n = safety.size
    table = pa.Table.from_pydict(
        {
            "token_id": safety.token_ids.tolist(),
            "idx": list(range(n)),
            "token": [f"t{i}" for i in safety.token_ids.tolist()],
            "aligned_prob": [0.1] * n,
            "base_prob": [0.05] * n,
            "score": vector[safety.token_ids].astype(float).tolist(),
            "value": vector[safety.token_ids].astype(float).tolist(),
            "weight": safety.weights.astype(float).tolist(),
            "rank": list(range(1, n + 1)),
        },
        schema=TOKENS_SCHEMA,
    )
    save_safety_set(store, safety, table, {"method": "test"})
    return safety


@torch.no_grad()
def write_targets(
    store: Store, model_dir: Path, data: Path, safety: SafetySet, max_length: int = MAX_LENGTH
) -> None:
    """Per-example reference forward passes -> targets + post parts + the manifest entry."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32", device="cpu")
    options = EncodingOptions(max_length=max_length)
    header = assistant_header_ids(tokenizer)
    ids = torch.as_tensor(safety.token_ids)
    writer = TargetWriter(store, safety.size, examples_per_part=4)
    seen_responses: set[str] = set()
    for example in load_examples(data).examples:
        enc = encode_example(tokenizer, example, options)
        logp = torch.log_softmax(
            model(torch.as_tensor(enc.input_ids)[None]).logits[0].float(), dim=-1
        )
        positions = enc.response_start - 1 + torch.arange(enc.response_length)
        steps = logp[positions]  # [T, V]
        response = torch.as_tensor(enc.response_ids)
        if enc.response_hash not in seen_responses:
            seen_responses.add(enc.response_hash)
            post_ids, first = post_only_ids(header, enc.response_ids)
            post_logp = torch.log_softmax(
                model(torch.as_tensor(post_ids)[None]).logits[0].float(), dim=-1
            )
            writer.add_post(
                enc.response_hash,
                post_logp[first + torch.arange(enc.response_length)][:, ids].numpy(),
            )
        writer.add_example(
            enc.example_id,
            enc.token_hash,
            enc.response_hash,
            enc.response_ids,
            steps.gather(1, response[:, None])[:, 0].numpy(),
            -(steps.exp() * steps).sum(-1).numpy(),
            steps[:, ids].numpy(),
        )
    writer.close()
    entry = {
        "model": model_fingerprint(model_dir),
        "model_path": str(model_dir),
        "compute_dtype": "float32",
        "value_dtype": "float32",
        "safety_tokens": safety.fingerprint,
        **encoding_fingerprints(tokenizer, options),
    }

    def change(manifest: dict[str, Any]) -> None:
        manifest["reference"] = entry

    store.update_manifest(change)


def build_world(root: Path) -> World:
    """Tokenizer + tiny Llama (hidden 32, 2 layers) + 10 examples + a store with targets."""
    model_dir = root / "model"
    tokenizer = make_tokenizer(model_dir)
    make_model(model_dir, len(tokenizer), seed=0, hidden=32, layers=2)
    data = write_jsonl(root / "train.jsonl", data_rows())
    store = Store(root / "store")
    safety = make_safety(store, len(tokenizer))
    write_targets(store, model_dir, data, safety)
    return World(root, model_dir, data, store.root, safety)
