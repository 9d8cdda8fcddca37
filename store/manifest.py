"""The store directory and its manifest.

`manifest.json` is the last file written by every operation: a part exists for
readers only once the manifest lists it. Updates run under an exclusive lock
file so several processes (shards, ranks) can register parts in one store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from pact.core.atomic import TEMP_PREFIX, atomic_write_bytes
from pact.core.errors import PactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
POSITION_CONVENTION = (
    "step t (0-based) holds the distribution that predicts response token t, "
    "i.e. the logits at input position response_start - 1 + t"
)
PART_KINDS = ("targets", "post")
MAX_SAFETY_TOKENS = 1 << 24  # above any vocabulary: a larger count is a corrupted manifest


def empty_manifest() -> dict[str, Any]:
    """A manifest for a store that holds nothing yet."""
    return {
        "schema_version": SCHEMA_VERSION,
        "position_convention": POSITION_CONVENTION,
        "safety_tokens": None,
        "reference": None,
        "parts": [],
    }


def check_relative_path(relative: str) -> str:
    """Return `relative` if it is a plain relative path inside the store, else raise."""
    if not isinstance(relative, str) or not relative:
        raise PactError(f"manifest path {relative!r} is not a non-empty string")
    if any(ord(c) < 32 or ord(c) == 127 for c in relative):
        raise PactError(f"manifest path {relative!r} contains control characters (tampered manifest?)")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or "\\" in relative or any(p in ("..", "") for p in pure.parts):
        raise PactError(f"manifest path {relative!r} points outside the store (tampered manifest?)")
    return relative


def repair_advice(root: str | os.PathLike) -> str:
    """The advice of every error that `pact store repair` fixes (tests/hostile/test_hostile_repair.py
    follows each one to a working store)."""
    return f"run `pact store repair {root}`, then rerun `pact precompute`"


def symlink_inside(root: Path, relative: str) -> Path | None:
    """The first component of store-relative `relative` under `root` that is a symbolic link."""
    current = root
    for name in PurePosixPath(relative).parts:
        current = current / name
        if current.is_symlink():
            return current
    return None


def _validate(manifest: Any, path: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise PactError(f"{path} is not a JSON object (corrupted manifest?)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PactError(
            f"{path} has schema_version {version!r}; this pact reads version {SCHEMA_VERSION}"
        )
    parts = manifest.get("parts")
    if not isinstance(parts, list):
        raise PactError(f"{path}: 'parts' is not a list (corrupted manifest?)")
    for part in parts:
        if not isinstance(part, dict) or part.get("kind") not in PART_KINDS:
            raise PactError(f"{path}: malformed part entry {part!r} (corrupted manifest?)")
        check_relative_path(part.get("path"))
    for key in ("safety_tokens", "reference"):
        if manifest.get(key) is not None and not isinstance(manifest.get(key), dict):
            raise PactError(f"{path}: '{key}' is not an object (corrupted manifest?)")
    safety = manifest.get("safety_tokens")
    if safety is not None:
        count = safety.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SAFETY_TOKENS:
            raise PactError(
                f"{path}: safety_tokens.count {count!r} is not an integer from 1 to {MAX_SAFETY_TOKENS} "
                "(corrupted manifest?)"
            )
    return manifest


class Store:
    """A pact store directory: `manifest.json`, safety tokens, target parts, tables."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- paths -------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def resolve(self, relative: str) -> Path:
        """Absolute path of a store-relative path, refusing anything outside the store."""
        check_relative_path(relative)
        link = symlink_inside(self.root, relative)
        if link is not None:
            raise PactError(
                f"manifest path {relative!r} is reached through the symbolic link {link.relative_to(self.root)} "
                f"(a store is one directory: move the whole store instead); {repair_advice(self.root)}"
            )
        path = (self.root / relative).resolve()
        root = self.root.resolve()
        if root != path and root not in path.parents:
            raise PactError(f"manifest path {relative!r} points outside the store")
        return path

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    # -- manifest ----------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one when the store is new."""
        if not self.manifest_path.exists():
            if self.root.exists() and not self.root.is_dir():
                raise PactError(f"store {self.root} is not a directory")
            return empty_manifest()
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise PactError(f"{self.manifest_path} is not valid JSON ({reason}); corrupted manifest?") from None
        return _validate(manifest, self.manifest_path)

    def require(self) -> dict[str, Any]:
        """The manifest of an existing store; a clear error when there is none."""
        if not self.root.is_dir():
            raise PactError(f"store {self.root} does not exist (run `pact tokens` / `pact precompute` first)")
        if not self.manifest_path.is_file():
            raise PactError(f"{self.root} is not a pact store: no {MANIFEST}")
        return self.read_manifest()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock (one writer of the manifest at a time)."""
        from pact.store.lock import open_lock_file

        self.root.mkdir(parents=True, exist_ok=True)
        with open(open_lock_file(self.root / ".lock"), "a+", closefd=True) as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def update_manifest(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Re-read the manifest under the lock, apply `change` in place, write it atomically."""
        with self.locked():
            for stale in self.root.glob(TEMP_PREFIX + MANIFEST + ".*"):
                stale.unlink(missing_ok=True)
            manifest = self.read_manifest()
            change(manifest)
            _validate(manifest, self.manifest_path)
            data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
            atomic_write_bytes(self.manifest_path, data)
            return manifest

    def parts(self, kind: str) -> list[dict[str, Any]]:
        """Registered parts of one kind ('targets' or 'post'), in registration order."""
        return [p for p in self.read_manifest()["parts"] if p["kind"] == kind]
