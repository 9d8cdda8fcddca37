"""Fault injection for the reliability tests: kill `pact` with SIGKILL, make writes fail.

`ForkServer` runs the real CLI entry point (`pact.pipeline.cli.main`, what `pact` and
`python -m pact` run) in child processes forked from a warm server process
that has already imported torch, transformers and pact. A trial then costs the
command's own work instead of the ~4 s of imports, which is what lets 20+ kill
trials fit in the test budget. The server is `python tests/fault_harness.py`;
it speaks one JSON line per request / reply on its stdin / stdout.

A child can be

- killed with SIGKILL `kill_after` seconds after it was forked (the server, its
  parent, sends the signal, so the kill lands wherever the child is, inside C
  code included, and a reaped pid is never signalled);
- stopped at an exact point of the code by a `Fault`: on the n-th call of a
  function whose path arguments (file descriptors resolved to their file)
  contain `match`, before or after the original
  runs, it SIGKILLs itself or raises `OSError(ENOSPC)` (optionally after cutting
  the file it just wrote to half its size: a write that failed part-way).

`faults_in_process` arms the ENOSPC faults in the test process itself.
`snapshot`, `stray_temporaries`, `unregistered_parts` and `read_all_targets`
inspect a store after a fault; `short_rows` and `model_variant` build the tiny
worlds the reliability tests share.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEMP_PREFIX = ".tmp-"  # store.atomic.TEMP_PREFIX; not imported so the server starts light
DEFAULT_PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "pact.pipeline.cli",
    "pact.pipeline.precompute",
)
FAULT_ACTIONS = ("kill", "enospc", "enospc-half")
POLL_S = 0.002


# ----------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """Fire on the `nth` call of `target` ("module:attribute") whose path arguments
    contain `match`; `when` = "before" the original runs or "after" it returned.

    action: "kill" (SIGKILL the process: only in a forked child), "enospc" (raise
    OSError(ENOSPC)), "enospc-half" (cut the first existing file among the path
    arguments to half its size, then raise OSError(ENOSPC): with when="after",
    a write that ran out of space part-way).
    """

    target: str
    match: str = ""
    nth: int = 1
    when: str = "before"
    action: str = "kill"

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ValueError(f"Fault target {self.target!r} must look like module:attribute")
        if self.when not in ("before", "after") or self.action not in FAULT_ACTIONS or self.nth < 1:
            raise ValueError(f"bad Fault {self!r}")

    def resolve(self) -> tuple[Any, str]:
        """(owner object, attribute name) of the target."""
        module_name, attribute = self.target.split(":", 1)
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, name

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """`original` with this fault armed (counts its matching calls)."""
        calls = 0

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            paths = _path_arguments(args, kwargs)
            hit = False
            if self.match in " ".join(paths):
                calls += 1
                hit = calls == self.nth
            if hit and self.when == "before":
                self._fire(paths)
            result = original(*args, **kwargs)
            if hit and self.when == "after":
                self._fire(paths)
            return result

        return wrapper

    def install(self) -> None:
        """Replace the target in place (in a forked child, for the rest of its life)."""
        owner, name = self.resolve()
        setattr(owner, name, self.wrap(getattr(owner, name)))

    def _fire(self, paths: list[str]) -> None:
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "enospc-half":
            for path in paths:
                if os.path.isfile(path):
                    os.truncate(path, os.path.getsize(path) // 2)
                    break
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), paths[0] if paths else None)


def _path_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    """Paths among the arguments; an int that is an open file descriptor counts as the
    path it points to (so `os.fsync(fd)` can be matched by file name)."""
    paths = []
    for value in [*args, *kwargs.values()]:
        if isinstance(value, (str, os.PathLike)):
            paths.append(os.fspath(value))
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            with contextlib.suppress(OSError):
                paths.append(os.readlink(f"/proc/self/fd/{value}"))
    return paths


# ----------------------------------------------------------------------------- the server (child side)


def _child(request: dict[str, Any]) -> None:
    """In the forked child: redirect output, arm the faults, run the CLI, exit."""
    code = 1
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["log"] + ".out", os.O_WRONLY | os.O_TRUNC)
        err = os.open(request["log"] + ".err", os.O_WRONLY | os.O_TRUNC)
        os.dup2(stdin, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.update(request.get("env") or {})
        os.chdir(request.get("cwd") or ROOT)
        for fault in request.get("faults") or []:
            Fault(**fault).install()
        sys.argv = ["pact", *request["argv"]]
        from pact.pipeline.cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_child(request: dict[str, Any]) -> dict[str, Any]:
    """Fork, kill after `kill_after` s if still running, reap; the reply for the client.

    The log files are created here, before the fork: a child killed before it could
    open them still leaves (empty) logs for the client to read.
    """
    for suffix in (".out", ".err"):
        Path(request["log"] + suffix).write_bytes(b"")
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(request)
    kill_after, timeout = request.get("kill_after"), request["timeout"]
    signalled = timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        elapsed = time.monotonic() - started
        if not signalled and kill_after is not None and elapsed >= kill_after:
            os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still our child
            signalled = True
        if not signalled and elapsed >= timeout:
            os.kill(pid, signal.SIGKILL)
            signalled = timed_out = True
        time.sleep(POLL_S)
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "elapsed": time.monotonic() - started,
        "timed_out": timed_out,
    }


def serve(preload: Sequence[str]) -> None:
    """Import `preload`, then answer one JSON request per stdin line until EOF."""
    protocol = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # stray prints of the server must not corrupt the protocol
    for module in preload:
        importlib.import_module(module)
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        protocol.write(json.dumps(_run_child(json.loads(line))) + "\n")
        protocol.flush()


# ----------------------------------------------------------------------------- the client


@dataclass
class ChildResult:
    """One CLI run: returncode (-9 when SIGKILLed), seconds from fork to exit, output."""

    returncode: int
    elapsed: float
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL and not self.timed_out


class ForkServer:
    """A warm server that forks `pact` CLI runs; use as a context manager."""

    def __init__(self, log_dir: str | os.PathLike, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._runs = 0
        self._server_err = open(self.log_dir / "server.err", "w")  # noqa: SIM115 (closed in close())
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *preload],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._server_err,
            text=True,
        )
        self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died: {(self.log_dir / 'server.err').read_text()[-2000:]}")
        return json.loads(line)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        kill_after: float | None = None,
        faults: Sequence[Fault] = (),
        timeout: float = 120.0,
    ) -> ChildResult:
        """Run `pact ARGV` in a forked child; SIGKILL it after `kill_after` s when given."""
        self._runs += 1
        log = str(self.log_dir / f"run-{self._runs:03d}")
        request = {
            "argv": [str(a) for a in argv],
            "env": env or {},
            "cwd": str(ROOT),
            "log": log,
            "kill_after": kill_after,
            "faults": [asdict(f) for f in faults],
            "timeout": timeout,
        }
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        reply = self._reply()
        return ChildResult(
            returncode=reply["returncode"],
            elapsed=reply["elapsed"],
            stdout=Path(log + ".out").read_text(errors="replace"),
            stderr=Path(log + ".err").read_text(errors="replace"),
            timed_out=reply["timed_out"],
        )

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        self._server_err.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- store inspection


def snapshot(root: str | os.PathLike) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (the lock file excluded)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def stray_temporaries(root: str | os.PathLike) -> list[str]:
    """Files or directories under `root` whose name starts with the temporary prefix."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob(TEMP_PREFIX + "*"))


def unregistered_parts(store: Any) -> set[str]:
    """Part files on disk that the manifest does not list (orphans of a killed writer)."""
    on_disk = {f"{p.parent.name}/{p.name}" for kind in ("targets", "post") for p in (store.root / kind).glob("part-*")}
    return on_disk - {p["path"] for p in store.read_manifest()["parts"]}


def read_all_targets(store: Any) -> dict[str, tuple]:
    """example_id -> (token_hash, token ids, token logprobs, entropy, full, post), read
    through `TargetReader` (so the store must open and every example must be readable)."""
    from pact.store.targets import TargetReader

    reader = TargetReader(store)
    out = {}
    for example_id in reader.example_ids():
        t = reader.get(example_id)
        out[example_id] = (t.token_hash, t.token_ids, t.token_logprobs, t.entropy, t.full_logprobs, t.post_logprobs)
    return out


def registered_rows(store: Any) -> int:
    """Target rows the manifest lists (equal to a clean run's when each example is there once)."""
    return sum(p["rows"] for p in store.read_manifest()["parts"] if p["kind"] == "targets")


@contextlib.contextmanager
def faults_in_process(*faults: Fault) -> Iterator[None]:
    """Arm ENOSPC faults in this process for the duration of the block."""
    if any(f.action == "kill" for f in faults):
        raise ValueError("a kill fault in-process would kill the test runner; use ForkServer")
    armed = []
    try:
        for fault in faults:
            owner, name = fault.resolve()
            armed.append((owner, name, getattr(owner, name)))
            setattr(owner, name, fault.wrap(armed[-1][2]))
        yield
    finally:
        for owner, name, original in reversed(armed):
            setattr(owner, name, original)


# ----------------------------------------------------------------------------- tiny worlds

WORDS = ("cat", "dog", "fox", "film", "movie", "great", "bad", "lazy", "quick", "story", "hello", "world")
ANSWERS = ("positive", "negative", "neutral", "I cannot help.", "Sure, here it is.")
# tests/tiny.py's CHAT_TEMPLATE with a newline after each turn: another template, same header.
OTHER_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def short_rows(count: int, seed: int) -> list[dict[str, str]]:
    """`count` short prompt/completion rows with ids `ex-000`...; few distinct completions."""
    rng = random.Random(seed)
    return [
        {
            "id": f"ex-{i:03d}",
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))),
            "completion": rng.choice(ANSWERS),
        }
        for i in range(count)
    ]


def model_variant(
    reference: Path,
    target: Path,
    *,
    weights_seed: int | None = None,
    swap_tokens: bool = False,
    template: str | None = None,
) -> Path:
    """A copy of the model directory `reference` at `target` (kept when it exists) with
    other random weights (tests/tiny.make_model, seed `weights_seed`), a tokenizer whose
    ids of 'a' and 'e' are swapped (same vocabulary size), or another chat template."""
    if target.exists():
        return target
    shutil.copytree(reference, target)
    if weights_seed is not None:
        from tiny import make_model

        config = json.loads((reference / "config.json").read_text())
        make_model(target, config["vocab_size"], seed=weights_seed, hidden=config["hidden_size"])
    if swap_tokens:
        tokenizer_file = target / "tokenizer.json"
        spec = json.loads(tokenizer_file.read_text())
        vocab = spec["model"]["vocab"]
        vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
        tokenizer_file.write_text(json.dumps(spec))
    if template is not None:
        from pact.core.models import load_tokenizer

        tokenizer = load_tokenizer(target)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(str(target))
    return target


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the checkout under test, whatever pact is installed
    serve(sys.argv[1:])
