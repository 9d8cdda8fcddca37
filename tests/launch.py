"""Launching torchrun processes from a test: 2 gloo ranks on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LAUNCH_TIMEOUT_S = 300


def launch_env(tmp: Path) -> dict[str, str]:
    """This environment without a torchrun launch's variables, one thread per process and
    a hash cache under `tmp`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return env | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PACT_CACHE_DIR": str(tmp / "hash-cache")}


def torchrun(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """2 processes on this machine, gloo (CPU), a free port; the launch's output. The
    processes start in the empty folder `tmp/launch` (with `-m`, the working directory
    is on sys.path: a folder named `store` there would shadow the package)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    launch_dir = tmp / "launch"
    launch_dir.mkdir(exist_ok=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=launch_env(tmp), cwd=launch_dir)
