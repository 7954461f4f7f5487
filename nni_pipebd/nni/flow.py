"""The search steps the NNI strategies and the nnictl tuner share: settings, DNA search, DONNA predictor and search."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from ..library import atomic_save
from ..search.constrained import NORMALIZATIONS
from ..search.costs import parse_budget
from ..search.donna import AccuracyPredictor, donna_search, predictor_from_results, sample_architectures
from ..search.errors import SearchError
from ..search.ranking import RankingSettings, rank_library
from ..search.runner import search_library
from .jobconfig import METHODS

__all__ = ["METHODS", "NNI_SEARCH", "SearchSettings", "dna_candidates", "predictor_samples", "donna_candidates"]

_logger = logging.getLogger(__name__)

NNI_SEARCH = "nni_search.json"
"""Written into the library folder by the NNI flows: the search's architectures (and DONNA's predictor)."""


@dataclass(frozen=True)
class SearchSettings:
    """How the library is searched once it is trained.

    Parameters
    ----------
    method : str
        ``dna`` (exact constrained search on block losses) or ``donna`` (accuracy predictor fitted on
        ``predictor_archs`` finetuned architectures, then NSGA-II).
    budget : str
        ``params=N``, ``flops=N`` or ``latency_ms=X`` (suffixes k, M, G).
    top_k : int
        Architectures finetuned and evaluated at the end (the experiment's top models come from them).
    ranking : RankingSettings
        How block paths are scored.
    normalize : str
        DNA: block-loss normalisation before summing (``mean``, ``min``, ``none``).
    predictor_archs : int
        DONNA: architectures finetuned to fit the predictor (>= 2).
    population, generations : int
        DONNA: NSGA-II size.
    seed : int
        Path sample, predictor architectures, evolution.
    device : str
        Where ranking runs: ``cpu``, ``cuda`` or ``auto``.
    """

    method: str
    budget: str
    top_k: int = 3
    ranking: RankingSettings = field(default_factory=RankingSettings)
    normalize: str = "mean"
    predictor_archs: int = 8
    population: int = 64
    generations: int = 60
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SearchError(f"search method {self.method!r} is not valid; choose one of {list(METHODS)}")
        if not isinstance(self.budget, str):
            raise SearchError(f"budget = {self.budget!r} must be a string such as 'params=2M' or 'flops=300M'")
        parse_budget(self.budget)
        for name in ("top_k", "population", "generations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SearchError(f"{name} = {value!r} must be an int >= 1")
        if self.method == "donna" and (not isinstance(self.predictor_archs, int) or self.predictor_archs < 2):
            raise SearchError(f"predictor_archs = {self.predictor_archs!r} must be an int >= 2: the predictor is "
                              "fitted on that many finetuned architectures")
        if self.normalize not in NORMALIZATIONS:
            raise SearchError(f"normalize = {self.normalize!r} is not valid; choose one of {list(NORMALIZATIONS)}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise SearchError(f"device = {self.device!r} is not valid; choose one of ['cpu', 'cuda', 'auto']")

    @classmethod
    def create(cls, method: str, budget: str, top_k: int = 3,
               ranking: Union[RankingSettings, Mapping[str, Any], None] = None, **options: Any) -> "SearchSettings":
        """Like the constructor, with ``ranking`` also given as a dict of :class:`RankingSettings` fields."""
        if ranking is None:
            ranking = RankingSettings()
        elif isinstance(ranking, Mapping):
            ranking = RankingSettings(**ranking)
        return cls(method, budget, top_k, ranking, **options)

    @property
    def required_models(self) -> int:
        """Models (trials) the whole flow runs: the distillation, DONNA's predictor architectures, the top-k."""
        return 1 + self.top_k + (self.predictor_archs if self.method == "donna" else 0)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def dna_candidates(library_dir: Union[str, Path], settings: SearchSettings) -> List[Dict[str, Any]]:
    """DNA: rank the library and return the ``top_k`` architectures within the budget (also in ``nni_search.json``).

    Raises
    ------
    nni_pipebd.search.errors.InfeasibleBudgetError
        No architecture fits; the message names the smallest feasible budget.
    """
    out = Path(library_dir) / NNI_SEARCH
    result = search_library(library_dir, "dna", settings.budget, top_k=settings.top_k, ranking=settings.ranking,
                            normalize=settings.normalize, seed=settings.seed, device=settings.device, out=out)
    _logger.info("DNA search under %s: %d architectures (written to %s)", settings.budget,
                 len(result["architectures"]), out)
    return result["architectures"]


def predictor_samples(library_dir: Union[str, Path], settings: SearchSettings) -> List[Dict[str, Any]]:
    """DONNA: rank the library and draw the ``predictor_archs`` architectures to finetune (seeded)."""
    scores = rank_library(library_dir, settings.ranking, device=settings.device)
    return sample_architectures(scores, settings.predictor_archs, settings.seed)


def donna_candidates(library_dir: Union[str, Path], settings: SearchSettings, samples: Sequence[Mapping[str, Any]],
                     accuracies: Sequence[float]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """DONNA: fit the predictor on the finetuned ``samples`` and their ``accuracies``, then search the front.

    Returns
    -------
    architectures : list of dict
        The ``top_k`` front members of highest predicted accuracy within the budget.
    predictor : dict
        Coefficients, the architectures it was fitted on, ``r2`` and ``loo_mae``.

    Raises
    ------
    SearchError
        Fewer than two accuracies (the predictor cannot be fitted), or lengths differ.
    """
    if len(samples) != len(accuracies) or len(samples) < 2:
        raise SearchError(f"the DONNA predictor needs at least 2 finetuned architectures with accuracies; got "
                          f"{len(samples)} architectures and {len(accuracies)} accuracies (did predictor trials "
                          "fail? see their logs)")
    start = time.perf_counter()
    scores = rank_library(library_dir, settings.ranking, device=settings.device)
    fitted = predictor_from_results(scores, samples, accuracies)
    predictor = AccuracyPredictor.from_dict(fitted["predictor"])
    architectures = donna_search(scores, predictor, parse_budget(settings.budget), top_k=settings.top_k,
                                 population=settings.population, generations=settings.generations, seed=settings.seed)
    out = Path(library_dir) / NNI_SEARCH
    atomic_save({"method": "donna", "budget": settings.budget, "predictor": fitted, "architectures": architectures,
                 "time_s": time.perf_counter() - start}, out)
    _logger.info("DONNA search under %s: predictor r2 %s, %d architectures (written to %s)", settings.budget,
                 fitted.get("r2"), len(architectures), out)
    return architectures, fitted
