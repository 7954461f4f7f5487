import itertools
import math
import random

import pytest

from nni_pipebd.plan.plan import Plan, PlanError, Stage, shard_ranges, transfers
from nni_pipebd.plan.profiler import BlockProfile, LinkModel, Profile
from nni_pipebd.plan.solver import (InfeasibleMemoryError, smallest_memory_limit, solve, stage_memory,
                                    stage_time)


def random_profile(rng, n, w, batch=32):
    blocks = []
    for _ in range(n):
        t, s, m = rng.uniform(0.1, 5), rng.uniform(0.5, 20), rng.uniform(10, 100)
        speedup = {g: rng.uniform(0.6, 1.0) * g for g in range(1, w + 1)}  # sub-linear scaling
        speedup[1] = 1.0
        blocks.append(BlockProfile(
            {g: t / speedup[g] for g in speedup}, {g: s / speedup[g] for g in speedup},
            {g: m * (0.5 + 0.5 / g) for g in speedup}, rng.randint(100, 10000), rng.uniform(1e3, 1e6),
            rng.randint(0, 10), m / 4))
    return Profile("k", "cpu", batch, w, blocks, LinkModel(1e-4, 1e-9), {2: LinkModel(2e-4, 2e-9)})


def compositions(n, w):
    """Every plan: contiguous stages with devices summing to w."""
    for k in range(1, min(n, w) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            starts = [0, *cuts]
            ends = [*cuts, n]
            for degrees in itertools.product(range(1, w + 1), repeat=k):
                if sum(degrees) == w:
                    yield [Stage(s, e, g) for s, e, g in zip(starts, ends, degrees)]


def brute_force(profile, w, limit=math.inf):
    best = math.inf
    for stages in compositions(len(profile.blocks), w):
        if any(stage_memory(profile, s.start, s.stop, s.devices) > limit for s in stages):
            continue
        best = min(best, max(stage_time(profile, s.start, s.stop, s.devices) for s in stages))
    return best


@pytest.mark.parametrize("trial", range(25))
def test_solver_is_optimal(trial):
    rng = random.Random(trial)
    n, w = rng.randint(1, 8), rng.randint(1, 6)
    profile = random_profile(rng, n, w)
    plan = solve(profile, w)
    assert plan.workers == w
    plan.validate(n, w, profile.batch_size)
    assert plan.predicted["step_s"] == pytest.approx(brute_force(profile, w))
    assert plan.predicted["step_s"] == pytest.approx(max(plan.predicted["stage_s"]))


@pytest.mark.parametrize("trial", range(10))
def test_solver_respects_memory_limit(trial):
    rng = random.Random(100 + trial)
    n, w = rng.randint(2, 6), rng.randint(2, 5)
    profile = random_profile(rng, n, w)
    least = smallest_memory_limit(profile, w)
    limit = least * rng.uniform(1.0, 1.5)
    plan = solve(profile, w, memory_limit_mb=limit)
    assert max(plan.predicted["stage_mb"]) <= limit + 1e-9
    assert plan.predicted["step_s"] == pytest.approx(brute_force(profile, w, limit))
    with pytest.raises(InfeasibleMemoryError, match=f"smallest feasible limit is {least:.1f} MB"):
        solve(profile, w, memory_limit_mb=least * 0.99)


def test_solver_picks_hybrid_for_a_heavy_block():
    rng = random.Random(0)
    profile = random_profile(rng, 4, 4)
    for g in range(1, 5):  # block 0 costs 3 and scales perfectly; blocks 1-3 cost 0.5 and do not scale
        for i, b in enumerate(profile.blocks):
            b.teacher_s[g] = 3.0 / g if i == 0 else 0.5
            b.student_s[g] = 0.0
    profile.p2p, profile.allreduce = LinkModel(), {2: LinkModel()}
    plan = solve(profile, 4)
    assert plan.predicted["step_s"] == pytest.approx(1.5)  # pure pipeline: 3.0; pure data parallel: 4.5
    assert (plan.stages[0].start, plan.stages[0].stop) == (0, 1) and plan.stages[0].devices >= 2
    assert "#" in plan.grid()


def test_plan_round_trip_and_validation(tmp_path):
    plan = Plan([Stage(0, 2, 2), Stage(2, 5, 1)], {"stage_s": [0.1, 0.2], "stage_mb": [1.0, 2.0], "step_s": 0.2})
    again = Plan.load(plan.save(tmp_path / "p.json"))
    assert again == plan
    assert again.locate(1) == (0, 1) and again.locate(2) == (1, 0) and again.ranks(1) == [2]
    with pytest.raises(PlanError, match=r"rank\(s\) \[3\] nothing to do but 4 workers"):
        plan.validate(5, 4, 8)
    with pytest.raises(PlanError, match=r"no student for blocks \[5\] of 6"):
        plan.validate(6, 3, 8)
    with pytest.raises(PlanError, match="link 1 covers blocks 3..4"):
        Plan([Stage(0, 2), Stage(3, 5)]).validate(5, 2, 8)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{\"stages\": 3}")
    with pytest.raises(PlanError, match="needs 'stages'"):
        Plan.load(tmp_path / "bad.json")


def test_transfers_cover_every_row_once():
    for batch, a, b in [(8, 1, 3), (8, 3, 2), (7, 2, 3), (32, 4, 4)]:
        moves = transfers(batch, a, b)
        rows = sorted(r for _, _, lo, hi in moves for r in range(lo, hi))
        assert rows == list(range(batch))
        for i, j, lo, hi in moves:
            assert shard_ranges(batch, a)[i][0] <= lo < hi <= shard_ranges(batch, a)[i][1]
            assert shard_ranges(batch, b)[j][0] <= lo < hi <= shard_ranges(batch, b)[j][1]
