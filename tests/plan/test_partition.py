import itertools
import random

import pytest

from nni_pipebd.plan.partition import balanced_boundaries, check_boundaries, greedy_assignment, stage_blocks


def brute_force(costs, stages):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        starts = [0, *cuts]
        worst = max(sum(costs[s:e]) for s, e in zip(starts, [*cuts, n]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("trial", range(30))
def test_balanced_is_optimal(trial):
    rng = random.Random(trial)
    n = rng.randint(1, 9)
    stages = rng.randint(1, n)
    costs = [rng.uniform(0.1, 10) for _ in range(n)]
    starts = balanced_boundaries(costs, stages)
    assert check_boundaries(starts, n, stages) == starts
    worst = max(sum(costs[r.start:r.stop]) for r in stage_blocks(starts, n))
    assert worst == pytest.approx(brute_force(costs, stages))


def test_boundary_errors():
    with pytest.raises(ValueError, match=r"cannot split 3 blocks into 4 pipeline stages"):
        balanced_boundaries([1, 1, 1], 4)
    with pytest.raises(ValueError, match=r"boundaries \[0, 2\] name 2 stages but there are 3 workers"):
        check_boundaries([0, 2], 5, 3)
    with pytest.raises(ValueError, match=r"boundaries \[1, 2\] must start at 0"):
        check_boundaries([1, 2], 5, 2)
    with pytest.raises(ValueError, match=r"boundaries \[0, 5\] must start at 0.*below the 5 blocks"):
        check_boundaries([0, 5], 5, 2)
    assert [list(r) for r in stage_blocks([0, 2, 3], 5)] == [[0, 1], [2], [3, 4]]


def test_greedy_assignment_packs_longest_first():
    assert greedy_assignment([5, 1, 4, 3, 3], 2) == [[0, 4], [1, 2, 3]]  # 5+3 vs 4+3+1
    bins = greedy_assignment([1.0] * 7, 3)
    assert sorted(i for b in bins for i in b) == list(range(7))
    with pytest.raises(ValueError, match="workers = 0"):
        greedy_assignment([1.0], 0)
