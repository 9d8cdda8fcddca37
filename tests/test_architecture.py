"""The packages' dependency rule (docs/architecture.md, "Dependencies"), checked on the
source with `ast`: every import statement counts, at a module's top or inside a function.

- `trainer/` imports nothing of the pipeline but its shared encoding (`pact.core.encoding`);
- `store/` imports neither `pipeline` nor `trainer`, nor torch model code
  (`transformers`, `peft`);
- in `pipeline/`, only the wiring (the CLI, its commands, `training.py`, the demo)
  imports `trainer`.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_WIRING = ("pipeline/cli.py", "pipeline/training.py", "pipeline/commands/", "pipeline/demo/")


def imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `path`: `import a.b` gives `a.b`, `from a
    import b` gives `a.b` (b a submodule or a name of a); relative imports are resolved
    against the module's package (`root` is the folder that holds the packages)."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def within(name: str, *packages: str) -> bool:
    """`name` is one of `packages` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(folder: str, forbidden: Callable[[str], bool], *, skip: tuple[str, ...] = ()) -> list[str]:
    """`file:line imports name` for every import under `folder` that `forbidden` refuses."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if not relative.startswith(skip):
            found += [f"{relative}:{line} imports {name}" for line, name in imported_names(path) if forbidden(name)]
    return found


def test_trainer_imports_only_the_encoding_of_the_pipeline() -> None:
    assert violations("trainer", lambda n: within(n, "pipeline") and not within(n, "pact.core.encoding")) == []


def test_store_imports_no_pipeline_trainer_or_model_code() -> None:
    assert violations("store", lambda n: within(n, "pipeline", "trainer", "transformers", "peft")) == []


def test_only_the_pipeline_wiring_imports_the_trainer() -> None:
    assert violations("pipeline", lambda n: within(n, "trainer"), skip=PIPELINE_WIRING) == []


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    module = tmp_path / "trainer" / "example.py"
    module.parent.mkdir()
    module.write_text(
        "import pipeline\n"
        "import torch, pipeline.models as m\n"
        "from pipeline import data, encoding\n"
        "from .loss import pact_kl\n"
        "from ..pipeline.probe import probe_drift\n"
        "def f():\n"
        "    from pipeline.encoding import encode_example\n"
    )
    names = [name for _, name in imported_names(module, root=tmp_path)]
    assert names == [
        "pipeline", "torch", "pact.core.models", "pact.core.data", "pact.core.encoding", "pact.trainer.loss.pact_kl",
        "pact.pipeline.probe.probe_drift", "pact.core.encoding.encode_example",
    ]  # fmt: skip
    refused = [n for n in names if within(n, "pipeline") and not within(n, "pact.core.encoding")]
    assert refused == ["pipeline", "pact.core.models", "pact.core.data", "pact.pipeline.probe.probe_drift"]


def test_importing_the_trainer_loads_no_pipeline_module_but_the_encoding() -> None:
    """At run time too, transitively: `pact.core.encoding` imports `pact.core.data` for a type
    annotation only, so loading the trainer does not load data ingestion."""
    import subprocess
    import sys

    code = (
        "import sys, trainer, trainer.train, trainer.batches, trainer.reference, trainer.validate\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == ["pipeline", "pact.core.encoding"]
