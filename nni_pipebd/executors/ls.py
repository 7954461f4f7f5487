"""The ``ls`` executor: block-level task parallelism (Blakeney et al.) — each worker trains whole blocks alone."""

from __future__ import annotations

from itertools import accumulate
from typing import List

from ..job import Job
from ..plan.cost import job_block_costs
from ..plan.partition import greedy_assignment
from .base import Executor, WorkerContext, WorkerReport, register
from .dp import train_block_on_prefix

__all__ = ["TaskParallelExecutor", "block_assignment"]


def block_assignment(job: Job, workers: int) -> List[List[int]]:
    """Blocks of every worker: greedy bin packing on block cost, each block paying its teacher prefix."""
    costs = job_block_costs(job)
    prefixes = [0.0] + list(accumulate(t for t, _ in costs))[:-1]
    return greedy_assignment([p + t + s for p, (t, s) in zip(prefixes, costs)], workers)


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
        mine = block_assignment(job, ctx.world_size)[ctx.rank]
        report = WorkerReport(ctx.rank, label=f"rank {ctx.rank}: blocks {mine}")
        ctx.announce(report.label)
        spb = job.steps_per_block
        for n, i in enumerate(mine):
            trainer = train_block_on_prefix(ctx, job, i, report, step_base=n * spb, progress_total=len(mine) * spb)
            save_block(i, trainer.state_dict())
            if ctx.stop.pending and n + 1 < len(mine):
                raise ctx.stop.stop(None)  # ls writes no resumable checkpoints
        return report
