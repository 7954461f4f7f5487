"""Free student placement: the per-rank cost model, and the planner against brute force over every plan."""

import itertools
import math
import random

import pytest

from nni_pipebd.plan.plan import Phase, Placement, Plan, PlanError, Relay
from nni_pipebd.plan.placement import (ls_relay_plan, place, profiled_degrees, rank_memory, rank_times,
                                       step_time)
from nni_pipebd.plan.profiler import MB, BlockProfile, LinkModel, Profile
from nni_pipebd.plan.solver import InfeasibleMemoryError, solve, stage_memory, stage_time

from test_solver import random_profile


def linked_profile(rng, n, w, batch=32):
    """A random profile whose links cost something: feeding a student away from its teacher is not free."""
    profile = random_profile(rng, n, w, batch)
    profile.p2p = LinkModel(rng.uniform(0.0, 0.5), rng.uniform(0.0, 1e-4))
    for block in profile.blocks:
        block.activation_out_bytes = rng.randint(100, 10000)
    return profile


def every_plan(n, w, degrees, paths_per_step=1):
    """Every one-phase plan up to renaming ranks: links on consecutive ranks from 0, students on any ranks (split
    by batch, or by paths on 2..``paths_per_step`` devices)."""
    subsets = [(s, "batch") for h in degrees for s in itertools.combinations(range(w), h)]
    subsets += [(s, "paths") for s, _ in subsets if 1 < len(s) <= paths_per_step]
    for k in range(1, n + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            for gs in itertools.product(degrees, repeat=k):
                if sum(gs) > w:
                    continue
                relays, first = [], 0
                for s, e, g in zip([0, *cuts], [*cuts, n], gs):
                    relays.append(Relay(s, e, tuple(range(first, first + g))))
                    first += g
                for choice in itertools.product(subsets, repeat=n):
                    if len(set(range(first)).union(*(r for r, _ in choice))) == w:
                        yield Plan([Phase(tuple(relays), tuple(Placement(i, r, split)
                                                               for i, (r, split) in enumerate(choice)))])


def brute_force(profile, w, limit=math.inf, sync_bn=True):
    """(step, sum of rank times) of the best plan, and the least memory any plan needs."""
    best, least = (math.inf, math.inf), math.inf
    for plan in every_plan(len(profile.blocks), w, profiled_degrees(profile, w), profile.paths_per_step):
        memory = max(rank_memory(profile, plan))
        least = min(least, memory)
        if memory <= limit:
            times = rank_times(profile, plan, sync_bn)
            best = min(best, (max(times), sum(times)))
    return best, least


def small_case(seed, size=None):
    """Up to 4 blocks on up to 3 devices (at most 9 block-devices unless ``size`` = (blocks, devices) says)."""
    rng = random.Random(seed)
    n, w = size or (rng.randint(1, 4), rng.randint(1, 3))
    if size is None and n * w > 9:  # brute force of 4 blocks on 3 devices takes ~1.5 s: a few cases only
        n = 3
    return rng, n, w, linked_profile(rng, n, w)


@pytest.mark.parametrize("seed, size", [(s, None) for s in range(24)] + [(1000, (4, 3)), (1001, (4, 3))])
@pytest.mark.slow  # runs long (over a second here)
def test_place_is_optimal(seed, size):
    rng, n, w, profile = small_case(seed, size)
    sync_bn = seed % 2 == 0
    plan = place(profile, w, sync_bn=sync_bn, budget=None)
    plan.validate(n, w, profile.batch_size)
    (step, total), _ = brute_force(profile, w, sync_bn=sync_bn)
    assert plan.predicted["optimal"] is True and "bound_s" not in plan.predicted
    assert plan.predicted["step_s"] == pytest.approx(step, rel=1e-9)
    assert sum(plan.predicted["rank_s"]) == pytest.approx(total, rel=1e-9)
    assert plan.predicted["rank_s"] == rank_times(profile, plan, sync_bn)
    assert plan.predicted["rank_mb"] == rank_memory(profile, plan)


@pytest.mark.parametrize("seed", range(100, 106))
def test_place_respects_memory_limit_and_names_the_least(seed):
    rng, n, w, profile = small_case(seed)
    _, least = brute_force(profile, w)
    limit = least * rng.uniform(1.0, 1.3)
    plan = place(profile, w, memory_limit_mb=limit, budget=None)
    assert max(plan.predicted["rank_mb"]) <= limit
    assert plan.predicted["step_s"] == pytest.approx(brute_force(profile, w, limit)[0][0], rel=1e-9)
    with pytest.raises(InfeasibleMemoryError, match=f"smallest feasible limit is {least:.1f} MB"):
        place(profile, w, memory_limit_mb=least * 0.999, budget=None)


def test_pipeline_plans_cost_exactly_what_the_solver_predicts():
    for seed in range(10):
        rng = random.Random(200 + seed)
        n, w = rng.randint(1, 7), rng.randint(1, 5)
        profile = linked_profile(rng, n, w)
        plan = solve(profile, w, sync_bn=seed % 2 == 0)
        times, memory = rank_times(profile, plan, seed % 2 == 0), rank_memory(profile, plan)
        for k, stage in enumerate(plan.stages):
            for r in plan.ranks(k):
                assert times[r] == stage_time(profile, stage.start, stage.stop, stage.devices, seed % 2 == 0)
                assert memory[r] == stage_memory(profile, stage.start, stage.stop, stage.devices)
        assert step_time(profile, plan, seed % 2 == 0) == plan.predicted["step_s"]


def hand_profile():
    """Two blocks, up to two devices, numbers easy to follow."""
    blocks = [BlockProfile({1: 1.0, 2: 0.6}, {1: 4.0, 2: 2.5}, {1: 40.0, 2: 30.0}, 1000, 2e6, 3, 5.0, 2000),
              BlockProfile({1: 2.0, 2: 1.2}, {1: 6.0, 2: 3.5}, {1: 60.0, 2: 45.0}, 2000, 4e6, 2, 8.0, 500)]
    return Profile("k", "cpu", 8, 2, blocks, LinkModel(0.01, 1e-6), {2: LinkModel(0.02, 1e-8)})


def test_rank_costs_by_hand():
    profile = hand_profile()
    # the teacher chain on rank 0, block 0's student fed on both ranks, block 1's student co-located on rank 0
    plan = Plan([Phase((Relay(0, 2, (0,)),), (Placement(0, (0, 1)), Placement(1, (0,))))])
    allreduce = 0.02 + 2e6 * 1e-8 + 2 * 3 * 0.02  # gradients, then two latency all-reduces per BatchNorm layer
    feed = 0.01 + (1000 + 2000) * 4 * 1e-6  # input and target of block 0, 4 rows of 8
    send = 0.01 + (1000 + 2000) * 8 * 1e-6  # the link rank packs and sends all 8 rows of them
    times = rank_times(profile, plan)
    assert times[0] == pytest.approx(1.0 + send + (2.0 + 6.0) + 2.5 + allreduce + feed)
    assert times[1] == pytest.approx(2.5 + allreduce + feed)
    io = (1000 + 2000) * 8 / MB  # block 0's teacher input and output rows, held on the link
    buffers = 3 * (1000 + 2000) * 4 / MB  # queue_depth + 1 receive buffers of the fed student
    memory = rank_memory(profile, plan)
    assert memory[0] == pytest.approx(5.0 + io + 60.0 + (30.0 - 5.0) + buffers)
    assert memory[1] == pytest.approx(30.0 - 5.0 + buffers)
    # a second link receives its input; a student-only rank needs no link
    split = Plan([Phase((Relay(0, 1, (0,)), Relay(1, 2, (1,))), (Placement(0, (0,)), Placement(1, (1,))))])
    assert rank_times(profile, split, sync_bn=False) == pytest.approx([1.0 + 4.0, 2.0 + 6.0 + 0.01 + 2000 * 8e-6])


def test_cost_model_refuses_what_it_cannot_predict():
    profile = hand_profile()
    phase = Phase((Relay(0, 2, (0,)),), (Placement(0, (0,)), Placement(1, (1,))))
    with pytest.raises(PlanError, match="one-phase plans; this plan has 2 phases"):
        rank_times(profile, Plan([phase, phase]))
    with pytest.raises(PlanError, match="splits its paths over 2 devices but the profile was measured at "
                                        "paths_per_step = 1"):
        rank_times(profile, Plan([Phase(phase.relays, (Placement(0, (0,)), Placement(1, (0, 1), "paths")))]))
    with pytest.raises(PlanError, match=r"runs on 3 devices but the profile has degrees \[1, 2\]"):
        rank_memory(profile, Plan([Phase((Relay(0, 2, (0, 1, 2)),), (Placement(0, (0,)), Placement(1, (0,))))]))


def test_path_split_costs_by_hand():
    """Each of h ranks runs ceil(k / h) of the k profiled paths on the whole batch, then one all-reduce of every
    parameter's gradient (param_bytes, not the sampled paths' grad_bytes) and no BatchNorm all-reduces."""
    profile = hand_profile()
    profile.paths_per_step = 3
    profile.blocks[0].param_bytes = 5e6
    fed = Plan([Phase((Relay(0, 2, (0,)),), (Placement(0, (0, 1), "paths"), Placement(1, (0,))))])
    paths = 4.0 * 2 / 3 + (0.02 + 5e6 * 1e-8)  # 2 of 3 paths on rank 0 (the most loaded), the all-reduce
    feed = 0.01 + (1000 + 2000) * 8 * 1e-6  # every row of block 0's input and target
    times = rank_times(profile, fed)
    assert times[0] == pytest.approx(1.0 + feed + (2.0 + 6.0) + paths + feed)  # the link sends them too
    assert times[1] == pytest.approx(paths + feed)
    buffers = 3 * (1000 + 2000) * 8 / MB  # receive buffers of all 8 rows
    assert rank_memory(profile, fed)[1] == pytest.approx(40.0 - 5.0 + buffers)  # one path's whole-batch memory
    # on its own link's two ranks: the link keeps the teacher and its rows, each rank receives the whole batch
    own = Plan([Phase((Relay(0, 2, (0, 1)),), (Placement(0, (0, 1), "paths"), Placement(1, (0, 1))))])
    block_1 = 3.5 + 0.02 + 4e6 * 1e-8 + 2 * 2 * 0.02  # batch split: gradients and BatchNorm all-reduces
    send = 0.01 + (1000 + 2000) * 4 * 1e-6  # each link rank packs and sends its 4 rows
    assert rank_times(profile, own) == pytest.approx([0.6 + send + 1.2 + block_1 + paths + feed] * 2)
    io = (1000 + 2000) * 4 / MB
    assert rank_memory(profile, own) == pytest.approx([5.0 + io + 45.0 + 40.0 - 5.0 + buffers] * 2)
    profile.blocks[0].param_bytes = None  # older profiles: the sampled paths' gradient bytes
    assert rank_times(profile, fed)[1] == pytest.approx(4.0 * 2 / 3 + 0.02 + 2e6 * 1e-8 + feed)


def bn_bound_profile(paths_per_step):
    """One block whose batch split pays many BatchNorm all-reduces (2 x 10 x 0.1 s): splitting its 2 paths costs
    only the gradient all-reduce."""
    block = BlockProfile({1: 0.1, 2: 0.1}, {1: 10.0, 2: 5.0}, {1: 50.0, 2: 30.0}, 100, 1e3, 10, 1.0, 100,
                         2e3)
    return Profile("k", "cpu", 8, 2, [block], LinkModel(0.0, 0.0), {2: LinkModel(0.1, 0.0)},
                   paths_per_step=paths_per_step)


def test_place_splits_paths_where_batchnorm_syncs_cost_more():
    plan = place(bn_bound_profile(2), 2, budget=None)
    plan.validate(1, 2, 8, paths_per_step=2)
    (student,) = plan.phases[0].students
    assert student.split == "paths" and len(student.ranks) == 2
    assert plan.predicted["step_s"] == pytest.approx(0.1 + 10.0 / 2 + 0.1)  # teacher on one rank, half the paths
    assert plan.predicted["rank_s"] == rank_times(bn_bound_profile(2), plan)
    assert "P" in plan.grid()
    batch = place(bn_bound_profile(1), 2, budget=None)  # one path a step: only the batch can be split
    (student,) = batch.phases[0].students
    assert student.split == "batch" and len(student.ranks) == 2
    assert batch.predicted["step_s"] == pytest.approx(0.1 + 5.0 + 0.1 + 2 * 10 * 0.1)
    assert place(bn_bound_profile(2), 2, sync_bn=False, budget=None).phases[0].students[0].split == "batch"
    # under a memory limit only where it needs no more memory (here the whole batch's activations: more)
    limited = place(bn_bound_profile(2), 2, memory_limit_mb=1000.0, budget=None)
    assert limited.phases[0].students[0].split == "batch" and limited.predicted["optimal"]


@pytest.mark.parametrize("seed", range(8))
def test_place_with_path_splits_is_optimal(seed):
    """Brute force over every plan with either split of every multi-device student (cheap feeds, dear all-reduces:
    these seeds' plans mix path splits, batch splits and single devices)."""
    rng = random.Random(500 + seed)
    n, w = rng.randint(1, 3), rng.randint(2, 3)
    profile = linked_profile(rng, n, w)
    profile.paths_per_step = rng.choice([2, 3])
    profile.p2p = LinkModel(rng.uniform(0.0, 0.05), 1e-6)
    profile.allreduce = {2: LinkModel(rng.uniform(0.0, 0.2), 1e-7)}
    for block in profile.blocks:
        block.param_bytes = block.grad_bytes * rng.uniform(1.0, 4.0)
    sync_bn = seed % 2 == 0
    plan = place(profile, w, sync_bn=sync_bn, budget=None)
    plan.validate(n, w, profile.batch_size, profile.paths_per_step)
    (step, total), _ = brute_force(profile, w, sync_bn=sync_bn)
    assert plan.predicted["step_s"] == pytest.approx(step, rel=1e-9)
    assert sum(plan.predicted["rank_s"]) == pytest.approx(total, rel=1e-9)
    assert plan.predicted["rank_s"] == rank_times(profile, plan, sync_bn)


def dominant_profile():
    """Three blocks on three devices; block 1's student is as big as all the rest and splits perfectly, no
    teacher block gets faster on more devices, links are free."""
    def block(student):
        return BlockProfile({g: 2.0 for g in (1, 2, 3)}, {g: student(g) for g in (1, 2, 3)},
                            {g: 10.0 for g in (1, 2, 3)}, 100, 0.0, 0, 1.0)

    return Profile("k", "cpu", 12, 3, [block(lambda g: 1.0), block(lambda g: 12.0 / g), block(lambda g: 1.0)])


def test_a_dominant_block_is_split_without_its_teacher():
    """Pipe-BD/AHD must run block 1's teacher wherever its student trains: splitting the student over g
    devices repeats the teacher block's 2 s on each (it does not scale), so AHD's best is 11 s (block 0 alone,
    blocks 1-2 on two devices: 2 + 2 + 6 + 1). Free placement runs the teacher chain once, on one device
    (6 s, plus block 2's student: 7 s), and splits only block 1's student over the other two (1 + 6 s, 6 s)."""
    profile = dominant_profile()
    ahd = solve(profile, 3)
    assert ahd.predicted["step_s"] == pytest.approx(11.0)
    plan = place(profile, 3, budget=None)
    assert plan.predicted["step_s"] == pytest.approx(7.0) and plan.predicted["optimal"]
    phase = plan.phases[0]
    assert not plan.is_pipeline and len(phase.relays) == 1 and len(phase.relays[0].ranks) == 1
    big = next(p for p in phase.students if p.block == 1)
    assert len(big.ranks) == 2 and phase.relays[0].ranks[0] not in big.ranks
    grid = plan.grid()
    assert "T" in grid and "S" in grid and "7000.0" in grid


@pytest.mark.parametrize("seed", range(6))
def test_place_is_never_slower_than_ahd_or_ls(seed):
    rng = random.Random(300 + seed)
    n, w = rng.randint(4, 8), rng.randint(2, 4)
    profile = linked_profile(rng, n, w)
    plan = place(profile, w, budget=2000)
    plan.validate(n, w, profile.batch_size)
    assert plan.predicted["step_s"] <= solve(profile, w).predicted["step_s"]
    assert plan.predicted["step_s"] <= step_time(profile, ls_relay_plan(profile, w))
    if not plan.predicted["optimal"]:
        assert plan.predicted["bound_s"] <= plan.predicted["step_s"]


def test_a_pipeline_result_is_pipe_bd_stages():
    """Where co-locating everything is best, the plan is exactly Pipe-BD's stages (which every runtime runs)."""
    profile = dominant_profile()
    for block in profile.blocks:  # feeding a student elsewhere now costs more than any gain
        block.activation_out_bytes = block.activation_in_bytes
    profile.p2p = LinkModel(100.0, 0.0)
    plan, ahd = place(profile, 3, budget=None), solve(profile, 3)
    assert plan.is_pipeline and plan == ahd and plan.to_dict()["stages"] == ahd.to_dict()["stages"]
    assert plan.predicted["step_s"] == ahd.predicted["step_s"]
    assert plan.predicted["stage_s"] == ahd.predicted["stage_s"]
    assert plan.predicted["stage_mb"] == ahd.predicted["stage_mb"]
    assert "#" in plan.grid()


def test_place_errors_name_the_values():
    profile = hand_profile()
    with pytest.raises(PlanError, match="workers = 0 must be an int >= 1"):
        place(profile, 0)
    with pytest.raises(PlanError, match="budget = 0 must be an int >= 1"):
        place(profile, 2, budget=0)
    with pytest.raises(PlanError, match="memory_limit_mb = -1 must be > 0"):
        place(profile, 2, memory_limit_mb=-1)
    single = Profile("k", "cpu", 8, 1, [hand_profile().blocks[0]])
    for table in ("teacher_s", "student_s", "memory_mb"):
        del getattr(single.blocks[0], table)[2]
    with pytest.raises(PlanError, match=r"no plan uses exactly 3 workers for 1 blocks with \[1\] devices"):
        place(single, 3)


def test_old_profiles_load_and_guess_the_output_size():
    raw = hand_profile().to_dict()
    for block in raw["blocks"]:
        del block["activation_out_bytes"]
    profile = Profile.from_dict(raw)
    assert [b.activation_out_bytes for b in profile.blocks] == [None, None]
    assert [profile.out_bytes(i) for i in range(2)] == [2000, 2000]  # the next block's input; the last: its own
    assert hand_profile().out_bytes(1) == 500


def test_a_spent_budget_returns_the_best_found_and_a_bound():
    profile = linked_profile(random.Random(7), 9, 4)
    plan = place(profile, 4, budget=300)
    plan.validate(9, 4, profile.batch_size)
    assert plan.predicted["optimal"] is False
    assert 0 < plan.predicted["bound_s"] <= plan.predicted["step_s"] <= solve(profile, 4).predicted["step_s"]
