"""A small store written with the real writer: |S| = 3 safety tokens, 7 examples of 2-4
steps in parts of 3 (shared by the store, SQL, CLI and hostile-input tests)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pact.store import Store, TargetWriter, safety_set_from_vector, save_safety_set
from pact.store.safety import TOKENS_SCHEMA

S = 3


def make_safety(store: Store) -> None:
    vector = np.zeros(20, np.float32)
    vector[[3, 5, 7]] = [0.5, -0.2, 0.1]
    safety = safety_set_from_vector(vector)
    table = pa.table(
        {
            "token_id": safety.token_ids,
            "idx": np.arange(S, dtype=np.int32),
            "token": ["a", "b", "c"],
            "aligned_prob": [0.3, 0.2, 0.1],
            "base_prob": [0.1, 0.1, 0.1],
            "score": [1.0, 2.0, 3.0],
            "value": vector[safety.token_ids].astype(float),
            "weight": safety.weights.astype(float),
            "rank": np.array([1, 2, 3], dtype=np.int32),
        },
        schema=TOKENS_SCHEMA,
    )
    save_safety_set(store, safety, table, {"aligned_model": "test"})


def example_values(i: int, steps: int) -> dict:
    rng = np.random.default_rng(i)
    return dict(
        example_id=f"ex{i}",
        token_hash=f"h{i}",
        response_hash=f"r{i % 2}-{steps}",
        token_ids=np.arange(steps) + i,
        token_logprobs=-rng.random(steps).astype(np.float32),
        entropy=rng.random(steps).astype(np.float32),
        full_logprobs=np.log(rng.dirichlet(np.ones(S), steps)).astype(np.float32),
    )


def fill(store: Store, count: int = 7, per_part: int = 3) -> dict:
    writer = TargetWriter(store, S, examples_per_part=per_part)
    written = {}
    for i in range(count):
        values = example_values(i, 2 + i % 3)
        post = np.full((2 + i % 3, S), np.log(1 / S), np.float32)
        writer.add_post(values["response_hash"], post)
        writer.add_example(**values)
        written[values["example_id"]] = values
    writer.close()
    return written
