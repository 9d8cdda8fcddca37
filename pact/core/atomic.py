"""Atomic file writes: write to a temporary name in the same directory, fsync, rename.

A killed process never leaves a half-written file under the final name; stray
temporaries carry the `.tmp-` prefix and are removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it is durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it to `final`.

    On any exception the temporary file is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `final` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_with(final: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and rename the result to `final` atomically."""
    with atomic_path(final) as tmp:
        write(tmp)


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete temporaries left by killed writers under `root`; return what was removed."""
    removed = []
    for path in Path(root).rglob(TEMP_PREFIX + "*"):
        if path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
