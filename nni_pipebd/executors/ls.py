"""The ``ls`` executor: block-level task parallelism (Blakeney et al.) — each worker trains whole blocks alone."""

from __future__ import annotations

from itertools import accumulate
from typing import List

from ..job import Job
from ..plan.cost import job_block_costs
from ..plan.partition import greedy_assignment
from ..plan.plan import Phase, Placement, Plan, Relay
from .base import Executor, WorkerContext, WorkerReport, register
from .runtime import run_plan

__all__ = ["TaskParallelExecutor", "block_assignment", "ls_plan"]


def block_assignment(job: Job, workers: int) -> List[List[int]]:
    """Blocks of every worker: greedy bin packing on block cost, each block paying its teacher prefix."""
    costs = job_block_costs(job)
    prefixes = [0.0] + list(accumulate(t for t, _ in costs))[:-1]
    return greedy_assignment([p + t + s for p, (t, s) in zip(prefixes, costs)], workers)


def ls_plan(bins) -> Plan:
    """Worker w trains its blocks in turn, each alone on whole batches after its own run of the teacher prefix."""
    return Plan([Phase((Relay(0, i + 1, (w,)),), (Placement(i, (w,)),)) for w, blocks in enumerate(bins)
                 for i in blocks])


@register
class TaskParallelExecutor(Executor):
    """Every worker trains its own blocks one after another on whole batches, re-running the teacher prefix
    0..i for each block i; no communication until the end. Bitwise equal to ``reference`` (no batch is split),
    but each sample is loaded once per block and the teacher prefix runs once per block. A stop request ends every
    worker at its next step, without a checkpoint (the baseline is not resumable).
    """

    name = "ls"
    needs_process_group = True

    def check(self, world_size, num_blocks=None):
        if self.config.execution.checkpoint_every:
            raise ValueError("the ls baseline does not write resumable checkpoints; unset "
                             "execution.checkpoint_every or use reference, dp or pipebd")
        if num_blocks is not None and world_size > num_blocks:
            raise ValueError(f"ls gives every worker at least one whole block: {world_size} workers > "
                             f"{num_blocks} blocks; use at most {num_blocks} workers")

    def run_worker(self, ctx: WorkerContext, job: Job, save_block) -> WorkerReport:
        bins = block_assignment(job, ctx.world_size)
        return run_plan(ctx, job, ls_plan(bins), save_block, label=f"rank {ctx.rank}: blocks {bins[ctx.rank]}")
