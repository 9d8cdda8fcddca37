"""The layers (docs/architecture.md, "Layers"), checked on the source with `ast`: every
import statement counts, at a module's top or inside a function.

    top     pact.pipeline.cli, .commands, .demo, pact.integrations, pact.__main__
    stages  tokens | precompute | eval | train          (peers)
    store   pact.store                                   (no model code)
    core    pact.core                                    (imports no other layer)

A layer imports only the layers below it; a stage imports no other stage, except the
edges named in `CROSS_STAGE` (each with its reason).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (folder of the source file, the dotted module it is installed as)
PACKAGES = {"pact": "pact", "pipeline": "pact.pipeline", "trainer": "pact.trainer", "store": "pact.store"}

# dotted-name prefixes -> layer, the longest prefix wins
LAYERS = {
    "pact.core": "core",
    "pact.store": "store",
    "pact.pipeline.tokens": "tokens",
    "pact.pipeline.precompute": "precompute",
    "pact.pipeline.evaluate": "eval",
    "pact.pipeline.generation": "eval",
    "pact.pipeline.probe": "eval",
    "pact.pipeline.plot": "eval",
    "pact.trainer": "train",
    "pact.pipeline.cli": "top",
    "pact.pipeline.commands": "top",
    "pact.pipeline.demo": "top",
    "pact.integrations": "top",
    "pact.__main__": "top",
}
RANK = {"core": 0, "store": 1, "tokens": 2, "precompute": 2, "eval": 2, "train": 2, "top": 3}
STAGES = {"tokens", "precompute", "eval", "train"}
CROSS_STAGE = {
    # `pact train --probe-every` measures drift with eval's probe, as `pact eval --probe` does
    ("train", "pact.pipeline.probe"),
    # `pact tokens` generates refusals for safety rows without one, with eval's greedy decoder
    ("tokens", "pact.pipeline.generation"),
}
MODEL_CODE = ("transformers", "peft")


def layer_of(name: str) -> str | None:
    """The layer of a dotted module (or `module.attribute`) name; None outside pact."""
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best else None


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name a source file is imported as."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `path`: `import a.b` gives `a.b`, `from a
    import b` gives `a.b` (b a submodule or a name of a); relative imports are resolved
    against the module's package."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def refused(importer: str, name: str) -> str | None:
    """Why `importer` (a dotted module) may not import `name`; None when it may."""
    source, target = layer_of(importer), layer_of(name)
    if source == "store" and name.split(".")[0] in MODEL_CODE:
        return "the store imports no model code"
    if source is None or target is None or source == target:
        return None
    if RANK[target] > RANK[source]:
        return f"{source} may not import the {target} layer above it"
    if source in STAGES and target in STAGES and not any(
        source == s and (name == m or name.startswith(m + ".")) for s, m in CROSS_STAGE
    ):
        return f"stage {source} may not import stage {target}"
    return None


def source_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (root / folder).rglob("*.py"))


def test_every_source_file_has_a_layer() -> None:
    missing = [p.relative_to(ROOT).as_posix() for p in source_files() if layer_of(module_name(p)) is None]
    assert missing == ["pact/__init__.py", "pipeline/__init__.py"]  # the lazy API, an empty package


def test_layers_import_only_downwards() -> None:
    violations = []
    for path in source_files():
        importer = module_name(path)
        for line, name in imported_names(path):
            why = refused(importer, name)
            if why:
                violations.append(f"{path.relative_to(ROOT).as_posix()}:{line} imports {name}: {why}")
    assert violations == []


@pytest.mark.parametrize(
    ("importer", "name", "why"),
    [
        ("pact.core.encoding", "pact.store.manifest.Store", "core may not import the store layer above it"),
        ("pact.store.sql", "transformers.AutoModel", "the store imports no model code"),
        ("pact.store.sql", "pact.trainer.loss", "store may not import the train layer above it"),
        ("pact.pipeline.precompute", "pact.trainer.batches", "stage precompute may not import stage train"),
        ("pact.pipeline.precompute.compute", "pact.trainer.batches", "stage precompute may not import stage train"),
        ("pact.pipeline.precompute.run", "pact.pipeline.precompute.compute.compute_targets", None),
        ("pact.trainer.train", "pact.pipeline.evaluate", "stage train may not import stage eval"),
        ("pact.trainer.train", "pact.pipeline.cli", "train may not import the top layer above it"),
        ("pact.trainer.inputs", "pact.pipeline.probe.probe_drift", None),
        ("pact.pipeline.commands.train", "pact.trainer.train.train", None),
        ("pact.pipeline.tokens", "pact.core.models", None),
    ],
)
def test_the_rule_refuses_what_it_should(importer: str, name: str, why: str | None) -> None:
    assert refused(importer, name) == why


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    module = tmp_path / "trainer" / "example.py"
    module.parent.mkdir()
    module.write_text(
        "import pact.pipeline\n"
        "import torch, pact.core.models as m\n"
        "from pact.core import data, encoding\n"
        "from .loss import pact_kl\n"
        "from ..pipeline.probe import probe_drift\n"
        "def f():\n"
        "    from pact.pipeline.evaluate import evaluate\n"
    )
    names = [name for _, name in imported_names(module, root=tmp_path)]
    assert names == [
        "pact.pipeline", "torch", "pact.core.models", "pact.core.data", "pact.core.encoding",
        "pact.trainer.loss.pact_kl", "pact.pipeline.probe.probe_drift", "pact.pipeline.evaluate.evaluate",
    ]  # fmt: skip
    assert [n for n in names if refused("pact.trainer.example", n)] == ["pact.pipeline.evaluate.evaluate"]


def _loaded_after(code: str) -> list[str]:
    """The pact modules (and torch) loaded by `code` in a fresh interpreter."""
    probe = code + "\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('pact', 'torch'))))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT.parent, capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_importing_the_trainer_loads_no_other_stage() -> None:
    loaded = _loaded_after("import pact.trainer.train")
    others = [m for m in loaded if layer_of(m) in STAGES - {"train"} and m != "pact.pipeline.probe"]
    assert others == []
    assert "pact.trainer.train" in loaded


def test_the_precompute_package_is_one_stage() -> None:
    """Every module of pipeline/precompute/ is the precompute stage, and importing it
    loads no other stage."""
    modules = [module_name(p) for p in sorted((ROOT / "pipeline" / "precompute").glob("*.py"))]
    assert "pact.pipeline.precompute.run" in modules
    assert {layer_of(m) for m in modules} == {"precompute"}
    loaded = _loaded_after("import pact.pipeline.precompute")
    assert [m for m in loaded if layer_of(m) in STAGES - {"precompute"}] == []
    assert "pact.pipeline.precompute.compute" in loaded


def test_importing_pact_is_cheap() -> None:
    """The public API is imported on first use: `import pact` loads no torch."""
    assert _loaded_after("import pact") == ["pact"]
    assert "torch" in _loaded_after("import pact\npact.pact_kl")
