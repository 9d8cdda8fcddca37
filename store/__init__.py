"""The on-disk contract between pact's stages (no torch model code here)."""

from pact.store.manifest import Store
from pact.store.safety import SafetySet, load_safety_set, safety_set_from_vector, save_safety_set
from pact.store.targets import ExampleTargets, TargetReader, TargetWriter

__all__ = [
    "ExampleTargets",
    "SafetySet",
    "Store",
    "TargetReader",
    "TargetWriter",
    "load_safety_set",
    "safety_set_from_vector",
    "save_safety_set",
]
