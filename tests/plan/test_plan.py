"""The plan as data: validation, files (old stage format too), and the routes every rank derives from it."""

import random

import pytest

from nni_pipebd.plan.plan import Phase, Placement, Plan, PlanError, Relay, Stage


def free_plan():
    # teacher 0-2 on rank 0, 3-4 on rank 1; students anywhere, block 3 split over ranks 1 and 2
    return Plan([Phase((Relay(0, 3, (0,)), Relay(3, 5, (1,))),
                       (Placement(0, (0,)), Placement(1, (1,)), Placement(2, (2,)), Placement(3, (1, 2)),
                        Placement(4, (0,))))])


def test_stage_plans_keep_their_file_format_and_meaning(tmp_path):
    plan = Plan([Stage(0, 2, 2), Stage(2, 5, 1)])
    assert plan.to_dict()["stages"] == [{"start": 0, "stop": 2, "devices": 2}, {"start": 2, "stop": 5, "devices": 1}]
    phase = plan.phases[0]
    assert phase.relays == (Relay(0, 2, (0, 1)), Relay(2, 5, (2,)))
    assert [(p.block, p.ranks) for p in phase.students] == [(0, (0, 1)), (1, (0, 1)), (2, (2,)), (3, (2,)), (4, (2,))]
    assert plan.is_pipeline and plan.resumable and plan.stages == [Stage(0, 2, 2), Stage(2, 5, 1)]


def test_free_plan_round_trip_and_grid(tmp_path):
    plan = free_plan().validate(5, 3, 8)
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and "phases" in again.to_dict()
    assert not plan.is_pipeline and plan.resumable
    with pytest.raises(PlanError, match="not a pipeline"):
        plan.stages
    rows = plan.grid().splitlines()
    assert rows[1].split()[2:7] == ["TS", "T", "T", ".", "S"]   # rank 0
    assert rows[3].split()[2:7] == [".", ".", "S", "S", "."]    # rank 2: students only


@pytest.mark.parametrize("plan, message", [
    (Plan([Phase((Relay(0, 2, (0,)), Relay(3, 5, (1,))), tuple(Placement(i, (0,)) for i in range(5)))]),
     "link 1 covers blocks 3..4, expected to start at block 2"),
    (Plan([Phase((Relay(0, 5, (0,)),), tuple(Placement(i, (0,)) for i in range(4)))]), r"no student for blocks \[4\]"),
    (Plan([Phase((Relay(0, 5, (0,)),), tuple(Placement(i % 5, (0,)) for i in range(6)))]), "block 0 is trained twice"),
    (Plan([Phase((Relay(0, 2, (0,)), Relay(2, 5, (0,))), tuple(Placement(i, (0,)) for i in range(5)))]),
     r"rank\(s\) \[0\] serve two relay links"),
    (Plan([Phase((Relay(0, 5, (0,)),), tuple(Placement(i, (0,)) for i in range(5)))]),
     r"rank\(s\) \[1\] nothing to do"),
    (Plan([Phase((Relay(0, 5, (0, 1)),), tuple(Placement(i, (0, 1), "rows") for i in range(5)))]),
     "split 'rows' is not one of"),
    (Plan([Phase((Relay(0, 5, (0, 1)),), tuple(Placement(i, (0, 1), "paths") for i in range(5)))]),
     "2 devices but the distill.paths_per_step is 1"),
])
def test_invalid_plans_say_what_is_wrong(plan, message):
    with pytest.raises(PlanError, match=message):
        plan.validate(5, 2, 8)


def test_a_student_needs_its_teacher_block_in_the_phase():
    plan = Plan([Phase((Relay(0, 2, (0,)),), (Placement(0, (0,)), Placement(3, (0,)))),
                 Phase((Relay(0, 5, (0,)),), (Placement(1, (0,)), Placement(2, (0,)), Placement(4, (0,))))])
    with pytest.raises(PlanError, match="student block 3 has no teacher block before it"):
        plan.validate(5, 1, 8)


def random_phase(rng, n, w):
    cuts = sorted(rng.sample(range(1, n), rng.randint(0, min(n, w) - 1)))
    starts, stops = [0, *cuts], [*cuts, n]
    free = list(range(w))
    rng.shuffle(free)
    relays = []
    for k, (a, b) in enumerate(zip(starts, stops)):
        left = len(free) - (len(starts) - k - 1)
        take = rng.randint(1, left)
        relays.append(Relay(a, b, tuple(free[:take])))
        free = free[take:]
    students = tuple(Placement(i, tuple(rng.sample(range(w), rng.randint(1, w)))) for i in range(n))
    return Phase(tuple(relays), students)


@pytest.mark.parametrize("trial", range(40))
def test_routes_match_between_ranks_and_cover_every_row(trial):
    """Whatever one rank sends, its peer expects (same rows); every rank gets every row it computes on."""
    rng = random.Random(trial)
    n, w, batch = rng.randint(1, 5), rng.randint(1, 4), rng.choice([4, 7, 8])
    phase = random_phase(rng, n, w)
    plan = Plan([phase])
    routes = {r: plan.routes(phase, r, batch) for r in range(w)}
    sent = {(src, dst, a, b) for src in routes for dst, a, b in routes[src].relay_out}
    got = {(src, dst, a, b) for dst in routes for src, a, b in routes[dst].relay_in}
    assert sent == got
    for r, route in routes.items():
        if route.relay not in (None, 0):
            assert sorted(x for _, a, b in route.relay_in for x in range(a, b)) == list(range(*route.rows))
    feeds_sent = {(blk, src, dst, a, b) for src in routes for blk, dst, a, b in routes[src].feeds_out}
    feeds_got = set()
    for dst, route in routes.items():
        for placement in route.students:
            lo, hi = placement.rows(batch, dst)
            sources = route.feeds_in[placement.block]
            if sources is None:  # co-located: its own link rows are exactly the block's rows
                relay = phase.relay_of(placement.block)
                assert placement.ranks == relay.ranks and route.rows == (lo, hi)
                continue
            assert sorted(x for _, a, b in sources for x in range(a, b)) == list(range(lo, hi))
            feeds_got.update((placement.block, src, dst, a, b) for src, a, b in sources if src != dst)
    assert feeds_sent == feeds_got
    # the stop decision reaches every loading rank that sends, or does not share a group with the leader
    first = phase.relays[0].ranks
    told = {r for r in routes if routes[r].flag_from is not None}
    assert told == set(routes[phase.leader].flag_to) and told <= set(first[1:])
    # a late block (trained one step late) is a single-rank student of a link rank fed from a later link, and that
    # rank learns the stop decision before its students: from its relay input, an explicit flag, or as the leader
    for r, route in routes.items():
        for block in route.late:
            assert route.relay is not None and phase.relays.index(phase.relay_of(block)) > route.relay
            assert [p.ranks for p in route.students if p.block == block] == [(r,)]
            assert route.relay > 0 or r in told or r == phase.leader


def test_students_fed_from_a_later_link_train_late():
    plan = free_plan()
    phase = plan.phases[0]
    # rank 0 (link 0) trains block 4, whose teacher block runs on rank 1 (link 1): its input flows back
    assert [plan.routes(phase, r, 8).late for r in range(3)] == [[4], [], []]
    # a student split over ranks fed from a later link stays in its step (its collectives span the group)
    split = Plan([Phase((Relay(0, 3, (0,)), Relay(3, 5, (1,))),
                        tuple(Placement(i, (0,)) for i in range(3)) + (Placement(3, (0, 1)), Placement(4, (0,))))])
    assert split.routes(split.phases[0], 0, 8).late == [4]


def test_loading_ranks_that_send_are_told_the_stop_decision():
    hybrid = Plan([Stage(0, 2, 2), Stage(2, 5, 1)])
    assert hybrid.routes(hybrid.phases[0], 0, 8).flag_to == [1]
    dp = Plan([Phase((Relay(0, 1, (0, 1)),), (Placement(0, (0, 1)),))])  # the gradient all-reduce carries it
    assert dp.routes(dp.phases[0], 0, 8).flag_to == []
