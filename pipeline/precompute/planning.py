"""Which examples and responses run together: length-bucketed batches, the parts they
fill (a part ends at a batch end) and when each post-only pass runs. Pure planning
over indices: no model, no store."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from pact.core.encoding import Encoded
from pact.core.errors import PactError


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Length-bucketed batches of indices into `lengths`, longest first.

    Each batch has at most `batch_size` items and rows x longest length <=
    `max_batch_tokens` (a single item longer than the cap forms its own batch).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current:
            longest = lengths[current[0]]
            full = len(current) >= batch_size
            too_many_tokens = max_batch_tokens is not None and (len(current) + 1) * longest > max_batch_tokens
            if full or too_many_tokens:
                batches.append(current)
                current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def part_starts(batches: list[list[int]], examples_per_part: int) -> list[int]:
    """Where each part begins in the writer's order (the batches one after the other).

    A part is closed at the first batch end where it holds at least `examples_per_part`
    examples: parts hold whole batches, so a rerun after a kill (which resumes at a part
    boundary) forms the same batches and its values equal an uninterrupted run's bit for bit.
    """
    if examples_per_part < 1:
        raise PactError(f"examples_per_part must be at least 1, got {examples_per_part}")
    starts, position, filled = [0], 0, 0
    for batch in batches:
        position += len(batch)
        filled += len(batch)
        if filled >= examples_per_part:
            starts.append(position)
            filled = 0
    return starts


def plan_post_only(
    todo: list[Encoded],
    stored: set[str],
    starts: Collection[int],
    limit: int,
    first: Mapping[str, np.ndarray] | None = None,
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """When to run which post-only passes: `[(i, {response_hash: response_ids}), ...]`,
    ascending in i; each group is computed right before the i-th example of `todo` (in
    the order the examples reach the writer) is written, and `i == len(todo)` at the end.

    Every distinct response not in `stored` is planned once, in the group of the first
    example that uses it. A group gathers the new responses of at most one part (parts
    begin at the indices `starts`, see `part_starts`) and at most `limit` of them:
    its passes run in full length-bucketed batches across example batches, a part holds
    the post-only rows of its examples (a killed run leaves whole parts behind, and the
    rerun plans the same groups), and the work held at once stays bounded. `first`
    (responses to compute whatever the examples) open the first group.
    """
    if limit < 1:
        raise PactError(f"limit must be at least 1, got {limit}")
    starts = set(starts)
    groups: list[tuple[int, dict[str, np.ndarray]]] = []
    done = set(stored)
    current: dict[str, np.ndarray] | None = None

    def add(index: int, response_hash: str, response_ids: np.ndarray) -> None:
        nonlocal current
        if response_hash in done:
            return
        if current is None or len(current) >= limit:
            current = {}
            groups.append((index, current))
        current[response_hash] = response_ids
        done.add(response_hash)

    for response_hash, response_ids in (first or {}).items():
        add(0, response_hash, response_ids)
    for index, item in enumerate(todo):
        if index and index in starts:
            current = None  # a new part: its responses form new groups
        add(index, item.response_hash, item.response_ids)
    return groups
