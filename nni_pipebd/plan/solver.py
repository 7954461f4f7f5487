"""Exact planner: contiguous stages x devices per stage minimising the slowest stage, under a memory limit."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

from .plan import Plan, PlanError, Stage
from .profiler import MB, Profile

__all__ = ["stage_time", "stage_memory", "solve", "smallest_memory_limit", "dp_step_time", "ideal_step_time",
           "dp_memory", "InfeasibleMemoryError"]


class InfeasibleMemoryError(PlanError):
    """No plan fits the memory limit; the message names the smallest limit that does."""


def stage_time(profile: Profile, start: int, stop: int, devices: int, sync_bn: bool = True) -> float:
    """Predicted seconds per step of blocks start..stop-1 on ``devices``: compute + receive + all-reduce."""
    rows = math.ceil(profile.batch_size / devices)
    total = 0.0
    for block in profile.blocks[start:stop]:
        total += block.teacher_s[devices] + block.student_s[devices]
        if devices > 1:
            total += profile.allreduce_time(block.grad_bytes, devices)
            if sync_bn:  # one small all-reduce in forward and one in backward per BatchNorm layer
                total += 2 * block.bn_layers * profile.allreduce_time(0, devices)
    if start > 0:
        total += profile.p2p.time(profile.blocks[start].activation_in_bytes * rows)
    return total


def stage_memory(profile: Profile, start: int, stop: int, devices: int, queue_depth: int = 2) -> float:
    """Predicted MB per device of blocks start..stop-1 on ``devices`` (with receive buffers)."""
    rows = math.ceil(profile.batch_size / devices)
    total = sum(block.memory_mb[devices] for block in profile.blocks[start:stop])
    if start > 0:
        total += (queue_depth + 1) * profile.blocks[start].activation_in_bytes * rows / MB
    return total


def solve(profile: Profile, workers: int, memory_limit_mb: Optional[float] = None, sync_bn: bool = True,
          queue_depth: int = 2, max_devices_per_stage: Optional[int] = None) -> Plan:
    """The plan with the smallest predicted slowest stage using exactly ``workers`` devices (ties: smaller sum).

    Exact dynamic programme over (first block, devices left): O(N^2 W^2) stage evaluations; it covers the
    pure pipeline (one device per stage), pure data parallelism (one stage, all devices) and every hybrid.
    ``max_devices_per_stage = 1`` restricts it to pure pipelines (TR+DPU without AHD).
    """
    n = len(profile.blocks)
    degrees = [g for g in sorted(profile.blocks[0].teacher_s)
               if max_devices_per_stage is None or g <= max_devices_per_stage]
    if workers < 1:
        raise PlanError(f"workers = {workers} must be >= 1")
    limit = math.inf if memory_limit_mb is None else memory_limit_mb

    @lru_cache(maxsize=None)
    def best(start: int, left: int) -> Tuple[float, float, Tuple[Stage, ...]]:
        if start == n:
            return (0.0, 0.0, ()) if left == 0 else (math.inf, math.inf, ())
        result = (math.inf, math.inf, ())
        for stop in range(start + 1, n + 1):
            for g in degrees:
                if g > left:
                    break
                if stage_memory(profile, start, stop, g, queue_depth) > limit:
                    continue
                rest_max, rest_sum, rest = best(stop, left - g)
                if rest_max == math.inf:
                    continue
                t = stage_time(profile, start, stop, g, sync_bn)
                candidate = (max(t, rest_max), t + rest_sum, (Stage(start, stop, g),) + rest)
                if candidate[:2] < result[:2]:
                    result = candidate
        return result

    slowest, _, stages = best(0, workers)
    if slowest == math.inf:
        if memory_limit_mb is not None:
            need = smallest_memory_limit(profile, workers, queue_depth)
            raise InfeasibleMemoryError(f"no plan for {workers} workers fits {memory_limit_mb:.1f} MB per device; "
                                        f"the smallest feasible limit is {need:.1f} MB")
        raise PlanError(f"no plan uses exactly {workers} workers for {n} blocks with 1..{max(degrees)} devices per "
                        f"stage (batch {profile.batch_size}); profile up to {workers} devices per stage "
                        f"(nni-pipebd profile CONFIG --workers {workers})")
    plan = Plan(list(stages))
    plan.predicted = {
        "stage_s": [stage_time(profile, s.start, s.stop, s.devices, sync_bn) for s in stages],
        "stage_mb": [stage_memory(profile, s.start, s.stop, s.devices, queue_depth) for s in stages],
        "step_s": slowest,
    }
    return plan


def smallest_memory_limit(profile: Profile, workers: int, queue_depth: int = 2) -> float:
    """The least per-device memory any plan for ``workers`` devices needs."""
    n = len(profile.blocks)
    degrees = sorted(profile.blocks[0].teacher_s)

    @lru_cache(maxsize=None)
    def least(start: int, left: int) -> float:
        if start == n:
            return 0.0 if left == 0 else math.inf
        return min((max(stage_memory(profile, start, stop, g, queue_depth), least(stop, left - g))
                    for stop in range(start + 1, n + 1) for g in degrees if g <= left), default=math.inf)

    return least(0, workers)


def dp_step_time(profile: Profile, workers: int, sync_bn: bool = False) -> float:
    """Predicted seconds for DNA's dp baseline to give every block one step (blocks in turn, teacher prefixes)."""
    total = 0.0
    for i, block in enumerate(profile.blocks):
        total += sum(b.teacher_s[workers] for b in profile.blocks[:i + 1]) + block.student_s[workers]
        if workers > 1:
            total += profile.allreduce_time(block.grad_bytes, workers)
            if sync_bn:
                total += 2 * block.bn_layers * profile.allreduce_time(0, workers)
    return total


def ideal_step_time(profile: Profile, workers: int) -> float:
    """All work done once on one device, perfectly split over ``workers``."""
    return sum(b.teacher_s[1] + b.student_s[1] for b in profile.blocks) / workers


def dp_memory(profile: Profile, workers: int) -> float:
    """Predicted peak MB per worker of the dp baseline: teacher prefix weights + one student block at B/W."""
    peak, prefix = 0.0, 0.0
    for block in profile.blocks:
        peak = max(peak, prefix + block.memory_mb[workers])
        prefix += block.teacher_mb
    return peak
