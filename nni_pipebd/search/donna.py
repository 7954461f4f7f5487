"""DONNA: per-block noise-to-signal ratios, a linear accuracy predictor, and an NSGA-II search of the Pareto front."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..library import atomic_save
from ..spaces.values import value_key
from .constrained import architecture_costs
from .inputs import METRICS, Budget, fits
from .errors import InfeasibleBudgetError, SearchError
from .finetune import FinetuneSettings, finetune
from .loaded import LoadedLibrary, open_library
from .ranking import RankingSettings, rank_library

__all__ = ["PREDICTOR", "PREDICTOR_FORMAT", "AccuracyPredictor", "architecture_features", "sample_architectures",
           "fit_predictor", "load_predictor", "non_dominated_sort", "crowding_distance", "nsga2", "donna_search"]

_logger = logging.getLogger(__name__)

PREDICTOR = "predictor.json"
PREDICTOR_FORMAT = "nni_pipebd.predictor/1"


class AccuracyPredictor:
    """Linear regression of accuracy on per-block NSRs: ``acc = intercept + sum_i coef_i * nsr_i``.

    Least squares (``numpy.linalg.lstsq``), optionally ridge-regularised (``alpha`` on the coefficients, not the
    intercept); with fewer architectures than features it gives the minimum-norm solution.

    Parameters
    ----------
    alpha : float
        Ridge penalty (0: ordinary least squares).
    """

    def __init__(self, alpha: float = 0.0):
        if not alpha >= 0:
            raise SearchError(f"predictor alpha = {alpha!r} must be >= 0")
        self.alpha = float(alpha)
        self.coef: Optional[np.ndarray] = None
        self.intercept: float = 0.0

    def fit(self, features: np.ndarray, accuracy: np.ndarray) -> "AccuracyPredictor":
        """Fit on ``features [n, blocks]`` and ``accuracy [n]`` (n >= 2); returns ``self``."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(accuracy, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
            raise SearchError(f"the predictor needs features [n, d] and accuracies [n] with n >= 2; got shapes "
                              f"{x.shape} and {y.shape}; finetune more architectures")
        x_mean, y_mean = x.mean(0), y.mean()
        xc, yc = x - x_mean, y - y_mean
        if self.alpha > 0:
            xc = np.vstack([xc, np.sqrt(self.alpha) * np.eye(x.shape[1])])
            yc = np.concatenate([yc, np.zeros(x.shape[1])])
        self.coef = np.linalg.lstsq(xc, yc, rcond=None)[0]
        self.intercept = float(y_mean - x_mean @ self.coef)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted accuracy of each row of ``features``."""
        if self.coef is None:
            raise RuntimeError("the predictor is not fitted; call fit(features, accuracy) first")
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.coef):
            raise SearchError(f"features have shape {x.shape}; the predictor expects [n, {len(self.coef)}]")
        return x @ self.coef + self.intercept

    def leave_one_out(self, features: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
        """Prediction of every architecture by a predictor (same ``alpha``) fitted on all the others."""
        x, y = np.asarray(features, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
        out = np.empty(len(y))
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            out[i] = AccuracyPredictor(self.alpha).fit(x[keep], y[keep]).predict(x[i:i + 1])[0]
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"alpha": self.alpha, "coef": None if self.coef is None else self.coef.tolist(),
                "intercept": self.intercept}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AccuracyPredictor":
        predictor = cls(data.get("alpha", 0.0))
        predictor.coef = None if data.get("coef") is None else np.asarray(data["coef"], dtype=np.float64)
        predictor.intercept = float(data.get("intercept", 0.0))
        return predictor


def _searchable(scores: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    return [b for b in scores["blocks"] if b["labels"]]


def _path_lookup(scores: Mapping[str, Any]) -> List[Dict[Tuple[str, ...], int]]:
    return [{value_key([e["path"][label] for label in b["labels"]]): p for p, e in enumerate(b["paths"])}
            for b in _searchable(scores)]


def _choice_of(scores: Mapping[str, Any], sample: Mapping[str, Any],
               lookup: Optional[List[Dict[Tuple[str, ...], int]]] = None) -> List[int]:
    """Index of the scored path of every searchable block that ``sample`` takes."""
    lookup = lookup or _path_lookup(scores)
    indices = []
    for block, table in zip(_searchable(scores), lookup):
        missing = [label for label in block["labels"] if label not in sample]
        if missing:
            raise SearchError(f"the architecture has no choice for {missing} (block {block['index']})")
        key = value_key([sample[label] for label in block["labels"]])
        if key not in table:
            path = {label: sample[label] for label in block["labels"]}
            raise SearchError(f"block {block['index']}: path {path} was not scored "
                              f"({block['scored']} of {block['num_paths']} paths were); rank with a larger max_paths "
                              "or choose scored paths")
        indices.append(table[key])
    return indices


def architecture_features(scores: Mapping[str, Any], samples: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Per-block NSR (blocks with choices, in order) of each architecture: the predictor's input ``[n, blocks]``."""
    lookup = _path_lookup(scores)
    blocks = _searchable(scores)
    return np.array([[blocks[j]["paths"][p]["nsr"] for j, p in enumerate(_choice_of(scores, s, lookup))]
                     for s in samples], dtype=np.float64).reshape(len(samples), len(blocks))


def _sample_of(scores: Mapping[str, Any], genome: Sequence[int]) -> Dict[str, Any]:
    sample: Dict[str, Any] = {}
    for block, p in zip(_searchable(scores), genome):
        sample.update(block["paths"][int(p)]["path"])
    return sample


def sample_architectures(scores: Mapping[str, Any], count: int, seed: int = 0) -> List[Dict[str, Any]]:
    """``count`` distinct architectures, each block's path drawn uniformly from its scored paths (seeded)."""
    blocks = _searchable(scores)
    total = int(np.prod([len(b["paths"]) for b in blocks])) if blocks else 1
    if count > total:
        raise SearchError(f"asked for {count} distinct architectures but the scored space holds only {total}")
    rng = np.random.default_rng(seed)
    seen, samples = set(), []
    while len(samples) < count:
        genome = tuple(int(rng.integers(len(b["paths"]))) for b in blocks)
        if genome not in seen:
            seen.add(genome)
            samples.append(_sample_of(scores, genome))
    return samples


def load_predictor(directory: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """``predictor.json`` of a library folder, or ``None`` when absent or unreadable."""
    path = Path(directory) / PREDICTOR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        _logger.warning("%s is not valid JSON; the predictor will be fitted again", path)
        return None
    return data if data.get("format") == PREDICTOR_FORMAT else None


def fit_predictor(directory: Union[str, Path], num_archs: int = 8, settings: FinetuneSettings = FinetuneSettings(),
                  *, seed: int = 0, alpha: float = 0.0, ranking: RankingSettings = RankingSettings(),
                  force: bool = False, device: str = "cpu",
                  library: Optional[LoadedLibrary] = None) -> Dict[str, Any]:
    """Fit DONNA's accuracy predictor: finetune ``num_archs`` sampled architectures end to end, regress their
    val accuracy on their per-block NSRs, and write ``predictor.json`` into the library (atomically).

    Reused when ``predictor.json`` has the same settings and was fitted on the current scores.

    Returns
    -------
    dict
        ``predictor`` (coefficients), ``archs`` (``sample``, ``features``, ``val_accuracy``), ``r2`` (on the
        fitted architectures), ``loo_mae`` (leave-one-out mean absolute error), ``settings``.
    """
    directory = Path(directory)
    library = library or open_library(directory)
    scores = rank_library(directory, ranking, device=device, library=library)
    wanted = {"num_archs": num_archs, "seed": seed, "alpha": alpha, "finetune": asdict(settings),
              "scores": {"settings": scores["settings"], "fingerprint": scores["fingerprint"]}}
    cached = None if force else load_predictor(directory)
    if cached is not None and cached.get("settings") == wanted:
        _logger.info("reusing %s (same settings and scores)", directory / PREDICTOR)
        return cached
    start = time.perf_counter()
    samples = sample_architectures(scores, num_archs, seed)
    accuracies = []
    for i, sample in enumerate(samples):
        result = finetune(library, sample, settings, device=device)
        accuracies.append(result["student"]["val_accuracy"])
        _logger.info("predictor architecture %d/%d: val accuracy %.4f", i + 1, num_archs, accuracies[-1])
    data = predictor_from_results(scores, samples, accuracies, alpha)
    data.update({"format": PREDICTOR_FORMAT, "settings": wanted, "time_s": time.perf_counter() - start})
    atomic_save(data, directory / PREDICTOR)
    return data


def predictor_from_results(scores: Mapping[str, Any], samples: Sequence[Mapping[str, Any]],
                           accuracies: Sequence[float], alpha: float = 0.0) -> Dict[str, Any]:
    """Fit the predictor on architectures whose accuracy is known; returns the fields of ``predictor.json``."""
    features = architecture_features(scores, samples)
    y = np.asarray(accuracies, dtype=np.float64)
    predictor = AccuracyPredictor(alpha).fit(features, y)
    fitted = predictor.predict(features)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - fitted) ** 2).sum()) / spread if spread > 0 else None
    loo = predictor.leave_one_out(features, y) if len(y) >= 3 else None
    return {
        "predictor": predictor.to_dict(),
        "blocks": [b["index"] for b in _searchable(scores)],
        "archs": [{"sample": dict(s), "features": f.tolist(), "val_accuracy": float(a)}
                  for s, f, a in zip(samples, features, y)],
        "r2": r2,
        "loo_mae": None if loo is None else float(np.abs(loo - y).mean()),
    }


def non_dominated_sort(objectives: np.ndarray) -> List[np.ndarray]:
    """Fronts of ``objectives [n, m]`` (all minimised): front 0 is dominated by no point, front 1 only by front 0, ..."""
    f = np.asarray(objectives, dtype=np.float64)
    n = len(f)
    if n == 0:
        return []
    le = (f[:, None, :] <= f[None, :, :]).all(2)
    lt = (f[:, None, :] < f[None, :, :]).any(2)
    dominates = le & lt  # dominates[i, j]: i dominates j
    count = dominates.sum(0)
    fronts, current = [], np.flatnonzero(count == 0)
    while len(current):
        fronts.append(current)
        count = count - dominates[current].sum(0)
        count[current] = -1
        current = np.flatnonzero(count == 0)
    return fronts


def crowding_distance(objectives: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of the points of one front (boundary points get infinity)."""
    f = np.asarray(objectives, dtype=np.float64)
    n, m = f.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(f[:, k], kind="stable")
        span = f[order[-1], k] - f[order[0], k]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (f[order[2:], k] - f[order[:-2], k]) / span
    return distance


def nsga2(num_options: Sequence[int], evaluate: Callable[[np.ndarray], np.ndarray],
          violation: Optional[Callable[[np.ndarray], np.ndarray]] = None, population: int = 64,
          generations: int = 60, seed: int = 0, crossover: float = 0.9) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NSGA-II (Deb et al. 2002) over genomes of one option index per gene, with constrained domination.

    Binary tournaments on (violation, front, crowding), uniform crossover, per-gene mutation with probability
    1/genes, elitist survival of parents + offspring by front and crowding distance. Every genome evaluated is
    kept, so the returned front is the non-dominated set of all of them.

    Parameters
    ----------
    num_options : sequence of int
        Options per gene.
    evaluate : callable
        ``genomes [n, genes] -> objectives [n, m]`` to minimise.
    violation : callable, optional
        ``genomes -> [n]`` constraint violation (0 = feasible).
    population, generations, seed, crossover
        Population size, generations, RNG seed, crossover probability.

    Returns
    -------
    genomes, objectives, feasible : numpy.ndarray
        Every distinct genome evaluated, its objectives, and whether it is feasible.
    """
    rng = np.random.default_rng(seed)
    options = np.asarray(num_options, dtype=np.int64)
    if len(options) == 0 or (options < 1).any():
        raise SearchError(f"nsga2 needs at least one gene and >= 1 option per gene; got {list(num_options)}")
    genes = len(options)
    archive: Dict[Tuple[int, ...], Tuple[np.ndarray, float]] = {}

    def assess(pop: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        new = [g for g in {tuple(int(v) for v in row) for row in pop} if g not in archive]
        if new:
            arr = np.array(new, dtype=np.int64)
            objs = np.asarray(evaluate(arr), dtype=np.float64)
            viol = np.zeros(len(arr)) if violation is None else np.asarray(violation(arr), dtype=np.float64)
            for g, o, v in zip(new, objs, viol):
                archive[g] = (o, float(max(v, 0.0)))
        objs = np.array([archive[tuple(int(v) for v in row)][0] for row in pop])
        viol = np.array([archive[tuple(int(v) for v in row)][1] for row in pop])
        return objs, viol

    def rank(objs: np.ndarray, viol: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Front index (infeasible after all feasible, by violation) and crowding distance."""
        front = np.zeros(len(objs), dtype=np.int64)
        crowd = np.zeros(len(objs))
        feasible = np.flatnonzero(viol == 0)
        fronts = non_dominated_sort(objs[feasible])
        for r, members in enumerate(fronts):
            front[feasible[members]] = r
            crowd[feasible[members]] = crowding_distance(objs[feasible[members]])
        infeasible = np.flatnonzero(viol > 0)
        if len(infeasible):
            levels = np.unique(viol[infeasible])
            front[infeasible] = len(fronts) + np.searchsorted(levels, viol[infeasible])
        return front, crowd

    pop = np.stack([rng.integers(options) for _ in range(population)])
    objs, viol = assess(pop)
    front, crowd = rank(objs, viol)
    for _ in range(generations):
        def tournament() -> int:
            a, b = rng.integers(population, size=2)
            return int(a) if (front[a], -crowd[a]) <= (front[b], -crowd[b]) else int(b)

        children = []
        while len(children) < population:
            p1, p2 = pop[tournament()], pop[tournament()]
            if rng.random() < crossover:
                mask = rng.random(genes) < 0.5
                c1, c2 = np.where(mask, p1, p2), np.where(mask, p2, p1)
            else:
                c1, c2 = p1.copy(), p2.copy()
            for child in (c1, c2):
                mutate = rng.random(genes) < 1.0 / genes
                child[mutate] = rng.integers(options[mutate])
                children.append(child)
        merged = np.concatenate([pop, np.stack(children[:population])])
        m_objs, m_viol = assess(merged)
        m_front, m_crowd = rank(m_objs, m_viol)
        order = np.lexsort((-m_crowd, m_front))[:population]
        pop, objs, viol, front, crowd = merged[order], m_objs[order], m_viol[order], m_front[order], m_crowd[order]
    genomes = np.array(list(archive), dtype=np.int64).reshape(-1, genes)
    objectives = np.array([archive[g][0] for g in archive])
    feasible = np.array([archive[g][1] == 0 for g in archive])
    return genomes, objectives, feasible


def _front_2d(objectives: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points of ``[n, 2]`` (minimised), by increasing first objective (a sweep)."""
    order = np.lexsort((objectives[:, 1], objectives[:, 0]))
    front, best = [], np.inf
    for i in order:
        if objectives[i, 1] < best:
            front.append(i)
            best = objectives[i, 1]
    return np.array(front, dtype=np.int64)


def donna_search(scores: Mapping[str, Any], predictor: AccuracyPredictor, budget: Optional[Budget] = None, *,
                 metric: Optional[str] = None, top_k: Optional[int] = None, population: int = 64,
                 generations: int = 60, seed: int = 0) -> List[Dict[str, Any]]:
    """DONNA's search: NSGA-II over scored paths, maximising predicted accuracy and minimising a cost.

    Parameters
    ----------
    scores : dict
        ``scores.json`` of the library (NSR and costs per scored path).
    predictor : AccuracyPredictor
        Fitted on per-block NSRs.
    budget : Budget, optional
        Upper bound on the cost metric; only architectures within it are returned.
    metric : str, optional
        The cost objective when no budget is given (``params``, ``flops``, ``latency_ms``).
    top_k : int, optional
        Keep the ``top_k`` front members of highest predicted accuracy (default: the whole front).

    Returns
    -------
    list of dict
        The Pareto front, highest predicted accuracy first: ``rank``, ``sample``, ``predicted_accuracy``,
        ``cost`` (``params``, ``flops``, ``latency_ms`` of the whole network), ``block_nsr``.
    """
    metric = budget.metric if budget is not None else (metric or "params")
    if metric not in METRICS:
        raise SearchError(f"cost metric {metric!r} is not valid; choose one of {list(METRICS)}")
    blocks = _searchable(scores)
    if not blocks:
        raise SearchError("the library has no block with choices (a fixed student): there is nothing to search; "
                          "finetune it directly (`nni-pipebd finetune LIBRARY_DIR`)")
    fixed_blocks = [b for b in scores["blocks"] if not b["labels"]]
    if any(e.get(metric) is None for b in scores["blocks"] for e in b["paths"]):
        raise SearchError(f"the scores hold no {metric}; rank the library again with latency_runs > 0")
    fixed = sum(float(b["paths"][0][metric]) for b in fixed_blocks)
    cost_table = [np.array([e[metric] for e in b["paths"]], dtype=np.float64) for b in blocks]
    nsr_table = [np.array([e["nsr"] for e in b["paths"]], dtype=np.float64) for b in blocks]
    smallest = fixed + sum(float(c.min()) for c in cost_table)
    if budget is not None and not fits(smallest, budget.limit):
        raise InfeasibleBudgetError(metric, budget.limit, smallest, fixed)

    def costs_of(genomes: np.ndarray) -> np.ndarray:
        return fixed + sum(cost_table[j][genomes[:, j]] for j in range(len(blocks)))

    def evaluate(genomes: np.ndarray) -> np.ndarray:
        features = np.stack([nsr_table[j][genomes[:, j]] for j in range(len(blocks))], axis=1)
        return np.stack([-predictor.predict(features), costs_of(genomes)], axis=1)

    def violation(genomes: np.ndarray) -> np.ndarray:
        if budget is None:
            return np.zeros(len(genomes))
        cost = costs_of(genomes)
        return np.where([fits(c, budget.limit) for c in cost], 0.0, cost - budget.limit)

    genomes, objectives, feasible = nsga2([len(b["paths"]) for b in blocks], evaluate, violation,
                                          population, generations, seed)
    genomes, objectives = genomes[feasible], objectives[feasible]
    order = _front_2d(objectives)
    if top_k is not None:
        order = order[:top_k]
    results = []
    for rank, i in enumerate(order):
        genome = genomes[i]
        choice = {b["index"]: int(p) for b, p in zip(blocks, genome)}
        results.append({
            "rank": rank,
            "sample": _sample_of(scores, genome),
            "predicted_accuracy": float(-objectives[i, 0]),
            "cost": architecture_costs(scores, choice),
            "block_nsr": {str(b["index"]): float(b["paths"][choice[b["index"]]]["nsr"]) for b in blocks},
        })
    _logger.info("DONNA search (%s%s): %d architectures on the Pareto front, %d evaluated",
                 metric, f" <= {budget.limit:g}" if budget else "", len(order), len(genomes))
    return results
