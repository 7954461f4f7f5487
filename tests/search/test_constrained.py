"""DNA constrained search: exact (equals brute force), budgets respected, infeasible budgets named."""

import itertools

import numpy as np
import pytest

from conftest import tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.search.constrained import dna_search, normalized_scores, solve_top_k
from nni_pipebd.search.costs import Budget, fits
from nni_pipebd.search.errors import InfeasibleBudgetError, SearchError
from nni_pipebd.search.ranking import RankingSettings, rank_library


def brute_force(costs, scores, limit, k, fixed=0.0):
    found = []
    for combo in itertools.product(*(range(len(c)) for c in costs)):
        cost = fixed + sum(c[i] for c, i in zip(costs, combo))
        score = sum(s[i] for s, i in zip(scores, combo))
        if fits(cost, limit):
            found.append((score, cost, combo))
    return sorted(found)[:k]


@pytest.mark.parametrize("seed", range(12))
def test_equals_brute_force_on_small_spaces(seed):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 5))
    costs = [rng.uniform(1, 100, int(rng.integers(1, 7))).tolist() for _ in range(groups)]
    scores = [rng.uniform(0, 5, len(c)).tolist() for c in costs]
    fixed = float(rng.uniform(0, 20))
    low = fixed + sum(min(c) for c in costs)
    high = fixed + sum(max(c) for c in costs)
    for limit in np.linspace(low, high, 5):
        for k in (1, 3, 7):
            got = solve_top_k(costs, scores, float(limit), k, fixed, bins=int(rng.integers(8, 300)))
            want = brute_force(costs, scores, float(limit), k, fixed)
            assert [c.indices for c in got] == [w[2] for w in want]
            assert [c.score for c in got] == pytest.approx([w[0] for w in want])
            assert [c.cost for c in got] == pytest.approx([w[1] for w in want])


def test_integer_costs_at_the_budget_edge():
    costs = [[3, 5, 9], [2, 4], [1, 6, 7]]
    scores = [[3.0, 2.0, 1.0], [2.0, 1.0], [3.0, 2.0, 1.0]]
    for limit in range(6, 23):
        got = solve_top_k(costs, scores, limit, 4, bins=4)
        assert [c.indices for c in got] == [w[2] for w in brute_force(costs, scores, limit, 4)]
        assert all(c.cost <= limit for c in got)


def test_infeasible_budget_names_the_smallest_feasible():
    with pytest.raises(InfeasibleBudgetError, match=r"at least flops=16\b") as info:
        solve_top_k([[5, 7], [8, 9]], [[1, 2], [1, 2]], 15.5, fixed_cost=3, metric="flops")
    assert info.value.smallest == 16 and info.value.fixed == 3 and info.value.budget == 15.5
    assert len(solve_top_k([[5, 7], [8, 9]], [[1, 2], [1, 2]], 16, k=5, fixed_cost=3)) == 1


def test_bad_inputs():
    with pytest.raises(SearchError, match="top-k"):
        solve_top_k([[1]], [[1]], 5, k=0)
    with pytest.raises(SearchError, match="equal lengths"):
        solve_top_k([[1, 2]], [[1]], 5)
    with pytest.raises(SearchError, match="normalisation 'max'"):
        normalized_scores([1, 2], "max")


def test_normalisations():
    np.testing.assert_allclose(normalized_scores([1, 3], "mean"), [0.5, 1.5])
    np.testing.assert_allclose(normalized_scores([2, 3], "min"), [1, 1.5])
    np.testing.assert_allclose(normalized_scores([2, 3], "none"), [2, 3])


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("constrained")
    train(tiny_config(root), root / "lib")
    return rank_library(root / "lib", RankingSettings(latency_runs=1))


@pytest.mark.parametrize("metric", ["params", "flops", "latency_ms"])
def test_dna_search_respects_budgets(scores, metric):
    blocks = scores["blocks"]
    smallest = sum(min(e[metric] for e in b["paths"]) for b in blocks)
    largest = sum(max(e[metric] for e in b["paths"]) for b in blocks)
    for limit in (smallest, (smallest + largest) / 2, largest):
        archs = dna_search(scores, Budget(metric, limit), top_k=4)
        assert archs and all(a["cost"][metric] <= limit * (1 + 1e-9) for a in archs)
        assert [a["score"] for a in archs] == sorted(a["score"] for a in archs)
        assert all(set(a["sample"]) == {l for b in blocks for l in b["labels"]} for a in archs)
    best = dna_search(scores, Budget(metric, largest), top_k=1)[0]
    unconstrained = sum(min(normalized_scores([e["loss"] for e in b["paths"]])) for b in blocks if b["labels"])
    assert best["score"] == pytest.approx(unconstrained)


def test_dna_search_costs_add_the_head(scores):
    arch = dna_search(scores, Budget("params", 1e9), top_k=1)[0]
    chosen = [next(e for e in b["paths"] if all(arch["sample"][l] == e["path"][l] for l in b["labels"]))
              for b in scores["blocks"]]
    assert arch["cost"]["params"] == sum(e["params"] for e in chosen)
    assert chosen[-1]["path"] == {} and chosen[-1]["params"] > 0


def test_dna_search_infeasible(scores):
    head = scores["blocks"][-1]["paths"][0]["params"]
    smallest = sum(min(e["params"] for e in b["paths"]) for b in scores["blocks"])
    with pytest.raises(InfeasibleBudgetError, match=f"at least params={smallest}") as info:
        dna_search(scores, Budget("params", smallest - 1))
    assert info.value.fixed == head


def test_latency_needs_measured_scores(scores):
    stripped = {**scores, "blocks": [{**b, "paths": [{**e, "latency_ms": None} for e in b["paths"]]}
                                     for b in scores["blocks"]]}
    with pytest.raises(SearchError, match="latency_runs > 0"):
        dna_search(stripped, Budget("latency_ms", 100))
