"""Helpers for the hostile-input and security tests: run `pact` (in this process through
`pact.pipeline.cli.main`, or as `python -m pact` subprocesses), check the one-line error
contract, and snapshot directories to prove nothing changed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_ERROR_CHARS = 500

Snapshot = dict[str, tuple]


def call_pact(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """`pact ARGS` through `pipeline.cli.main()` in this process, stdout/stderr captured.

    This is the code `python -m pact` runs; an exception escaping main() is printed as the
    interpreter would (a traceback) with exit code 1. Much faster than a subprocess per case.
    """
    from pact.pipeline.cli import main

    argv = ["pact", *map(str, args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    saved_argv = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def run_pact_many(
    commands: Sequence[Sequence[str]], *, cwd: str | os.PathLike | None = None, timeout: int = 120
) -> list[subprocess.CompletedProcess]:
    """Run `python -m pact ARGS` for every ARGS in `commands`, a few at a time; results in order."""
    workers = max(2, min(4, 2 * (os.cpu_count() or 1)))

    def run(args: Sequence[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pact", *map(str, args)],
            cwd=cwd or ROOT,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, commands))


def assert_one_error_line(result: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit code 2, empty stdout, one short stderr line `error: ...` matching `pattern`; return it."""
    stderr = result.stderr
    assert "Traceback" not in stderr, f"traceback instead of one line:\n{stderr[-3000:]}"
    line = stderr[:-1] if stderr.endswith("\n") else stderr
    assert "\n" not in line, f"{line.count(chr(10)) + 1} stderr lines instead of one:\n{stderr[:1500]}"
    assert line.startswith("error: "), f"stderr does not start with 'error: ': {stderr[:500]!r}"
    assert len(line) <= MAX_ERROR_CHARS, f"error line of {len(line)} characters: {line[:300]!r}..."
    assert re.search(pattern, line), f"error line {line!r} does not match {pattern!r}"
    assert result.returncode == 2, f"exit code {result.returncode}, expected 2"
    assert result.stdout == "", f"unexpected stdout: {result.stdout[:300]!r}"
    return line


def assert_one_line_message(message: str, pattern: str) -> None:
    """A PactError message: one line, short, matching `pattern`."""
    assert "\n" not in message, f"message spans {message.count(chr(10)) + 1} lines: {message[:800]!r}"
    assert len(message) <= MAX_ERROR_CHARS, f"message of {len(message)} characters: {message[:300]!r}..."
    assert re.search(pattern, message), f"message {message!r} does not match {pattern!r}"


def snapshot(root: str | os.PathLike) -> Snapshot:
    """Every entry under `root` (relative path -> kind and content identity), links not followed."""
    root = Path(root)
    entries: Snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            entries[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[relative] = ("dir",)
        else:
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[relative] = ("file", stat.st_size, stat.st_mtime_ns, digest)
    return entries


def describe_changes(before: Snapshot, after: Snapshot) -> str:
    """Readable list of what differs between two snapshots ('' when nothing does)."""
    changes = [f"added {p}" for p in sorted(after.keys() - before.keys())]
    changes += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    changes += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return ", ".join(changes)


@contextlib.contextmanager
def holding(call: str) -> Iterator[subprocess.Popen]:
    """Another process that holds `pact.store.lock.<call>` (command 'pact fake --holder')
    until the block ends."""
    code = (
        "import sys\nfrom pact.store import lock\n"
        f"with lock.{call}:\n    print('ready', flush=True)\n    sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = child.stdout.readline()
        assert ready == "ready\n", child.stderr.read()
        yield child
    finally:
        child.stdin.close()
        child.wait(timeout=60)
