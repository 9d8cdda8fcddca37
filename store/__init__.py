"""The on-disk contract between pact's stages (no torch model code here)."""

from store.errors import PactError
from store.manifest import Store
from store.safety import SafetySet, load_safety_set, safety_set_from_vector, save_safety_set
from store.targets import ExampleTargets, TargetReader, TargetWriter

__all__ = [
    "ExampleTargets",
    "PactError",
    "SafetySet",
    "Store",
    "TargetReader",
    "TargetWriter",
    "load_safety_set",
    "safety_set_from_vector",
    "save_safety_set",
]
