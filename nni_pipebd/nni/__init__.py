"""NNI 3.0 glue: evaluator and strategies for ``NasExperiment``, a tuner and trial entry point for ``nnictl create``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = [
    "BlockwiseDistillation", "BlockwiseDNA", "BlockwiseDONNA", "BlockwiseStrategy", "BlockwiseTuner",
    "DistillationTask", "ArchitectureModel", "SearchSettings", "SpaceMismatchError", "LibraryMismatchError",
    "BudgetExhaustedError", "space_choices", "check_space", "legacy_search_space", "META_FILE", "meta_path",
]

# Names are imported on first use: NNI's dispatcher imports the tuner module and must connect to the NNI manager
# within 10 seconds, so nothing here may pull in torch before it is needed.
_HOMES = {
    "BlockwiseDistillation": "evaluator", "LibraryMismatchError": "evaluator",
    "BlockwiseDNA": "strategy", "BlockwiseDONNA": "strategy", "BlockwiseStrategy": "strategy",
    "BudgetExhaustedError": "strategy", "BlockwiseTuner": "tuner", "DistillationTask": "models",
    "ArchitectureModel": "models", "SearchSettings": "flow", "SpaceMismatchError": "space",
    "space_choices": "space", "check_space": "space", "legacy_search_space": "space",
}

META_FILE = "nni_meta.yml"


def meta_path() -> Path:
    """The algorithm meta file for ``nnictl algo register --meta`` (registers the tuner as ``PipeBD``)."""
    return Path(__file__).with_name(META_FILE)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
