"""DNA constrained search: one scored path per block, minimum summed normalised block loss under a cost budget (exact)."""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .inputs import METRICS, Budget, fits, slack_limit
from .errors import InfeasibleBudgetError, SearchError

__all__ = ["NORMALIZATIONS", "Candidate", "normalized_scores", "solve_top_k", "dna_search", "architecture_costs"]

_logger = logging.getLogger(__name__)

NORMALIZATIONS = ("mean", "min", "none")


@dataclass(frozen=True)
class Candidate:
    """One combination found by :func:`solve_top_k`: total score, total cost and the option index per group."""

    score: float
    cost: float
    indices: Tuple[int, ...]


def normalized_scores(values: Sequence[float], how: str = "mean") -> np.ndarray:
    """Divide a block's scores by their mean (``mean``), their minimum (``min``) or by 1 (``none``).

    ``mean`` (the default of :func:`dna_search`) puts every block on the same scale — an average path of any
    block contributes 1 to the sum — so blocks whose raw losses are large (deep, wide feature maps) do not
    drown the others, while the order of paths inside a block is unchanged. ``min`` makes the best path of each
    block 1; it is more sensitive to one outlier. ``none`` sums raw losses (sensible with the scale-free
    ``nmse`` loss).
    """
    values = np.asarray(values, dtype=np.float64)
    if how not in NORMALIZATIONS:
        raise SearchError(f"normalisation {how!r} is not valid; choose one of {list(NORMALIZATIONS)}")
    if how == "none":
        return values.copy()
    scale = values.mean() if how == "mean" else values.min()
    if not scale > 0:
        raise SearchError(f"cannot normalise block scores by their {how} ({scale!r}); use normalize='none'")
    return values / scale


def solve_top_k(costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], limit: float, k: int = 1,
                fixed_cost: float = 0.0, bins: int = 2048, metric: str = "cost") -> List[Candidate]:
    """The ``k`` combinations (one option per group) of smallest summed score whose summed cost fits ``limit``.

    Exact branch and bound: groups are taken in order; options of a group in increasing score; a partial
    combination is cut when its score plus a lower bound on the remaining groups' best score, given the
    remaining budget, cannot beat the k-th best complete combination found so far. The lower bound is a
    dynamic programme over a discretised budget with costs rounded *down* (a relaxation, so it never cuts
    an optimal combination); costs themselves are compared exactly. Ties in score are broken by cost, then
    by the option indices.

    Parameters
    ----------
    costs, scores : sequence of sequences of float
        Per group, the cost (>= 0) and score of each option.
    limit : float
        The budget on ``fixed_cost`` + summed cost (inclusive, up to a relative 1e-9).
    k : int
        How many combinations to return (fewer if fewer fit).
    fixed_cost : float
        Cost that every combination pays (blocks without choices, the head).
    bins : int
        Resolution of the discretised budget of the bound (speed only; results are exact for any value).
    metric : str
        Name of the cost, for the error message.

    Returns
    -------
    list of Candidate
        Best first; ``cost`` includes ``fixed_cost``.

    Raises
    ------
    InfeasibleBudgetError
        No combination fits; it names the smallest feasible budget.
    """
    if k < 1:
        raise SearchError(f"top-k = {k!r} must be >= 1")
    groups = len(costs)
    if groups != len(scores) or any(len(c) != len(s) or len(c) == 0 for c, s in zip(costs, scores)):
        raise SearchError("costs and scores need one non-empty list of options per group, of equal lengths")
    c = [np.asarray(v, dtype=np.float64) for v in costs]
    s = [np.asarray(v, dtype=np.float64) for v in scores]
    if any((v < 0).any() or not np.isfinite(v).all() for v in c):
        raise SearchError("option costs must be finite and >= 0")
    smallest = fixed_cost + sum(float(v.min()) for v in c)
    if not fits(smallest, limit):
        raise InfeasibleBudgetError(metric, limit, smallest, fixed_cost)
    remaining = slack_limit(limit) - fixed_cost
    unit = max(remaining, 1e-12) / bins
    bound = _suffix_bounds(c, s, unit, bins)
    min_cost_after = [float(sum(v.min() for v in c[j:])) for j in range(1, groups)] + [0.0]
    orders = [np.lexsort((v_c, v_s)) for v_c, v_s in zip(c, s)]  # by score, then cost
    best: List[Tuple[float, float, Tuple[int, ...]]] = []  # max-heap by (score, cost, indices) via negation

    def worst() -> Tuple[float, float]:
        return (-best[0][0], -best[0][1]) if len(best) == k else (math.inf, math.inf)

    def visit(j: int, score: float, cost: float, chosen: List[int]) -> None:
        budget_left = remaining - cost
        for p in orders[j]:
            cp, sp = float(c[j][p]), float(s[j][p])
            if cp > budget_left or cp + min_cost_after[j] > budget_left:
                continue
            left_bins = _bin(budget_left - cp, unit, bins)
            lower = score + sp + (bound[j + 1][left_bins] if j + 1 < groups else 0.0)
            if lower > worst()[0]:
                if j + 1 >= groups or score + sp + bound[j + 1][bins] > worst()[0]:
                    break  # options come in increasing score: no later one can do better
                continue
            chosen.append(int(p))
            if j + 1 == groups:
                entry = (-(score + sp), -(cost + cp), tuple(-i for i in chosen))
                if len(best) < k:
                    heapq.heappush(best, entry)
                elif entry > best[0]:
                    heapq.heapreplace(best, entry)
            else:
                visit(j + 1, score + sp, cost + cp, chosen)
            chosen.pop()

    visit(0, 0.0, 0.0, [])
    if not best:  # only float rounding at the very edge of the budget can get here
        raise InfeasibleBudgetError(metric, limit, smallest, fixed_cost)
    found = sorted((-e[0], -e[1], tuple(-i for i in e[2])) for e in best)
    return [Candidate(score, fixed_cost + cost, indices) for score, cost, indices in found]


def _bin(amount: float, unit: float, bins: int) -> int:
    """Budget bin index, rounded up generously (the bound must stay optimistic)."""
    if amount <= 0:
        return 0
    return min(bins, int(math.floor(amount / unit * (1 + 1e-9) + 1e-9)))


def _suffix_bounds(costs: Sequence[np.ndarray], scores: Sequence[np.ndarray], unit: float,
                   bins: int) -> List[np.ndarray]:
    """``bound[j][b]``: least summed score of groups j.. with costs rounded down to bins, total <= b bins."""
    groups = len(costs)
    bound: List[np.ndarray] = [np.zeros(0)] * (groups + 1)
    bound[groups] = np.zeros(bins + 1)
    for j in range(groups - 1, -1, -1):
        weights = np.floor(costs[j] / unit * (1 - 1e-9)).astype(np.int64)
        table = np.full(bins + 1, math.inf)
        nxt = bound[j + 1]
        for w, score in zip(weights, scores[j]):
            if w > bins:
                continue
            shifted = np.full(bins + 1, math.inf)
            shifted[w:] = nxt[:bins + 1 - w] + score
            np.minimum(table, shifted, out=table)
        bound[j] = table
    return bound


def architecture_costs(scores: Mapping[str, Any], choice: Mapping[int, int]) -> Dict[str, Optional[float]]:
    """Summed ``params``, ``flops``, ``latency_ms`` of the network taking path ``choice[i]`` of every block ``i``
    with choices (blocks without choices add their only entry). ``latency_ms`` is ``None`` when not measured."""
    totals: Dict[str, Optional[float]] = {metric: 0.0 for metric in METRICS}
    for block in scores["blocks"]:
        entry = block["paths"][choice.get(block["index"], 0)]
        for metric in METRICS:
            value = entry.get(metric)
            totals[metric] = None if value is None or totals[metric] is None else totals[metric] + value
    for metric in ("params", "flops"):
        totals[metric] = int(totals[metric])
    return totals


def dna_search(scores: Mapping[str, Any], budget: Budget, top_k: int = 1,
               normalize: str = "mean") -> List[Dict[str, Any]]:
    """DNA's constrained search over a library's ``scores.json``.

    Minimises the sum over blocks with choices of the normalised block loss (see :func:`normalized_scores`)
    subject to the whole network's cost (every block's path plus blocks without choices, such as the head)
    fitting ``budget``; only scored paths are candidates. Parameters and MACs add up exactly over blocks;
    latency is the sum of per-block CPU latencies (a lookup-table estimate).

    Returns
    -------
    list of dict
        Best first, each ``{"rank", "sample" (NNI sample dict), "score" (summed normalised loss), "block_losses"
        (raw loss per block), "cost": {params, flops, latency_ms}}``.

    Raises
    ------
    InfeasibleBudgetError
        Nothing fits; the message names the smallest feasible budget.
    SearchError
        Latency is budgeted but was not measured (``latency_runs=0``).
    """
    searchable = [b for b in scores["blocks"] if b["labels"]]
    fixed = [b for b in scores["blocks"] if not b["labels"]]
    if not searchable:
        raise SearchError("the library has no block with choices (a fixed student): there is nothing to search; "
                          "finetune it directly (`nni-pipebd finetune LIBRARY_DIR`)")

    def cost_of(entry: Mapping[str, Any]) -> float:
        value = entry.get(budget.metric)
        if value is None:
            raise SearchError(f"the scores hold no {budget.metric}; rank the library again with latency_runs > 0")
        return float(value)

    fixed_cost = sum(cost_of(b["paths"][0]) for b in fixed)
    costs = [[cost_of(e) for e in b["paths"]] for b in searchable]
    normalized = [normalized_scores([e["loss"] for e in b["paths"]], normalize) for b in searchable]
    found = solve_top_k(costs, normalized, budget.limit, top_k, fixed_cost, metric=budget.metric)
    results = []
    for rank, candidate in enumerate(found):
        choice = {b["index"]: p for b, p in zip(searchable, candidate.indices)}
        sample: Dict[str, Any] = {}
        for b in searchable:
            sample.update(b["paths"][choice[b["index"]]]["path"])
        results.append({
            "rank": rank,
            "sample": sample,
            "score": candidate.score,
            "block_losses": {str(b["index"]): b["paths"][choice.get(b["index"], 0)]["loss"] for b in scores["blocks"]},
            "cost": architecture_costs(scores, choice),
        })
    _logger.info("DNA search under %s: best score %.4f at %s", budget, results[0]["score"], results[0]["cost"])
    return results
