"""Search on a block library: DNA ranking + exact constrained search, DONNA predictor + NSGA-II, finetuning."""

from __future__ import annotations

from .compress import compress, compression_report
from .constrained import dna_search
from .costs import Budget, parse_budget
from .donna import AccuracyPredictor, donna_search, fit_predictor
from .errors import ArchitectureError, BudgetError, InfeasibleBudgetError, SearchError
from .finetune import FinetuneSettings, build_network, finetune, load_architecture
from .loaded import LoadedLibrary, open_library
from .ranking import RankingSettings, rank_library
from .runner import search_library

__all__ = [
    "open_library", "LoadedLibrary", "RankingSettings", "rank_library", "Budget", "parse_budget", "dna_search",
    "AccuracyPredictor", "fit_predictor", "donna_search", "FinetuneSettings", "build_network", "finetune",
    "load_architecture", "compress", "compression_report", "search_library", "SearchError", "BudgetError",
    "InfeasibleBudgetError", "ArchitectureError",
]
