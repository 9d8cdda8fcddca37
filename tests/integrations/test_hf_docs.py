"""docs/integrations.md runs as written: its commands (pact tokens, pact precompute on a
slice of the shared SST-2 set, the demo's tiny models) and its TRL script, from a folder
laid out as a pact checkout with the shared data sets beside it."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO

ROOT = REPO
SECTION = "## Add PACT to an existing TRL script"


def blocks(language: str) -> list[str]:
    page = (ROOT / "docs" / "integrations.md").read_text()
    section = page.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_trl_example_runs_on_sst2_with_the_demo_model(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (commands,), (script,) = blocks("bash"), blocks("python")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pipeline").symlink_to(ROOT / "pipeline")
    (tmp_path / "shared").symlink_to(shared_data.parent)
    monkeypatch.setenv("PACT_CACHE_DIR", str(tmp_path / "hash-cache"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-e", "-c", commands], cwd=checkout, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    monkeypatch.chdir(checkout)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(script, "docs/integrations.md", "exec"), namespace)

    logs = [row for row in namespace["trainer"].state.log_history if "loss" in row]
    assert [row["step"] for row in logs] == [2, 4, 6, 8]
    for row in logs:
        assert all(math.isfinite(row[key]) for key in ("loss", "ce", "kl", "gate_mean")), row
        assert row["loss"] == pytest.approx(row["ce"] + row["kl"], rel=1e-4)  # λ = 1
    assert (checkout / "run" / "adapter" / "adapter_model.safetensors").is_file()
