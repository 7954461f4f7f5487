"""The flows behind ``nni-pipebd search`` and ``nni-pipebd finetune``: rank, search, export architectures."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..library import atomic_save, read_library
from .errors import SearchError
from .inputs import Budget, FinetuneSettings, RankingSettings, parse_budget

__all__ = ["SEARCH_FORMAT", "METHODS", "check_search", "search_library"]

_logger = logging.getLogger(__name__)

SEARCH_FORMAT = "nni_pipebd.search/1"
METHODS = ("dna", "donna")


def search_library(directory: Union[str, Path], method: str, budget: Union[Budget, str], *,
                   top_k: Optional[int] = None, ranking: RankingSettings = RankingSettings(),
                   normalize: str = "mean", predictor_archs: int = 8,
                   finetune_settings: FinetuneSettings = FinetuneSettings(), population: int = 64,
                   generations: int = 60, seed: int = 0, device: str = "cpu",
                   out: Union[str, Path, None] = None) -> Dict[str, Any]:
    """Search a block library for architectures within ``budget``.

    ``dna``: rank the library (``scores.json``, reused when current), then the exact constrained search for the
    ``top_k`` (default 5) architectures of least summed normalised block loss. ``donna``: rank, fit the accuracy
    predictor on ``predictor_archs`` finetuned architectures (``predictor.json``, reused when current), then
    NSGA-II for the Pareto front of predicted accuracy vs the budgeted cost (all of it, or the ``top_k`` most
    accurate).

    Returns
    -------
    dict
        ``format``, ``library``, ``method``, ``budget``, ``ranking`` (settings and per-block coverage),
        ``architectures`` (best first; each has ``sample``, an NNI sample dict, and ``cost``), for ``donna`` also
        ``predictor``; written to ``out`` as JSON when given (atomically).
    """
    budget = check_search(directory, method, budget, top_k)
    from .constrained import dna_search
    from .donna import AccuracyPredictor, donna_search, fit_predictor
    from .loaded import open_library
    from .ranking import rank_library

    start = time.perf_counter()
    directory = Path(directory)
    library = open_library(directory)
    if not library.choices:
        raise SearchError(f"{directory} holds a fixed student (no layer choices): there is nothing to search; "
                          "finetune it directly (`nni-pipebd finetune LIBRARY_DIR`)")
    scores = rank_library(directory, ranking, device=device, library=library)
    result: Dict[str, Any] = {
        "format": SEARCH_FORMAT,
        "library": str(directory),
        "method": method,
        "budget": str(budget),
        "ranking": {"settings": scores["settings"], "loss": scores["loss"],
                    "blocks": [{k: b[k] for k in ("index", "num_paths", "scored", "exhaustive")}
                               for b in scores["blocks"]]},
    }
    if method == "dna":
        result["normalize"] = normalize
        result["architectures"] = dna_search(scores, budget, top_k or 5, normalize)
    else:
        fitted = fit_predictor(directory, predictor_archs, finetune_settings, seed=seed, ranking=ranking,
                               device=device, library=library)
        predictor = AccuracyPredictor.from_dict(fitted["predictor"])
        result["predictor"] = {k: fitted[k] for k in ("predictor", "blocks", "r2", "loo_mae", "settings")}
        result["architectures"] = donna_search(scores, predictor, budget, top_k=top_k, population=population,
                                               generations=generations, seed=seed)
    result["time_s"] = time.perf_counter() - start
    if out is not None:
        atomic_save(result, out)
    return result


def check_search(directory: Union[str, Path], method: str, budget: Union[Budget, str],
                 top_k: Optional[int] = None) -> Budget:
    """Check a search request without torch (:func:`search_library` starts with it; the CLI calls it first).

    Returns
    -------
    Budget
        ``budget``, parsed when it is text.

    Raises
    ------
    SearchError
        An unknown method, a budget that is not ``METRIC=VALUE`` or a ``top_k`` below 1.
    nni_pipebd.library.LibraryError
        ``directory`` holds no finished library (or its ``library.json`` is unreadable).
    nni_pipebd.config.ConfigError
        The library's config is no longer valid.
    """
    if method not in METHODS:
        raise SearchError(f"search method {method!r} is not valid; choose one of {list(METHODS)}")
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise SearchError(f"top-k = {top_k!r} must be an int >= 1")
    read_library(directory)
    return budget
