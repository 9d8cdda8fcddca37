"""The installed package: everything is under `pact`; no generic top-level module
(`pipeline`, `trainer`, `store`, `bench`, `tools`) is installed, so a user's own
`trainer.py` cannot shadow pact's. Each check runs a fresh interpreter in a directory
outside the checkout, where only what pip installed is importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_INSTALLED = ("pipeline", "trainer", "store", "bench", "tools")


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """This interpreter in `cwd`, without a PYTHONPATH that could reach the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory that is not the checkout and holds no Python files."""
    assert ROOT not in tmp_path.parents
    return tmp_path


def test_only_pact_is_importable_outside_the_checkout(outside: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json
        import pact
        found = {{}}
        for name in {NOT_INSTALLED!r}:
            try:
                __import__(name)
                found[name] = "imported"
            except ModuleNotFoundError as error:
                found[name] = error.name
        print(json.dumps({{"pact": pact.__file__, "found": found}}))
        """
    )
    result = run_python(["-c", script], outside)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert Path(answer["pact"]).parts[-2:] == ("pact", "__init__.py")
    assert answer["found"] == {name: name for name in NOT_INSTALLED}


def test_a_users_trainer_py_does_not_shadow_pact(outside: Path) -> None:
    (outside / "trainer.py").write_text('pact_kl = "user"\n')
    (outside / "script.py").write_text(
        textwrap.dedent(
            """
            import json
            from pact import pact_kl
            import pact.trainer
            import trainer
            print(json.dumps({
                "pact_kl": f"{pact_kl.__module__}.{pact_kl.__name__}",
                "callable": callable(pact_kl),
                "pact.trainer": pact.trainer.__file__,
                "trainer": trainer.__file__,
                "trainer.pact_kl": trainer.pact_kl,
            }))
            """
        )
    )
    result = run_python(["script.py"], outside)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["pact_kl"] == "pact.trainer.loss.pact_kl"
    assert answer["callable"] is True
    assert Path(answer["pact.trainer"]).parts[-2:] == ("trainer", "__init__.py")  # the checkout's or site-packages' pact/trainer
    assert Path(answer["trainer"]).resolve() == (outside / "trainer.py").resolve()
    assert answer["trainer.pact_kl"] == "user"


def test_python_dash_m_pact_runs_outside_the_checkout(outside: Path) -> None:
    result = run_python(["-m", "pact", "--help"], outside)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    commands = {"tokens", "precompute", "train", "eval", "sql", "plot", "demo"}
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert commands <= listed


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """`[tool.setuptools] packages` is an explicit list: a new package folder (such as
    pipeline/precompute/) missing from it would be left out of the wheel."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {"pact": ROOT / "pact", **{name: ROOT / path for name, path in config["package-dir"].items()}}
    found = {
        ".".join([name, *init.parent.relative_to(folder).parts])
        for name, folder in folders.items()
        for init in folder.rglob("__init__.py")
    }
    assert found == set(config["packages"])
