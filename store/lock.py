"""One writer at a time: advisory locks on a store (or a training run directory).

A writer holds, for its whole run, an exclusive `flock` on a lock file inside the
directory it writes:
- `pact tokens` (rewrites the safety set): `.writer.lock`, exclusive;
- `pact precompute` shard i/N: `.writer.lock` shared (shards of one split may run
  together) and `.writer-s{i}of{N}.lock` exclusive; a shard of another split that is
  being written (s0of1 while s1of2 runs) is refused, its examples would overlap;
- `pact train --out RUN`: `RUN/.writer.lock`, exclusive.

The holder writes who it is (pid, host, command, start time) into its exclusive lock
file, so a second writer is refused with one line naming it (or, with `--wait`, waits
for it). The kernel drops a flock when its process dies, so a lock that can be taken
proves that no live writer holds it: start-up cleanup of a writer's temporary files runs
only under the lock (`cleanup_allowed`). Lock files are opened with O_NOFOLLOW (a
symlink planted in their place is refused, never followed) and removed on release; a
waiter that wakes on a removed file opens the new one and tries again.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import fcntl
import json
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from pact.core.errors import PactError
from pact.core.text import one_line
from pact.store.manifest import repair_advice

STORE_LOCK = ".writer.lock"
_SHARD_LOCK = re.compile(r"\.writer-s(\d+)of(\d+)\.lock")
_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("pact_wait_for_writers", default=False)
_HELD: dict[Path, int] = {}  # lock files this process holds exclusively -> fd


def shard_lock_name(tag: str) -> str:
    """`.writer-s0of2.lock` for the shard tag `s0of2`."""
    return f".writer-{tag}.lock"


@contextlib.contextmanager
def waiting_for_writers(wait: bool = True) -> Iterator[None]:
    """Inside this block a busy lock is waited for instead of refused (`--wait`)."""
    token = _WAIT.set(wait)
    try:
        yield
    finally:
        _WAIT.reset(token)


def open_lock_file(path: Path) -> int:
    """An fd on the regular lock file `path` (created if missing), never through a symlink."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PactError(f"lock file {path} is a symbolic link (tampered directory?); remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PactError(f"lock file {path} is not a regular file (tampered directory?); remove it")
    return fd


def _still_linked(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing holder unlinks it)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _flock(path: Path, mode: int, wait: bool, busy: Callable[[], str]) -> int:
    """The fd of `path` locked with `mode` (LOCK_EX / LOCK_SH). Busy: PactError `busy()`,
    or with `wait` one note on stderr and a blocking wait."""
    noted = False
    while True:
        fd = open_lock_file(path)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise PactError(busy()) from None
                if not noted:
                    print(f"waiting: {busy()}", file=sys.stderr, flush=True)
                    noted = True
                fcntl.flock(fd, mode)
            if _still_linked(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(fd: int, path: Path) -> None:
    """Remove the lock file if no other process holds it (an exclusive lock is ours
    alone; a shared one may be upgraded only when nobody else shares it), then close."""
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_linked(fd, path):
                path.unlink()
    finally:
        os.close(fd)


def holder(path: Path) -> str:
    """Who holds the lock file `path`, from what the holder wrote into it."""
    try:
        with open(path, "rb") as handle:
            info = json.loads(handle.read(4096).decode("utf-8"))
        started = datetime.datetime.fromtimestamp(float(info["started"]), datetime.timezone.utc)
        command = one_line(str(info["command"]), 160)
        return f"pid {int(info['pid'])} on {one_line(str(info['host']), 160)}, '{command}', started {started:%Y-%m-%d %H:%M:%S} UTC"
    except (OSError, ValueError, KeyError, TypeError):
        return "another pact process"


def _write_holder(fd: int, command: str) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).timestamp(),
    }
    data = json.dumps(info).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _command() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join(["pact" if name in ("pact", "__main__.py") else name, *sys.argv[1:]])


def _busy_shards(root: Path, skip: str | None = None) -> list[tuple[str, Path]]:
    """Shard lock files under `root` that some process holds now: (tag, path)."""
    found = []
    for path in sorted(root.glob(".writer-s*of*.lock")):
        match = _SHARD_LOCK.fullmatch(path.name)
        tag = f"s{match.group(1)}of{match.group(2)}" if match else None
        if tag is None or tag == skip or path.is_symlink() or not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            found.append((tag, path))
        finally:
            os.close(fd)
    return found


@contextlib.contextmanager
def _directory(root: Path) -> Iterator[None]:
    """Create `root` if needed; when this call created it and it holds nothing on exit,
    remove it again (a run that failed its checks leaves no empty directory behind)."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()


@contextlib.contextmanager
def _holding(path: Path, mode: int, busy: Callable[[], str], command: str | None) -> Iterator[int]:
    fd = _flock(path, mode, _WAIT.get(), busy)
    key = path.resolve()
    try:
        if mode == fcntl.LOCK_EX:
            _write_holder(fd, command or _command())
            _HELD[key] = fd
        yield fd
    finally:
        _HELD.pop(key, None)
        _release(fd, path)


@contextlib.contextmanager
def store_writer(root: str | os.PathLike, *, command: str | None = None) -> Iterator[None]:
    """Hold the whole store `root` (`pact tokens`): no other writer, shard or not."""
    root = Path(root)
    path = root / STORE_LOCK

    def busy() -> str:
        shards = _busy_shards(root)
        who = holder(shards[0][1]) if shards else holder(path)
        return f"store {root} is being written by another pact process ({who}); wait for it to finish or pass --wait"

    with _directory(root), _holding(path, fcntl.LOCK_EX, busy, command):
        yield


@contextlib.contextmanager
def shard_writer(root: str | os.PathLike, tag: str, *, command: str | None = None) -> Iterator[None]:
    """Hold shard `tag` (`s{i}of{N}`) of the store `root` (`pact precompute`): shards
    of one split run together, anything else that writes the store is refused."""
    root = Path(root)
    store_path, shard_path = root / STORE_LOCK, root / shard_lock_name(tag)
    count = tag.split("of")[-1]

    def store_busy() -> str:
        return (
            f"store {root} is being written by another pact process ({holder(store_path)}); "
            "wait for it to finish or pass --wait"
        )

    def shard_busy() -> str:
        return (
            f"shard {tag} of store {root} is being written by another pact process ({holder(shard_path)}); "
            "wait for it to finish or pass --wait"
        )

    if not root.is_dir():  # no store to write into: the run fails its store checks
        yield
        return
    for kind in ("targets", "post"):  # the writer would refuse them after loading its model
        if (root / kind).is_symlink():
            raise PactError(
                f"{kind}/ in store {root} is a symbolic link (a store is one directory: move the "
                f"whole store instead); {repair_advice(root)}"
            )
    with _holding(store_path, fcntl.LOCK_SH, store_busy, command):
        with _holding(shard_path, fcntl.LOCK_EX, shard_busy, command):
            for other, path in _busy_shards(root, skip=tag):
                if other.split("of")[-1] != count:
                    raise PactError(
                        f"store {root}: shard {other} is being written ({holder(path)}) and overlaps "
                        f"shard {tag} (another split of the examples); wait for it to finish"
                    )
            yield


@contextlib.contextmanager
def run_writer(run_dir: str | os.PathLike, *, command: str | None = None) -> Iterator[None]:
    """Hold the training run directory `run_dir` (`pact train --out`)."""
    run_dir = Path(run_dir)
    path = run_dir / STORE_LOCK

    def busy() -> str:
        return (
            f"run directory {run_dir} is being written by another pact train ({holder(path)}); "
            "wait for it to finish, pass --wait, or choose another --out"
        )

    with _directory(run_dir), _holding(path, fcntl.LOCK_EX, busy, command):
        yield


def holds(path: str | os.PathLike) -> bool:
    """Whether this process holds the exclusive lock file `path`."""
    return Path(path).resolve() in _HELD


@contextlib.contextmanager
def cleanup_allowed(root: str | os.PathLike, tag: str) -> Iterator[bool]:
    """True when no live writer of shard `tag` can own temporary files in `root`: this
    process holds the shard, or can take it (and holds it for the block); False when
    another process holds it (its files must be left alone)."""
    root = Path(root)
    path = root / shard_lock_name(tag)
    if holds(path) or holds(root / STORE_LOCK):
        yield True
        return
    if not root.is_dir():
        yield True
        return
    try:
        store_fd = _flock(root / STORE_LOCK, fcntl.LOCK_SH, False, lambda: "")
    except PactError:
        yield False
        return
    try:
        try:
            fd = _flock(path, fcntl.LOCK_EX, False, lambda: "")
        except PactError:
            yield False
            return
        try:
            yield True
        finally:
            _release(fd, path)
    finally:
        _release(store_fd, root / STORE_LOCK)
