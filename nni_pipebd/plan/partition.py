"""Contiguous stage boundaries (balanced exactly by min-max) and greedy block-to-worker packing."""

from __future__ import annotations

from functools import lru_cache
from typing import List, Sequence

__all__ = ["balanced_boundaries", "check_boundaries", "stage_blocks", "greedy_assignment"]


def check_boundaries(boundaries: Sequence[int], num_blocks: int, stages: int) -> List[int]:
    """Validate stage start blocks: ``stages`` strictly increasing values, first 0, all < ``num_blocks``."""
    b = [int(v) for v in boundaries]
    if len(b) != stages:
        raise ValueError(f"boundaries {b} name {len(b)} stages but there are {stages} workers; "
                         f"give one start block per worker, e.g. {balanced_boundaries([1.0] * num_blocks, stages)}")
    if b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])) or b[-1] >= num_blocks:
        raise ValueError(f"boundaries {b} must start at 0, increase strictly and stay below the {num_blocks} "
                         "blocks (each value is the first block of a stage)")
    return b


def stage_blocks(boundaries: Sequence[int], num_blocks: int) -> List[range]:
    """The block range of every stage."""
    ends = list(boundaries[1:]) + [num_blocks]
    return [range(start, end) for start, end in zip(boundaries, ends)]


def balanced_boundaries(costs: Sequence[float], stages: int) -> List[int]:
    """Start blocks of ``stages`` contiguous stages minimising the largest stage cost (exact dynamic programme)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} pipeline stages; use 1..{n} workers "
                         "(each stage needs at least one block)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    @lru_cache(maxsize=None)
    def best(start: int, k: int) -> tuple:
        if k == 1:
            return prefix[n] - prefix[start], (start,)
        options = []
        for end in range(start + 1, n - k + 2):
            rest, starts = best(end, k - 1)
            options.append((max(prefix[end] - prefix[start], rest), (start,) + starts))
        return min(options)

    return list(best(0, stages)[1])


def greedy_assignment(costs: Sequence[float], workers: int) -> List[List[int]]:
    """Blocks per worker by longest-processing-time-first bin packing (ties: lower block, lower worker)."""
    if workers < 1:
        raise ValueError(f"workers = {workers} must be >= 1")
    loads = [0.0] * workers
    bins: List[List[int]] = [[] for _ in range(workers)]
    for block in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        worker = min(range(workers), key=lambda w: (loads[w], w))
        bins[worker].append(block)
        loads[worker] += costs[block]
    return [sorted(b) for b in bins]
