"""NNI 3.0 glue: evaluator and strategies for ``NasExperiment``, a tuner and trial entry point for ``nnictl create``."""

from __future__ import annotations

from pathlib import Path

from ..imports import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _HOMES, globals())
