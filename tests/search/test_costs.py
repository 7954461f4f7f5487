"""Budgets and per-path costs."""

import pytest
import torch

from nni_pipebd.search.costs import Budget, count_params, measure_latency_ms, module_costs, parse_budget, path_params
from nni_pipebd.search.errors import BudgetError
from nni_pipebd.spaces.dna import BlockGeometry, DnaBlock
from nni_pipebd.spaces.supernet import BlockSupernet


@pytest.mark.parametrize("text, metric, limit", [
    ("params=2.5M", "params", 2.5e6), ("flops=3e7", "flops", 3e7), ("latency_ms=4", "latency_ms", 4.0),
    (" params = 1200 ", "params", 1200.0), ("flops=12k", "flops", 12e3), ("params=1G", "params", 1e9),
])
def test_parse_budget(text, metric, limit):
    assert parse_budget(text) == Budget(metric, limit)


@pytest.mark.parametrize("text, match", [
    ("params:5", "is not METRIC=VALUE"), ("params=5=6", "is not METRIC=VALUE"),
    ("speed=3", "unknown metric 'speed'"), ("params=-1", "not a non-negative number"),
    ("params=abc", "not a non-negative number"), ("params=5X", "not a non-negative number"),
])
def test_bad_budget_names_the_text_and_the_valid_metrics(text, match):
    with pytest.raises(BudgetError, match=match) as info:
        parse_budget(text)
    assert repr(text) in str(info.value)
    assert "['params', 'flops', 'latency_ms']" in str(info.value)


def test_budget_fits_is_inclusive_and_rejects_bad_values():
    budget = Budget("params", 100)
    assert budget.fits(100) and not budget.fits(100.001)
    with pytest.raises(BudgetError, match="unknown budget metric"):
        Budget("macs", 1)
    with pytest.raises(BudgetError, match=">= 0"):
        Budget("params", float("nan"))


def test_path_costs_equal_the_frozen_module():
    block = BlockSupernet(DnaBlock(0, BlockGeometry(4, 8, 2, 2), kernels=(3, 5), expansions=(2, 4)), 0)
    path = {"s0_i0": "k5e4", "s0_i1": "k3e2"}
    block.set_path(path)
    frozen = block.freeze(path)
    assert path_params(block) == count_params(frozen) < count_params(block)
    costs = module_costs(block, (4, 8, 8), latency_runs=2)
    assert costs["params"] == count_params(frozen)
    assert costs["flops"] == module_costs(frozen, (4, 8, 8), latency_runs=0)["flops"] > 0
    assert costs["latency_ms"] > 0
    assert module_costs(block, (4, 8, 8), latency_runs=0)["latency_ms"] is None


def test_latency_restores_the_thread_count():
    before = torch.get_num_threads()
    assert measure_latency_ms(torch.nn.Conv2d(3, 3, 3), (3, 8, 8), runs=2, threads=1) > 0
    assert torch.get_num_threads() == before
