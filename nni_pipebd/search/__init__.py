"""Search on a block library: DNA ranking + exact constrained search, DONNA predictor + NSGA-II, finetuning.

Importing this package is cheap; torch loads with the first name used from a module that needs it, so requests are
checked (:mod:`.inputs`, :func:`.runner.check_search`) before it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..imports import lazy_names

_HOMES = {
    "compress": "compress", "compression_report": "compress", "dna_search": "constrained",
    "AccuracyPredictor": "donna", "donna_search": "donna", "fit_predictor": "donna",
    "ArchitectureError": "errors", "BudgetError": "errors", "InfeasibleBudgetError": "errors", "SearchError": "errors",
    "build_network": "finetune", "finetune": "finetune",
    "Budget": "inputs", "parse_budget": "inputs", "FinetuneSettings": "inputs", "RankingSettings": "inputs",
    "load_architecture": "inputs", "LoadedLibrary": "loaded", "open_library": "loaded", "rank_library": "ranking",
    "search_library": "runner",
}

__all__ = [
    "open_library", "LoadedLibrary", "RankingSettings", "rank_library", "Budget", "parse_budget", "dna_search",
    "AccuracyPredictor", "fit_predictor", "donna_search", "FinetuneSettings", "build_network", "finetune",
    "load_architecture", "compress", "compression_report", "search_library", "SearchError", "BudgetError",
    "InfeasibleBudgetError", "ArchitectureError",
]


class _Package(types.ModuleType):
    """This package, whose ``finetune`` and ``compress`` stay the functions when their modules load.

    Loading a submodule binds it on its package; the functions of the same name win here, as they did when this
    package imported everything at once.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("finetune", "compress") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__getattr__, __dir__ = lazy_names(__name__, _HOMES, globals())
