"""Free student placement: what each rank of a one-phase plan costs, and the exact planner over all such plans."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from .branch import MEMORY, TIME, BranchAndBound, PieceCosts, Solution
from .improve import Layout, improve
from .partition import greedy_assignment
from .plan import Phase, Placement, Plan, PlanError, Relay, Stage
from .profiler import MB, Profile
from .solver import InfeasibleMemoryError, smallest_memory_limit, solve

__all__ = ["rank_times", "rank_memory", "step_time", "place", "ls_relay_plan", "piece_costs", "profiled_degrees",
           "DEFAULT_BUDGET"]


def profiled_degrees(profile: Profile, workers: int) -> List[int]:
    """Devices per link or per student block the profile has figures for (every block, at most ``workers``)."""
    return sorted(g for g in profile.blocks[0].teacher_s
                  if 1 <= g <= min(workers, profile.batch_size)
                  and all(g in b.teacher_s and g in b.student_s and g in b.memory_mb for b in profile.blocks))


def rank_times(profile: Profile, plan: Plan, sync_bn: bool = True) -> List[float]:
    """Predicted seconds per step of every rank of a one-phase plan.

    A rank of a relay link on ``g`` devices (per-device rows ``ceil(B / g)``) pays its blocks' ``teacher_s[g]``
    and, past the first link, the receive of the link's input rows, ``p2p.time(activation_in_bytes * rows)``. A
    rank training student block ``i`` on ``h`` devices pays, for a batch split, ``student_s[h]``, for ``h > 1``
    the all-reduce of ``grad_bytes`` over ``h`` (and ``2 * bn_layers`` latency all-reduces with ``sync_bn``) and,
    unless the block is co-located with its teacher link (same ranks, batch split), the receive of its input and
    target rows, ``p2p.time((activation_in_bytes + activation_out_bytes) * rows)``. A path split (each rank the
    whole batch and ``ceil(k / h)`` of the ``k = paths_per_step`` paths) pays ``student_s[1] * ceil(k / h) / k``,
    one all-reduce of every parameter's gradient (``param_bytes``), no BatchNorm synchronisation, and the receive
    of all ``B`` rows. A link rank pays for packing and sending the input and output rows of every block whose
    student is not co-located, as much as their receive (the same link model). A co-located pipeline plan gets
    exactly :func:`~nni_pipebd.plan.solver.stage_time` per stage (relay sends are not charged, as there).

    Parameters
    ----------
    profile : Profile
        Per block and degree, times and memory; link models.
    plan : Plan
        One phase; student placements split by batch or, on at most ``profile.paths_per_step`` devices, by paths.
    sync_bn : bool
        Count the BatchNorm synchronisation of a data-parallel student block.

    Returns
    -------
    list of float
        Seconds per step of ranks ``0..plan.workers - 1``.
    """
    phase = _one_phase(profile, plan)
    times = [0.0] * plan.workers
    local = _colocated(phase)
    for relay in phase.relays:
        g = len(relay.ranks)
        total = 0.0
        for i in relay.blocks:
            block = profile.blocks[i]
            if i in local:  # the order of solver.stage_time, so a pipeline plan predicts bit for bit the same
                total += block.teacher_s[g] + block.student_s[g]
                if g > 1:
                    total += profile.allreduce_time(block.grad_bytes, g)
                    if sync_bn:
                        total += 2 * block.bn_layers * profile.allreduce_time(0, g)
            else:  # the teacher forward and the send of the block's input and output rows to its student
                total += block.teacher_s[g] + _feed_time(profile, i, g)
        if relay.start > 0:
            total += profile.p2p.time(profile.blocks[relay.start].activation_in_bytes * _rows(profile, g))
        for r in relay.ranks:
            times[r] += total
    for placement in phase.students:
        if placement.block not in local:
            cost = _fed_time(profile, placement.block, len(placement.ranks), placement.split, sync_bn)
            for r in placement.ranks:
                times[r] += cost
    return times


def rank_memory(profile: Profile, plan: Plan, queue_depth: int = 2) -> List[float]:
    """Predicted MB per rank of a one-phase plan.

    A link rank on ``g`` devices holds, per block of the link, ``memory_mb[g]`` when the student is co-located
    (teacher weights included), else only the teacher weights and its input and output rows
    (``teacher_mb + (in + out) * rows``); past the first link, ``queue_depth + 1`` receive buffers of the link's
    input. A rank training student block ``i`` away from its teacher link on ``h`` devices holds
    ``memory_mb[h] - teacher_mb`` and ``queue_depth + 1`` receive buffers of the block's input and target rows;
    split by paths, ``memory_mb[1] - teacher_mb`` (the whole batch's activations of one path at a time) and
    buffers of all ``B`` rows. A co-located pipeline plan gets exactly
    :func:`~nni_pipebd.plan.solver.stage_memory` per stage.

    Parameters
    ----------
    profile : Profile
        Per block and degree, times and memory.
    plan : Plan
        One phase; student placements split by batch or by paths.
    queue_depth : int
        Activations in flight between two ranks.

    Returns
    -------
    list of float
        MB per device of ranks ``0..plan.workers - 1``.
    """
    phase = _one_phase(profile, plan)
    memory = [0.0] * plan.workers
    local = _colocated(phase)
    for relay in phase.relays:
        g = len(relay.ranks)
        total = sum(_link_block_mb(profile, i, g, i in local) for i in relay.blocks)
        if relay.start > 0:
            total += (queue_depth + 1) * profile.blocks[relay.start].activation_in_bytes * _rows(profile, g) / MB
        for r in relay.ranks:
            memory[r] += total
    for placement in phase.students:
        if placement.block not in local:
            cost = _student_mb(profile, placement.block, len(placement.ranks), queue_depth, placement.split)
            for r in placement.ranks:
                memory[r] += cost
    return memory


def step_time(profile: Profile, plan: Plan, sync_bn: bool = True) -> float:
    """Predicted seconds per step of a one-phase plan: its slowest rank."""
    return max(rank_times(profile, plan, sync_bn))


DEFAULT_BUDGET = 20_000
"""Nodes the exact search may visit by default (a few seconds in CPython); ``None``: no cap."""


def place(profile: Profile, workers: int, memory_limit_mb: Optional[float] = None, sync_bn: bool = True,
          queue_depth: int = 2, budget: Optional[int] = DEFAULT_BUDGET) -> Plan:
    """The one-phase plan with the smallest predicted step on exactly ``workers`` devices (ties: smaller sum).

    Chooses jointly the teacher relay links (contiguous blocks, devices per link) and, for every student block,
    its devices and how many, co-located with its teacher link or fed from it, and on ``h > 1`` devices how they
    share it: its batch, or (when ``profile.paths_per_step >= h``) the step's sampled paths, whichever
    :func:`rank_times` predicts faster (``Placement.split``; under a memory limit the path split only where it
    needs no more memory than the batch split, see :func:`piece_costs`); Pipe-BD's stages,
    AHD's hybrid stages and LS's bins are special cases. AHD's best plan (:func:`~nni_pipebd.plan.solver.solve`)
    and LS's bins (:func:`ls_relay_plan`), each improved by local search (:func:`~nni_pipebd.plan.improve.improve`),
    bound an exact branch and bound (:class:`~nni_pipebd.plan.branch.BranchAndBound`) over every plan. The result
    is never slower than either seed. When the search ends within ``budget`` nodes the plan is optimal under the
    cost model (``predicted['optimal']``); otherwise it is the best found, and ``predicted['bound_s']`` is a step
    time no plan can beat.

    Parameters
    ----------
    profile : Profile
        Per block and degree, times and memory; link models.
    workers : int
        Devices; every one gets work.
    memory_limit_mb : float, optional
        Per-device limit every rank's :func:`rank_memory` must respect.
    sync_bn : bool
        Count the BatchNorm synchronisation of data-parallel student blocks.
    queue_depth : int
        Activations in flight between two ranks (receive buffers).
    budget : int, optional
        Nodes the exact search may visit (``None``: until it proves the optimum; that may take long beyond
        about 8 blocks on 4 devices).

    Returns
    -------
    Plan
        With ``predicted``: ``step_s``, ``rank_s`` and ``rank_mb`` (per rank), ``optimal`` (bool), ``bound_s``
        when not proven optimal, and for a pipeline plan also ``stage_s`` and ``stage_mb``.

    Raises
    ------
    InfeasibleMemoryError
        No plan fits ``memory_limit_mb``; the message names the smallest limit that does.
    PlanError
        No plan uses exactly ``workers`` devices with the profiled degrees.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PlanError(f"workers = {workers!r} must be an int >= 1")
    if memory_limit_mb is not None and not memory_limit_mb > 0:
        raise PlanError(f"memory_limit_mb = {memory_limit_mb!r} must be > 0 (or None for no limit)")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise PlanError(f"budget = {budget!r} must be an int >= 1 (nodes of the search) or None (no cap)")
    limit = math.inf if memory_limit_mb is None else float(memory_limit_mb)
    costs = piece_costs(profile, workers, sync_bn, queue_depth, limited=limit < math.inf)
    candidates: List[Plan] = []  # in order of preference among equals
    for seed in (lambda: solve(profile, workers, memory_limit_mb, sync_bn, queue_depth),
                 lambda: ls_relay_plan(profile, workers)):
        try:
            plan = seed()
        except PlanError:  # no such plan (memory, degrees, more workers than blocks)
            continue
        if max(rank_memory(profile, plan, queue_depth)) <= limit:
            layout = _layout(costs, workers, plan)
            candidates.append(_build(layout.solution(), costs))  # ranks renumbered: the teacher chain from rank 0
            candidates.append(_build(improve(layout, limit).solution(), costs))
    incumbent = min((_value(profile, plan, sync_bn) for plan in candidates), default=None)
    search = BranchAndBound(costs, workers)
    found = search.run(TIME, limit, incumbent, budget)
    if found is not None:
        candidates.append(_build(found, costs))
    if not candidates:
        _no_plan(profile, workers, memory_limit_mb, search, budget, queue_depth)
    best = min(candidates, key=lambda plan: _value(profile, plan, sync_bn))  # the first of equals
    best = _predicted(profile, best, sync_bn, queue_depth)
    best.predicted["optimal"] = search.complete
    if not search.complete:
        best.predicted["bound_s"] = search.lower_bound(TIME, limit)
    return best


def ls_relay_plan(profile: Profile, workers: int) -> Plan:
    """LS's bins as a relay plan: every student block alone on the worker that LS's greedy packing gives it (on
    one-device step costs), the whole teacher chain on the worker with the lightest bin (co-located there)."""
    n = len(profile.blocks)
    if workers > n:
        raise PlanError(f"LS gives every worker whole blocks: {workers} workers > {n} blocks")
    bins = greedy_assignment([b.teacher_s[1] + b.student_s[1] for b in profile.blocks], workers)
    load = [sum(profile.blocks[i].student_s[1] for i in blocks) for blocks in bins]
    teacher = min(range(workers), key=lambda r: (load[r], r))
    students = tuple(Placement(i, (r,)) for r, blocks in enumerate(bins) for i in blocks)
    return Plan([Phase((Relay(0, n, (teacher,)),), tuple(sorted(students, key=lambda p: p.block)))])


def _value(profile: Profile, plan: Plan, sync_bn: bool) -> Tuple[float, float]:
    times = rank_times(profile, plan, sync_bn)
    return max(times), sum(times)


def _layout(costs: PieceCosts, workers: int, plan: Plan) -> Layout:
    phase = plan.phases[0]
    return Layout(costs, workers, [(r.start, r.stop, r.ranks) for r in phase.relays],
                  {p.block: p.ranks for p in phase.students})


def _no_plan(profile: Profile, workers: int, memory_limit_mb: Optional[float], search: BranchAndBound,
             budget: Optional[int], queue_depth: int) -> None:
    """Raise why no plan came out: the memory limit (naming the least that fits), the degrees, or the budget."""
    degrees = profiled_degrees(profile, workers)
    if not search.complete:
        raise PlanError(f"no plan for {workers} workers found within the search budget of {budget} nodes (memory "
                        f"limit {memory_limit_mb} MB); raise the budget or the memory limit")
    if memory_limit_mb is not None:
        fits = search.run(MEMORY, budget=budget)
        if fits is not None:
            need = min(smallest_memory_limit(profile, workers, queue_depth), search.best[0])
            what = "the smallest feasible limit is" if search.complete else "a limit that fits is"
            raise InfeasibleMemoryError(f"no plan for {workers} workers fits {memory_limit_mb:.1f} MB per device; "
                                        f"{what} {need:.1f} MB")
    raise PlanError(f"no plan uses exactly {workers} workers for {len(profile.blocks)} blocks with {degrees} "
                    f"devices per link or student block (batch {profile.batch_size}); profile up to {workers} "
                    f"devices (nni-pipebd profile CONFIG --workers {workers})")


def piece_costs(profile: Profile, workers: int, sync_bn: bool = True, queue_depth: int = 2,
                limited: bool = False) -> PieceCosts:
    """The terms of :func:`rank_times` and :func:`rank_memory` per block and degree, for the search.

    A student on ``1 < h <= profile.paths_per_step`` devices splits its paths where that is faster; with
    ``limited`` (a memory limit applies) only where it needs no more memory either, so that taking one split per
    piece stays exact (a faster split that needs more memory could cost a plan its fit).
    """
    n, inf = len(profile.blocks), math.inf
    degrees = profiled_degrees(profile, workers)

    def table():
        return [[[inf] * (workers + 1) for _ in range(n)] for _ in (TIME, MEMORY)]

    teacher, colocated, teacher_only, fed, link_in = table(), table(), table(), table(), table()
    paths_colocated = [[False] * (workers + 1) for _ in range(n)]
    paths_fed = [[False] * (workers + 1) for _ in range(n)]
    for i, block in enumerate(profile.blocks):
        for g in degrees:
            rows = _rows(profile, g)
            alone = _link_block_mb(profile, i, g, False)
            low = min(alone, block.memory_mb[g])  # what the link holds either way; the rest when decided
            teacher[TIME][i][g], teacher[MEMORY][i][g] = block.teacher_s[g], low
            colocated[TIME][i][g] = _student_time(profile, i, g, sync_bn)
            colocated[MEMORY][i][g] = block.memory_mb[g] - low
            send = _feed_time(profile, i, g)  # a link rank sending the block's rows to its student elsewhere
            teacher_only[TIME][i][g], teacher_only[MEMORY][i][g] = send, alone - low
            fed[TIME][i][g] = _fed_time(profile, i, g, "batch", sync_bn)
            fed[MEMORY][i][g] = max(0.0, _student_mb(profile, i, g, queue_depth))
            if 1 < g <= profile.paths_per_step:  # the path split, where it is faster (on the link's ranks: fed)
                time = _fed_time(profile, i, g, "paths", sync_bn)
                memory = max(0.0, _student_mb(profile, i, g, queue_depth, "paths"))
                if time + send < colocated[TIME][i][g] and \
                        not (limited and alone - low + memory > colocated[MEMORY][i][g]):
                    colocated[TIME][i][g], colocated[MEMORY][i][g] = time + send, alone - low + memory
                    paths_colocated[i][g] = True
                if time < fed[TIME][i][g] and not (limited and memory > fed[MEMORY][i][g]):
                    fed[TIME][i][g], fed[MEMORY][i][g] = time, memory
                    paths_fed[i][g] = True
            if i == 0:
                link_in[TIME][i][g] = link_in[MEMORY][i][g] = 0.0
            else:
                link_in[TIME][i][g] = profile.p2p.time(block.activation_in_bytes * rows)
                link_in[MEMORY][i][g] = (queue_depth + 1) * block.activation_in_bytes * rows / MB
    return PieceCosts(degrees, teacher, colocated, teacher_only, fed, link_in, paths_colocated, paths_fed)


def _build(found: Solution, costs: PieceCosts) -> Plan:
    """The plan of a search result, ranks renumbered: links in chain order on consecutive ranks, then the ranks
    that only train students (a co-located result is then exactly Pipe-BD's ``Plan([Stage, ...])``); every
    student split as its piece in ``costs`` says."""
    links = sorted(found.links)
    order = [r for _, _, ranks in links for r in ranks]
    order += sorted({r for ranks in found.students.values() for r in ranks} - set(order))
    new = {old: k for k, old in enumerate(order)}
    relays = tuple(Relay(s, e, tuple(sorted(new[r] for r in ranks))) for s, e, ranks in links)
    own = {b: tuple(sorted(ranks)) for s, e, ranks in links for b in range(s, e)}
    students = tuple(Placement(b, tuple(sorted(new[r] for r in found.students[b])),
                               costs.split(b, len(found.students[b]), tuple(sorted(found.students[b])) == own[b]))
                     for b in sorted(found.students))
    phase = Phase(relays, students)
    if phase.is_pipeline():
        return Plan([Stage(r.start, r.stop, len(r.ranks)) for r in relays])
    return Plan([phase])


def _predicted(profile: Profile, plan: Plan, sync_bn: bool, queue_depth: int) -> Plan:
    times, memory = rank_times(profile, plan, sync_bn), rank_memory(profile, plan, queue_depth)
    plan.predicted = {"step_s": max(times), "rank_s": times, "rank_mb": memory}
    if plan.is_pipeline:
        firsts = [relay.ranks[0] for relay in plan.phases[0].relays]
        plan.predicted.update(stage_s=[times[r] for r in firsts], stage_mb=[memory[r] for r in firsts])
    return plan


def _one_phase(profile: Profile, plan: Plan) -> Phase:
    if len(plan.phases) != 1:
        raise PlanError(f"the cost model predicts one-phase plans; this plan has {len(plan.phases)} phases "
                        "(predict each phase on its own ranks)")
    phase = plan.phases[0]
    n = len(profile.blocks)
    for placement in phase.students:
        if placement.split == "paths" and len(placement.ranks) > profile.paths_per_step:
            raise PlanError(f"student block {placement.block} splits its paths over {len(placement.ranks)} devices "
                            f"but the profile was measured at paths_per_step = {profile.paths_per_step}; split the "
                            "batch, use fewer devices, or profile the job with more distill.paths_per_step")
        if placement.split not in ("batch", "paths"):
            raise PlanError(f"student block {placement.block}: split {placement.split!r} is not 'batch' or 'paths'")
    for what, block, g in ([("link", i, len(r.ranks)) for r in phase.relays for i in r.blocks]
                           + [("student", p.block, len(p.ranks)) for p in phase.students]):
        if not 0 <= block < n:
            raise PlanError(f"the plan names block {block} but the profile has {n} blocks; profile this job")
        b = profile.blocks[block]
        if g not in b.teacher_s or g not in b.student_s or g not in b.memory_mb:
            raise PlanError(f"{what} of block {block} runs on {g} devices but the profile has degrees "
                            f"{sorted(b.teacher_s)}; profile up to {g} devices (nni-pipebd profile CONFIG "
                            f"--workers {g})")
    return phase


def _colocated(phase: Phase) -> set:
    """Student blocks trained on exactly their teacher link's ranks, splitting the batch (nothing is sent)."""
    return {p.block for p in phase.students if p.split == "batch" and p.ranks == phase.relay_of(p.block).ranks}


def _rows(profile: Profile, devices: int) -> int:
    return math.ceil(profile.batch_size / devices)


def _student_time(profile: Profile, i: int, h: int, sync_bn: bool) -> float:
    block = profile.blocks[i]
    total = block.student_s[h]
    if h > 1:
        total += profile.allreduce_time(block.grad_bytes, h)
        if sync_bn:
            total += 2 * block.bn_layers * profile.allreduce_time(0, h)
    return total


def _paths_time(profile: Profile, i: int, h: int) -> float:
    """Student block ``i`` with its ``k`` paths shared over ``h`` devices, each the whole batch: ``ceil(k / h)``
    of the profiled ``k`` paths, then one all-reduce of every parameter's gradient (no BatchNorm to sync)."""
    k = profile.paths_per_step
    total = profile.blocks[i].student_s[1] * math.ceil(k / h) / k
    if h > 1:
        total += profile.allreduce_time(profile.param_bytes(i), h)
    return total


def _fed_time(profile: Profile, i: int, h: int, split: str, sync_bn: bool) -> float:
    """Student block ``i`` on ``h`` devices away from its teacher link (or sharing its paths on the link's
    ranks): the step, its all-reduces and the receive of its rows (all ``B`` of them for a path split)."""
    if split == "paths":
        return _paths_time(profile, i, h) + _feed_time(profile, i, 1)
    return _student_time(profile, i, h, sync_bn) + _feed_time(profile, i, h)


def _feed_time(profile: Profile, i: int, h: int) -> float:
    """Sending or receiving block ``i``'s input and target rows between its teacher link and its student."""
    return profile.p2p.time((profile.blocks[i].activation_in_bytes + profile.out_bytes(i)) * _rows(profile, h))


def _link_block_mb(profile: Profile, i: int, g: int, colocated: bool) -> float:
    block = profile.blocks[i]
    if colocated:
        return block.memory_mb[g]
    return block.teacher_mb + (block.activation_in_bytes + profile.out_bytes(i)) * _rows(profile, g) / MB


def _student_mb(profile: Profile, i: int, h: int, queue_depth: int, split: str = "batch") -> float:
    """A rank training student block ``i`` on ``h`` devices away from its link: the block's memory at its rows
    (a path split: all rows, one path at a time) and the receive buffers of those rows."""
    if split == "paths":
        h = 1
    block = profile.blocks[i]
    io = (block.activation_in_bytes + profile.out_bytes(i)) * _rows(profile, h) / MB
    return block.memory_mb[h] - block.teacher_mb + (queue_depth + 1) * io
