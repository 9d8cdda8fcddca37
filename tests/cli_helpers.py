"""Run the real `pact` entry point in a subprocess and capture its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pact(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pact ARGS` from the repo root (with `env` added to the environment);
    returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "pact", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else os.environ | env,
    )
