"""DONNA: linear predictor on per-block NSRs, non-dominated sorting, NSGA-II front, the search on a library."""

import itertools

import numpy as np
import pytest

from conftest import tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.search.costs import Budget
from nni_pipebd.search.donna import (AccuracyPredictor, architecture_features, crowding_distance, donna_search,
                                     fit_predictor, load_predictor, non_dominated_sort, nsga2, predictor_from_results,
                                     sample_architectures)
from nni_pipebd.search.errors import InfeasibleBudgetError, SearchError
from nni_pipebd.search.finetune import FinetuneSettings
from nni_pipebd.search.ranking import RankingSettings, rank_library

RANKING = RankingSettings(latency_runs=1)


def test_predictor_recovers_a_linear_law():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, (30, 4))
    coef = np.array([-0.2, -0.05, -0.1, 0.0])
    y = 0.95 + x @ coef
    predictor = AccuracyPredictor().fit(x, y)
    np.testing.assert_allclose(predictor.coef, coef, atol=1e-10)
    assert predictor.intercept == pytest.approx(0.95)
    noisy = y + rng.normal(0, 0.01, len(y))
    fitted = AccuracyPredictor().fit(x, noisy)
    np.testing.assert_allclose(fitted.coef, coef, atol=0.03)
    np.testing.assert_allclose(AccuracyPredictor().fit(x, y).leave_one_out(x, y), y, atol=1e-10)
    ridge = AccuracyPredictor(alpha=10.0).fit(x, y)
    assert np.abs(ridge.coef).sum() < np.abs(coef).sum()
    restored = AccuracyPredictor.from_dict(predictor.to_dict())
    np.testing.assert_allclose(restored.predict(x), predictor.predict(x))


def test_predictor_errors():
    with pytest.raises(SearchError, match="n >= 2"):
        AccuracyPredictor().fit(np.ones((1, 3)), np.ones(1))
    with pytest.raises(RuntimeError, match="not fitted"):
        AccuracyPredictor().predict(np.ones((1, 3)))
    with pytest.raises(SearchError, match="expects"):
        AccuracyPredictor().fit(np.ones((3, 2)), np.arange(3.0)).predict(np.ones((1, 3)))


def _brute_front(f):
    return {i for i in range(len(f)) if not any((f[j] <= f[i]).all() and (f[j] < f[i]).any() for j in range(len(f)))}


@pytest.mark.parametrize("seed", range(4))
def test_non_dominated_sort_matches_brute_force(seed):
    f = np.random.default_rng(seed).integers(0, 6, (40, 2)).astype(float)  # many ties
    fronts = non_dominated_sort(f)
    assert sorted(np.concatenate(fronts).tolist()) == list(range(40))
    remaining = np.arange(40)
    for front in fronts:
        assert set(front.tolist()) == {remaining[i] for i in _brute_front(f[remaining])}
        remaining = np.setdiff1d(remaining, front)


def test_crowding_distance():
    d = crowding_distance(np.array([[0.0, 4.0], [1.0, 2.0], [3.0, 1.0], [4.0, 0.0]]))
    assert np.isinf(d[0]) and np.isinf(d[3])
    np.testing.assert_allclose(d[1:3], [3 / 4 + 3 / 4, 3 / 4 + 2 / 4])


def _toy_problem(seed, genes, options):
    rng = np.random.default_rng(seed)
    quality = rng.uniform(0, 1, (genes, options))
    cost = rng.uniform(1, 10, (genes, options))

    def evaluate(g):
        idx = np.arange(genes)
        return np.stack([quality[idx, g].sum(1), cost[idx, g].sum(1)], axis=1)

    return evaluate


def test_nsga2_finds_the_exact_front_of_a_small_space():
    evaluate = _toy_problem(0, 3, 4)
    everything = np.array(list(itertools.product(range(4), repeat=3)))
    true = {tuple(everything[i]) for i in _brute_front(evaluate(everything))}
    genomes, objectives, feasible = nsga2([4] * 3, evaluate, population=12, generations=15, seed=1)
    assert feasible.all()
    found = {tuple(genomes[i]) for i in non_dominated_sort(objectives)[0]}
    assert found == true


def test_nsga2_approaches_the_front_of_a_larger_space():
    genes, options = 6, 5
    evaluate = _toy_problem(3, genes, options)
    everything = np.array(list(itertools.product(range(options), repeat=genes)))
    all_f = evaluate(everything)
    true_front = all_f[sorted(_brute_front_fast(all_f))]
    genomes, objectives, _ = nsga2([options] * genes, evaluate, population=32, generations=40, seed=0)
    found = objectives[non_dominated_sort(objectives)[0]]
    ref = all_f.max(0) + 1
    assert _hypervolume(found, ref) >= 0.97 * _hypervolume(true_front, ref)
    assert len(genomes) < len(everything) / 5  # it searched, it did not enumerate


def _brute_front_fast(f):
    order = np.lexsort((f[:, 1], f[:, 0]))
    front, best = [], np.inf
    for i in order:
        if f[i, 1] < best:
            front.append(i)
            best = f[i, 1]
    return front


def _hypervolume(points, ref):
    pts = points[np.argsort(points[:, 0])]
    volume, last_y = 0.0, ref[1]
    for x, y in pts:
        if y < last_y:
            volume += (ref[0] - x) * (last_y - y)
            last_y = y
    return volume


def test_nsga2_constraint_keeps_feasible_points_only_on_the_front():
    evaluate = _toy_problem(0, 3, 4)
    limit = 15.0
    genomes, objectives, feasible = nsga2([4] * 3, evaluate, lambda g: np.maximum(evaluate(g)[:, 1] - limit, 0),
                                          population=12, generations=15, seed=1)
    assert (objectives[feasible, 1] <= limit).all() and (objectives[~feasible, 1] > limit).all()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("donna")
    train(tiny_config(root), root / "lib")
    return root / "lib"


def test_donna_search_on_a_library(library):
    scores = rank_library(library, RANKING)
    samples = sample_architectures(scores, 10, seed=0)
    assert len({tuple(sorted(s.items())) for s in samples}) == 10
    features = architecture_features(scores, samples)
    assert features.shape == (10, 4)
    accuracy = 0.9 - 0.1 * features.sum(1)  # a synthetic truth the predictor can learn
    fitted = predictor_from_results(scores, samples, accuracy)
    assert fitted["r2"] == pytest.approx(1.0) and fitted["loo_mae"] < 1e-8
    predictor = AccuracyPredictor.from_dict(fitted["predictor"])
    params = [[e["params"] for e in b["paths"]] for b in scores["blocks"]]
    limit = sum(min(p) for p in params) + 0.5 * (sum(max(p) for p in params) - sum(min(p) for p in params))
    front = donna_search(scores, predictor, Budget("params", limit), population=16, generations=20)
    assert front and all(a["cost"]["params"] <= limit for a in front)
    accs = [a["predicted_accuracy"] for a in front]
    costs = [a["cost"]["params"] for a in front]
    assert accs == sorted(accs, reverse=True) and costs == sorted(costs, reverse=True)  # a trade-off curve
    for a in front:
        assert a["predicted_accuracy"] == pytest.approx(0.9 - 0.1 * sum(a["block_nsr"].values()))
    # the most accurate point is the exact best under the budget (checked by enumeration)
    everything = itertools.product(*(b["paths"] for b in scores["blocks"]))
    best = max(0.9 - 0.1 * sum(e["nsr"] for e in combo[:-1]) for combo in everything
               if sum(e["params"] for e in combo) <= limit)
    assert accs[0] == pytest.approx(best)
    assert len(donna_search(scores, predictor, Budget("params", limit), top_k=1, population=16,
                            generations=20)) == 1
    with pytest.raises(InfeasibleBudgetError, match="raise the budget to at least params="):
        donna_search(scores, predictor, Budget("params", 10))


@pytest.mark.slow  # runs long (over a second here)
def test_fit_predictor_finetunes_and_caches(library):
    settings = FinetuneSettings(epochs=1, max_steps_per_epoch=1)
    data = fit_predictor(library, 3, settings, ranking=RANKING)
    assert len(data["archs"]) == 3 and all(0 <= a["val_accuracy"] <= 1 for a in data["archs"])
    assert load_predictor(library) == data
    assert fit_predictor(library, 3, settings, ranking=RANKING)["time_s"] == data["time_s"]  # reused
    assert fit_predictor(library, 2, settings, ranking=RANKING)["settings"]["num_archs"] == 2


def test_unscored_paths_are_named(library):
    scores = rank_library(library, RankingSettings(max_paths=2, latency_runs=0))
    sample = {}
    for b in scores["blocks"]:
        sample.update(b["paths"][0]["path"])
    block = scores["blocks"][1]
    assert not block["exhaustive"]
    scored = {tuple(e["path"][l] for l in block["labels"]) for e in block["paths"]}
    unscored = next(p for p in itertools.product(["k3e2", "k5e2"], repeat=2) if p not in scored)
    sample.update(dict(zip(block["labels"], unscored)))
    with pytest.raises(SearchError, match="block 1: path .* was not scored .*larger max_paths"):
        architecture_features(scores, [sample])
    with pytest.raises(SearchError, match="holds only 16"):
        sample_architectures(scores, 17)
