"""Reference targets: Parquet parts keyed by example_id, written atomically, read by id.

`targets/part-*.parquet` holds one row per (example, response step):
    example_id string, token_hash string, response_hash string, step int32,
    token_id int32 (teacher-forced token), token_logprob float32 (its reference
    log-prob), entropy float32 (nats, full vocabulary), full_logprobs
    fixed_size_list<float32|float16>[|S|] (full-vocabulary log-probs of the
    safety tokens, ids ascending, full context).
`post/part-*.parquet` holds one row per (distinct response, step):
    response_hash string, step int32, post_logprobs fixed_size_list[|S|]
    (post-only context: assistant header + response).
Rows of one example (one response) are contiguous and ordered by step.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pact.core.atomic import TEMP_PREFIX, atomic_write_with
from pact.core.errors import PactError
from pact.store.lock import cleanup_allowed
from pact.store.manifest import Store, repair_advice, symlink_inside

VALUE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
ROW_GROUP_ROWS = 2048
DEFAULT_MEMORY_BUDGET_MB = 1024.0


def targets_schema(num_safety: int, value_dtype: str = "float32") -> pa.Schema:
    values = pa.list_(VALUE_DTYPES[value_dtype], num_safety)
    return pa.schema(
        [
            ("example_id", pa.string()),
            ("token_hash", pa.string()),
            ("response_hash", pa.string()),
            ("step", pa.int32()),
            ("token_id", pa.int32()),
            ("token_logprob", pa.float32()),
            ("entropy", pa.float32()),
            ("full_logprobs", values),
        ]
    )


def post_schema(num_safety: int, value_dtype: str = "float32") -> pa.Schema:
    values = pa.list_(VALUE_DTYPES[value_dtype], num_safety)
    return pa.schema(
        [("response_hash", pa.string()), ("step", pa.int32()), ("post_logprobs", values)]
    )


@dataclass
class ExampleTargets:
    """Cached reference statistics of one example; T = response length, S = |safety set|."""

    example_id: str
    token_hash: str
    response_hash: str
    token_ids: np.ndarray  # int64 [T]
    token_logprobs: np.ndarray  # float32 [T]
    entropy: np.ndarray  # float32 [T]
    full_logprobs: np.ndarray  # float32 [T, S]
    post_logprobs: np.ndarray  # float32 [T, S]


def _fixed_list(values: np.ndarray, num_safety: int, value_dtype: str) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=value_dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, num_safety)


class TargetWriter:
    """Buffers examples and writes a part (post part first, then targets part, then
    the manifest) every `examples_per_part` examples (None: only when `flush()` is
    called) and on `close()`.

    `shard_tag` names this writer's parts (e.g. `s0of1`); orphaned parts with the same
    tag (written but never registered by a killed run) are deleted when it opens.
    """

    def __init__(
        self,
        store: Store,
        num_safety: int,
        *,
        shard_tag: str = "s0of1",
        value_dtype: str = "float32",
        examples_per_part: int | None = 256,
    ) -> None:
        if value_dtype not in VALUE_DTYPES:
            raise PactError(f"value dtype {value_dtype!r} is not one of {sorted(VALUE_DTYPES)}")
        self.store = store
        self.num_safety = num_safety
        self.shard_tag = shard_tag
        self.value_dtype = value_dtype
        self.examples_per_part = examples_per_part
        self.bytes_written = 0
        self.parts_written = 0
        self._targets: list[dict[str, Any]] = []
        self._post: list[tuple[str, np.ndarray]] = []
        for kind in ("targets", "post"):  # readers refuse parts reached through a link: never write them
            if symlink_inside(store.root, kind) is not None:
                raise PactError(
                    f"{kind}/ in store {store.root} is a symbolic link (a store is one directory: move the "
                    f"whole store instead); {repair_advice(store.root)}"
                )
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Delete this shard's unregistered parts and temporaries, named as pact names them,
        when no live writer of the shard can own them (`lock.cleanup_allowed`)."""
        part = rf"part-{re.escape(self.shard_tag)}-[0-9a-f]{{12}}\.parquet"
        own = re.compile(rf"({re.escape(TEMP_PREFIX)}{part}\.[a-z0-9_]{{8}})|{part}")  # tempfile.mkstemp's suffix
        with cleanup_allowed(self.store.root, self.shard_tag) as allowed:
            if not allowed:
                return
            registered = {p["path"] for p in self.store.read_manifest()["parts"]}
            for kind in ("targets", "post"):
                directory = self.store.root / kind
                if not directory.is_dir() or directory.is_symlink():
                    continue
                for path in directory.iterdir():
                    match = own.fullmatch(path.name)
                    if match is None or path.is_symlink() or not path.is_file():
                        continue
                    if match.group(1) or f"{kind}/{path.name}" not in registered:
                        path.unlink(missing_ok=True)

    def add_post(self, response_hash: str, post_logprobs: np.ndarray) -> None:
        """Queue the post-only targets [T, S] of one distinct response."""
        self._check_values(post_logprobs, f"response {response_hash}")
        self._post.append((response_hash, np.asarray(post_logprobs)))

    def add_example(
        self,
        example_id: str,
        token_hash: str,
        response_hash: str,
        token_ids: np.ndarray,
        token_logprobs: np.ndarray,
        entropy: np.ndarray,
        full_logprobs: np.ndarray,
    ) -> None:
        """Queue one example's per-step targets; flushes a part when the buffer is full."""
        self._check_values(full_logprobs, f"example {example_id}")
        steps = full_logprobs.shape[0]
        if not (len(token_ids) == len(token_logprobs) == len(entropy) == steps) or steps == 0:
            raise PactError(f"example {example_id}: per-step arrays disagree in length or are empty")
        self._targets.append(
            dict(
                example_id=example_id,
                token_hash=token_hash,
                response_hash=response_hash,
                token_ids=np.asarray(token_ids),
                token_logprobs=np.asarray(token_logprobs),
                entropy=np.asarray(entropy),
                full_logprobs=np.asarray(full_logprobs),
            )
        )
        if self.examples_per_part is not None and len(self._targets) >= self.examples_per_part:
            self.flush()

    def _check_values(self, values: np.ndarray, what: str) -> None:
        if values.ndim != 2 or values.shape[1] != self.num_safety:
            raise PactError(f"{what}: targets of shape {values.shape}, expected [steps, {self.num_safety}]")
        if not np.all(np.isfinite(values)):
            raise PactError(f"{what}: non-finite reference log-probabilities")

    def flush(self) -> None:
        """Write buffered rows as parts and register them in the manifest."""
        if not self._targets and not self._post:
            return
        name = f"part-{self.shard_tag}-{uuid.uuid4().hex[:12]}.parquet"
        entries = []
        if self._post:
            table = self._post_table()
            entries.append(self._write("post", name, table, examples=len(self._post)))
        if self._targets:
            table = self._targets_table()
            entries.append(self._write("targets", name, table, examples=len(self._targets)))

        def change(manifest: dict[str, Any]) -> None:
            manifest["parts"].extend(entries)

        self.store.update_manifest(change)
        self.parts_written += 1
        self._targets, self._post = [], []

    def _write(self, kind: str, name: str, table: pa.Table, examples: int) -> dict[str, Any]:
        relative = f"{kind}/{name}"
        path = self.store.root / relative
        # Small row groups let the reader load one example's rows without the whole part;
        # dictionary encoding only pays for the repeated id/hash strings (and float16 values).
        dictionary = ["example_id", "token_hash", "response_hash"] if self.value_dtype == "float32" else True
        atomic_write_with(
            path,
            lambda p: pq.write_table(
                table,
                p,
                row_group_size=ROW_GROUP_ROWS,
                use_dictionary=[c for c in dictionary if c in table.column_names] if dictionary is not True else True,
                write_page_checksum=True,
            ),
        )
        size = os.path.getsize(path)
        self.bytes_written += size
        return {"kind": kind, "path": relative, "rows": table.num_rows, "examples": examples, "bytes": size}

    def _post_table(self) -> pa.Table:
        hashes, steps, values = [], [], []
        for response_hash, post in self._post:
            hashes += [response_hash] * post.shape[0]
            steps.append(np.arange(post.shape[0], dtype=np.int32))
            values.append(post)
        schema = post_schema(self.num_safety, self.value_dtype)
        return pa.Table.from_arrays(
            [
                pa.array(hashes, pa.string()),
                pa.array(np.concatenate(steps)),
                _fixed_list(np.concatenate(values), self.num_safety, self.value_dtype),
            ],
            schema=schema,
        )

    def _targets_table(self) -> pa.Table:
        rows = self._targets
        lengths = [r["full_logprobs"].shape[0] for r in rows]

        def repeat(key: str) -> pa.Array:
            return pa.array(np.repeat(np.array([r[key] for r in rows], dtype=object), lengths), pa.string())

        def concat(key: str, dtype: str) -> np.ndarray:
            return np.concatenate([np.asarray(r[key], dtype=dtype) for r in rows])

        schema = targets_schema(self.num_safety, self.value_dtype)
        return pa.Table.from_arrays(
            [
                repeat("example_id"),
                repeat("token_hash"),
                repeat("response_hash"),
                pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])),
                pa.array(concat("token_ids", "int32")),
                pa.array(concat("token_logprobs", "float32")),
                pa.array(concat("entropy", "float32")),
                _fixed_list(np.concatenate([r["full_logprobs"] for r in rows]), self.num_safety, self.value_dtype),
            ],
            schema=schema,
        )

    def close(self) -> None:
        self.flush()


def unreadable_part(path: Path, exc: BaseException, root: Path | None = None) -> PactError:
    """The error for a part that cannot be read; `root`: the store (default: the part's
    grandparent, `STORE/targets/part-*.parquet`)."""
    reason = " ".join(str(exc).split())[:160]
    advice = repair_advice(root if root is not None else path.parent.parent)
    return PactError(f"store part {path.name} is unreadable ({reason}); {advice}")


def check_part_schema(path: Path, kind: str, num_safety: int | None, root: Path | None = None) -> None:
    """PactError unless the part at `path` has the columns and types of `kind` for |S| = num_safety."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_part(path, exc, root) from None
    expected = targets_schema if kind == "targets" else post_schema
    allowed = [expected(num_safety or 1, dtype) for dtype in VALUE_DTYPES]
    if num_safety is None or not any(schema.equals(a) for a in allowed):
        raise PactError(
            f"store part {path.name} does not have the expected columns and types for "
            f"{num_safety} safety tokens (corrupted or foreign part?); "
            f"{repair_advice(root if root is not None else path.parent.parent)}"
        )


@dataclass
class _Location:
    part: int
    start: int
    steps: int


class TargetReader:
    """Look targets up by example_id in O(1).

    Opening reads only the key columns of each registered part (example_id/step or
    response_hash/step) to build an index; `get()` then reads the rows of one example
    from a memory-mapped part, so the cache never has to fit in RAM.
    """

    def __init__(
        self, store: Store, *, check_finite: bool = True, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    ) -> None:
        self.store = store
        self.check_finite = check_finite
        self.memory_budget = int(memory_budget_mb * 2**20)
        self.manifest = store.require()
        self._paths: dict[str, list[Path]] = {"targets": [], "post": []}
        self._files: dict[tuple[str, int], pq.ParquetFile] = {}
        self._group_starts: dict[tuple[str, int], np.ndarray] = {}
        self._groups: OrderedDict[tuple[str, int, int], pa.Table] = OrderedDict()
        self._cached_bytes = 0
        self._targets_index: dict[str, _Location] = {}
        self._post_index: dict[str, _Location] = {}
        for entry in self.manifest["parts"]:
            path = store.resolve(entry["path"])
            if not path.is_file():
                raise PactError(
                    f"store part {entry['path']} is listed in the manifest but missing; {repair_advice(store.root)}"
                )
            self._paths[entry["kind"]].append(path)
        num_safety = (self.manifest.get("safety_tokens") or {}).get("count")
        for i, path in enumerate(self._paths["targets"]):
            self._check_schema(path, targets_schema, num_safety)
            self._index(path, i, "example_id", self._targets_index, "example")
        for i, path in enumerate(self._paths["post"]):
            self._check_schema(path, post_schema, num_safety)
            self._index(path, i, "response_hash", self._post_index, "response")

    def _unreadable(self, path: Path, exc: BaseException) -> PactError:
        return unreadable_part(path, exc, self.store.root)

    def _check_schema(self, path: Path, expected: Any, num_safety: int | None) -> None:
        check_part_schema(path, "targets" if expected is targets_schema else "post", num_safety, self.store.root)

    def _index(self, path: Path, part: int, key: str, index: dict[str, _Location], what: str) -> None:
        try:
            table = pq.read_table(path, columns=[key, "step"])
            keys = table.column(key).to_numpy(zero_copy_only=False)
            steps = table.column("step").to_numpy(zero_copy_only=False)
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(path, exc) from None
        if len(keys) == 0:
            return
        change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(keys)]])
        expected_steps = np.arange(len(keys)) - np.repeat(starts, ends - starts)
        if not np.array_equal(steps, expected_steps):
            raise PactError(
                f"store part {path.name}: steps are not 0..T-1 per {what} (corrupted part?); {repair_advice(self.store.root)}"
            )
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            value = keys[start]
            if value in index:
                if what == "response":
                    continue
                other = self._paths["targets"][index[value].part].name
                raise PactError(
                    f"example {value} appears twice in the store ({other} and {path.name}); {repair_advice(self.store.root)}"
                )
            index[value] = _Location(part, start, end - start)

    def __len__(self) -> int:
        return len(self._targets_index)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._targets_index

    def example_ids(self) -> list[str]:
        return list(self._targets_index)

    def response_hashes(self) -> set[str]:
        return set(self._post_index)

    def _file(self, kind: str, part: int) -> tuple[pq.ParquetFile, np.ndarray]:
        key = (kind, part)
        if key not in self._files:
            path = self._paths[kind][part]
            try:
                handle = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
            except (pa.ArrowException, OSError) as exc:
                raise self._unreadable(path, exc) from None
            sizes = [handle.metadata.row_group(i).num_rows for i in range(handle.num_row_groups)]
            self._files[key] = handle
            self._group_starts[key] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return self._files[key], self._group_starts[key]

    def _group(self, kind: str, part: int, group: int) -> pa.Table:
        """One row group, from a least-recently-used cache bounded by the memory budget."""
        key = (kind, part, group)
        table = self._groups.get(key)
        if table is not None:
            self._groups.move_to_end(key)
            return table
        handle, _ = self._file(kind, part)
        try:
            table = handle.read_row_group(group)
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(self._paths[kind][part], exc) from None
        self._groups[key] = table
        self._cached_bytes += table.nbytes
        while self._cached_bytes > self.memory_budget and len(self._groups) > 1:
            _, evicted = self._groups.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        return table

    def _rows(self, kind: str, loc: _Location) -> pa.Table:
        _, starts = self._file(kind, loc.part)
        first = int(np.searchsorted(starts, loc.start, side="right")) - 1
        last = int(np.searchsorted(starts, loc.start + loc.steps - 1, side="right")) - 1
        pieces = [self._group(kind, loc.part, g) for g in range(first, last + 1)]
        table = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
        return table.slice(loc.start - int(starts[first]), loc.steps)

    @staticmethod
    def _matrix(column: pa.ChunkedArray) -> np.ndarray:
        array = column.combine_chunks()
        width = array.type.list_size
        return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)

    def token_hash(self, example_id: str) -> str:
        loc = self._targets_index[example_id]
        return self._rows("targets", loc).column("token_hash")[0].as_py()

    def get(self, example_id: str) -> ExampleTargets:
        """Targets of one example; PactError when missing or non-finite."""
        loc = self._targets_index.get(example_id)
        if loc is None:
            raise PactError(f"example {example_id} has no targets in the store (run `pact precompute`)")
        rows = self._rows("targets", loc)
        response_hash = rows.column("response_hash")[0].as_py()
        post_loc = self._post_index.get(response_hash)
        if post_loc is None or post_loc.steps != loc.steps:
            raise PactError(
                f"example {example_id}: post-only targets of its response are missing; "
                "rerun pact precompute over the same data to compute them"
            )
        try:
            full = self._matrix(rows.column("full_logprobs"))
            post = self._matrix(self._rows("post", post_loc).column("post_logprobs"))
        except (pa.ArrowException, OSError) as exc:
            raise PactError(f"example {example_id}: stored targets are unreadable ({' '.join(str(exc).split())[:200]})") from None
        if self.check_finite and not (np.all(np.isfinite(full)) and np.all(np.isfinite(post))):
            raise PactError(
                f"example {example_id}: stored targets contain NaN or inf (corrupted part?); "
                "rerun pact precompute over the same data to recompute them"
            )
        return ExampleTargets(
            example_id=example_id,
            token_hash=rows.column("token_hash")[0].as_py(),
            response_hash=response_hash,
            token_ids=rows.column("token_id").to_numpy().astype(np.int64),
            token_logprobs=rows.column("token_logprob").to_numpy().astype(np.float32),
            entropy=rows.column("entropy").to_numpy().astype(np.float32),
            full_logprobs=full,
            post_logprobs=post,
        )
