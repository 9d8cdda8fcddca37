"""`pact store verify` and `pact store repair`: check a store against its manifest, and
bring it back to a state that readers accept and a `pact precompute` rerun completes.

verify reads every registered part (schema, every page with its checksum, row and
example counts, steps 0..T-1 per example, examples stored twice), the safety set against
the manifest, and lists what the manifest does not know: unregistered parts (orphans),
temporaries, symlinks, foreign files. repair, holding the store's exclusive writer lock
(so no writer is alive to own any of it), unregisters every part verify found bad
(deleting its file when pact named it), a later registration of a path or of an
example already stored, removes orphans, temporaries and symlinks inside the store
(never what a link points to), and leaves foreign files alone. Whatever it unregistered
a precompute rerun computes again: exactly the gaps.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pact.core.atomic import TEMP_PREFIX, atomic_write_bytes
from pact.core.errors import PactError
from pact.core.text import one_line
from pact.store.lock import store_writer
from pact.store.manifest import MANIFEST, PART_KINDS, Store, _validate, check_relative_path
from pact.store.safety import (
    SAFETY_FILE,
    TOKENS_FILE,
    SafetyCountMismatch,
    check_tokens_table,
    load_safety_set,
)
from pact.store.tables import SCHEMAS, table_files
from pact.store.targets import check_part_schema

PART_NAME = re.compile(r"part-s\d+of\d+-[0-9a-f]{12}\.parquet")
KEYS = {"targets": "example_id", "post": "response_hash"}


@dataclass
class Finding:
    """One problem (or, when `warning`, a note) about one store-relative path."""

    path: str
    message: str
    warning: bool = False
    repairable: bool = True  # `pact store repair` fixes it (otherwise the message says what does)

    def line(self) -> str:
        return f"{'warning' if self.warning else 'problem'}: {self.path}: {self.message}"


@dataclass
class Report:
    """What verify found; `keep` lists the manifest entries repair keeps (in order)."""

    findings: list[Finding] = field(default_factory=list)
    keep: list[dict[str, Any]] = field(default_factory=list)
    delete: list[Path] = field(default_factory=list)  # files and links repair removes
    parts: int = 0
    examples: int = 0

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.warning]

    def add(
        self, path: str, message: str, *, delete: Path | None = None, warning: bool = False, repairable: bool = True
    ) -> None:
        self.findings.append(Finding(path, one_line(message, 300), warning, repairable))
        if delete is not None:
            self.delete.append(delete)


def _raw_manifest(store: Store) -> dict[str, Any]:
    """The manifest with every part entry unchecked; PactError when it cannot be read at all."""
    if not store.root.is_dir():
        raise PactError(f"store {store.root} does not exist")
    path = store.manifest_path
    if path.is_symlink() or not path.is_file():
        raise PactError(
            f"{store.root} has no regular {MANIFEST}: nothing to verify (a store starts with `pact tokens`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PactError(
            f"{path} is not valid JSON ({one_line(str(exc), 120)}); repair cannot rebuild it: restore it "
            "from a backup, or delete the store and rerun `pact tokens` and `pact precompute`"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), list):
        raise PactError(
            f"{path} has no list of parts; repair cannot rebuild it: restore it from a backup, "
            "or delete the store and rerun `pact tokens` and `pact precompute`"
        )
    try:
        _validate({**manifest, "parts": []}, path)
    except PactError as exc:
        raise PactError(
            f"{exc}; repair cannot rebuild it: restore it from a backup, or delete the store "
            "and rerun `pact tokens` and `pact precompute`"
        ) from None
    return manifest


def _symlink_inside(store: Store, relative: str) -> str | None:
    """The first component of `relative` (inside the store) that is a symlink, or None."""
    current = store.root
    for name in Path(relative).parts:
        current = current / name
        if current.is_symlink():
            return str(current.relative_to(store.root))
    return None


def _read_keys(path: Path, kind: str) -> tuple[np.ndarray, int]:
    """Every row group read with page checksums; returns (keys of each row, rows)."""
    handle = pq.ParquetFile(path, page_checksum_verification=True)
    keys, steps = [], []
    for group in range(handle.num_row_groups):
        table = handle.read_row_group(group)  # every column: finds damaged pages
        keys.append(table.column(KEYS[kind]).to_numpy(zero_copy_only=False))
        steps.append(table.column("step").to_numpy(zero_copy_only=False))
    key = np.concatenate(keys) if keys else np.array([], dtype=object)
    step = np.concatenate(steps) if steps else np.array([], dtype=np.int32)
    if len(key):
        change = np.flatnonzero(key[1:] != key[:-1]) + 1
        starts = np.concatenate([[0], change])
        expected = np.arange(len(key)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(key)]])))
        if not np.array_equal(step, expected):
            raise ValueError(f"steps are not 0..T-1 per {'example' if kind == 'targets' else 'response'}")
    return key, len(key)


def _check_entry(store: Store, entry: Any, num_safety: int | None, report: Report) -> tuple[str, np.ndarray] | None:
    """Checks of one manifest entry; (kind, keys) when it is sound, else a finding."""
    if not isinstance(entry, dict) or entry.get("kind") not in PART_KINDS:
        report.add(MANIFEST, f"malformed part entry {str(entry)[:80]}")
        return None
    relative = entry.get("path")
    try:
        check_relative_path(relative)
    except PactError as exc:
        report.add(MANIFEST, str(exc))
        return None
    link = _symlink_inside(store, relative)
    if link is not None:
        report.add(relative, f"registered through the symbolic link {link} (pact keeps parts inside the store)",
                   delete=store.root / link)  # fmt: skip
        return None
    path = store.root / relative
    ours = path.parent.name == entry["kind"] and PART_NAME.fullmatch(path.name) is not None
    if not path.exists():
        report.add(relative, "listed in the manifest but missing")
        return None
    if not path.is_file():
        report.add(relative, "listed in the manifest but not a regular file")
        return None
    try:
        check_part_schema(path, entry["kind"], num_safety)
        keys, rows = _read_keys(path, entry["kind"])
    except (PactError, pa.ArrowException, OSError, ValueError, KeyError) as exc:
        report.add(relative, f"unreadable or not a {entry['kind']} part ({exc})", delete=path if ours else None)
        return None
    examples = len(set(keys.tolist()))
    if entry.get("rows") != rows or entry.get("examples") != examples:
        report.add(
            relative,
            f"holds {rows} rows of {examples} {'examples' if entry['kind'] == 'targets' else 'responses'}, "
            f"the manifest says {entry.get('rows')!r} and {entry.get('examples')!r}",
            delete=path if ours else None,
        )
        return None
    size = path.stat().st_size
    if "bytes" in entry and (type(entry["bytes"]) is not int or entry["bytes"] != size):
        report.add(
            relative,
            f"holds {size} bytes, the manifest says {str(entry['bytes'])[:40]} (changed after it was registered?)",
            delete=path if ours else None,
        )
        return None
    return entry["kind"], keys


def _stray_tables(store: Store, report: Report) -> None:
    """Files under metrics/ and evals/ that are not pact's tables (they break every query)."""
    for kind in SCHEMAS:
        for path, problem in table_files(store.root, kind)[1]:
            report.add(f"{kind}/{path.name}", f"{problem} (`pact sql` leaves it out)", repairable=False)


def _unlisted(store: Store, registered: set[str], report: Report) -> None:
    """Orphans, temporaries, symlinks and foreign files under targets/ and post/, and
    symlinks anywhere in the store."""
    for kind in PART_KINDS:
        directory = store.root / kind
        if directory.is_symlink():
            continue  # reported with its entries, or below
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            relative = f"{kind}/{path.name}"
            if relative in registered or path.is_symlink():
                continue
            if path.name.startswith(TEMP_PREFIX) and path.is_file():
                report.add(relative, "temporary file of a writer that is not running", delete=path)
            elif PART_NAME.fullmatch(path.name) and path.is_file():
                report.add(relative, "part not listed in the manifest (orphan of a killed writer)", delete=path)
            else:
                report.add(relative, "foreign file (not written by pact); left alone", warning=True)
    for dirpath, dirnames, filenames in os.walk(store.root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                relative = str(path.relative_to(store.root))
                if not any(f.path == relative or f.path.startswith(relative + "/") for f in report.findings):
                    report.add(relative, f"symbolic link to {os.readlink(path)} (pact keeps a store in one directory)",
                               delete=path)  # fmt: skip


def _check_safety_count(store: Store, manifest: dict[str, Any]) -> None:
    """SafetyCountMismatch (a corrupted manifest that repair cannot fix) before the parts
    are checked against the count: they would all look foreign, and repair delete them."""
    if manifest.get("safety_tokens") is None:
        return
    try:
        load_safety_set(store)
    except SafetyCountMismatch:
        raise
    except PactError:
        return  # reported with the other findings


def verify(store: Store) -> Report:
    """Check `store` (see the module docstring); the report lists every finding."""
    manifest = _raw_manifest(store)
    _check_safety_count(store, manifest)
    num_safety = (manifest.get("safety_tokens") or {}).get("count")
    report = Report()
    seen_paths: set[str] = set()
    owner: dict[str, str] = {}
    for entry in manifest["parts"]:
        relative = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(relative, str) and relative in seen_paths:
            report.add(relative, "registered twice in the manifest")
            continue
        checked = _check_entry(store, entry, num_safety, report)
        if isinstance(relative, str):
            seen_paths.add(relative)
        if checked is None:
            continue
        kind, keys = checked
        if kind == "targets":
            ids = list(dict.fromkeys(keys.tolist()))
            twice = [i for i in ids if i in owner]
            if twice:
                report.add(
                    relative,
                    f"{len(twice)} of its examples are already stored in {owner[twice[0]]} "
                    f"(first: {twice[0]}): registered twice",
                    delete=store.root / relative if PART_NAME.fullmatch(Path(relative).name) else None,
                )
                continue
            owner.update(dict.fromkeys(ids, relative))
        report.keep.append(entry)
    report.parts, report.examples = len(report.keep), len(owner)
    _unlisted(store, seen_paths, report)
    _stray_tables(store, report)
    if manifest.get("safety_tokens") is not None and not any(f.path == MANIFEST for f in report.findings):
        try:
            load_safety_set(store)
        except PactError as exc:
            report.add(SAFETY_FILE, f"{exc}; rerun `pact tokens` (repair cannot recompute it)", repairable=False)
        else:
            try:
                check_tokens_table(store, manifest["safety_tokens"])
            except PactError as exc:
                report.add(TOKENS_FILE, f"{exc} (repair cannot recompute it)", repairable=False)
    return report


def repair(store: Store) -> Report:
    """Verify under the store's exclusive writer lock, then unregister and delete what
    verify found bad (see the module docstring). Returns the report it acted on."""
    _raw_manifest(store)  # before the lock, which would create a missing directory
    with store_writer(store.root):
        with store.locked():
            manifest = _raw_manifest(store)
            report = verify(store)
            if len(report.keep) != len(manifest["parts"]):
                manifest["parts"] = report.keep
                data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
                atomic_write_bytes(store.manifest_path, data)
            for path in report.delete:
                if path.is_symlink() or path.is_file():
                    path.unlink()
    return report
