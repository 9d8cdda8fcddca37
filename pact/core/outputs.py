"""Where a command may write: never over its inputs.

`pact train --out` and `pact plot --out` are checked before any model is loaded: an
output that is, lies inside, or contains the store or a model directory is refused, and
`pact plot` overwrites only a PNG, in a directory that exists and takes a new file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from pact.core.atomic import TEMP_PREFIX
from pact.core.errors import PactError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _nests(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_dir(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> Path:
    """`out` (a directory to write) unless it is, lies inside, or contains one of `inputs`
    (label -> path; None entries are skipped), compared after resolving symlinks."""
    target = Path(out).resolve()
    for label, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if _nests(target, source):
            raise PactError(f"--out {out} overlaps {label} {path}: a run directory must be apart from its inputs")
    return target


def check_output_file(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> Path:
    """`out` (a PNG to write) unless it lies inside one of `inputs` (label -> directory),
    is an existing file that is not a PNG (a model, a manifest, a part), or its directory
    is missing or takes no new file (`check_writable_dir`)."""
    path = Path(out)
    target = path.resolve()
    for label, directory in inputs.items():
        if directory is not None and (target == Path(directory).resolve() or Path(directory).resolve() in target.parents):
            raise PactError(f"--out {out} lies inside {label} {directory}; write the plot elsewhere")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise PactError(f"--out {out} exists and is not a regular file")
    if path.is_file():
        with open(path, "rb") as handle:
            if handle.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise PactError(f"--out {out} exists and is not a PNG; refusing to overwrite it")
    check_writable_dir(path.parent, f"--out {out}")
    return target


def check_can_create_in(directory: str | os.PathLike, what: str) -> None:
    """PactError unless files can be written into `directory`: it takes a new file, or it
    does not exist yet and its nearest existing parent is a directory that does."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    check_writable_dir(existing, what)


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """PactError unless `directory` exists, is a directory and takes a new file (tried:
    a temporary file is created and removed; permissions alone do not tell for root or on
    a read-only file system)."""
    directory = Path(directory)
    if not directory.exists():
        raise PactError(f"{what}: the directory {directory} does not exist")
    if not directory.is_dir():
        raise PactError(f"{what}: {directory} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(prefix=TEMP_PREFIX + "probe.", dir=directory):
            pass
    except OSError as exc:
        raise PactError(f"{what}: cannot write in {directory} ({exc.strerror or exc})") from None
