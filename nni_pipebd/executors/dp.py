"""The ``dp`` executor: DNA's baseline — blocks one after another, each data-parallel over all workers."""

from __future__ import annotations

from ..job import Job
from ..plan.plan import Phase, Placement, Plan, Relay
from .base import Executor, WorkerContext, WorkerReport, register
from .runtime import run_plan

__all__ = ["DataParallelExecutor", "dp_plan"]


def dp_plan(num_blocks: int, workers: int) -> Plan:
    """Phase i: every worker re-runs teacher blocks 0..i on its rows and trains student block i data parallel."""
    ranks = tuple(range(workers))
    return Plan([Phase((Relay(0, i + 1, ranks),), (Placement(i, ranks),)) for i in range(num_blocks)])


@register
class DataParallelExecutor(Executor):
    """Block i trains for all epochs before block i+1; every step, each worker loads its shard of the batch and
    re-runs teacher blocks 0..i on it, then the student gradients are averaged over the workers.

    BatchNorm of the student is synchronised over the workers when ``execution.sync_bn`` (the default), so the
    math is that of one process with the whole batch; off, each worker normalises its own shard (DNA's code).
    """

    name = "dp"
    needs_process_group = True

    def check(self, world_size, num_blocks=None):
        batch = self.config.data.batch_size
        if world_size > batch:
            raise ValueError(f"dp splits each batch over the workers: batch_size {batch} < workers {world_size}; "
                             "raise data.batch_size or use fewer workers")

    def run_worker(self, ctx: WorkerContext, job: Job, save_block) -> WorkerReport:
        world = ctx.world_size
        return run_plan(ctx, job, dp_plan(job.num_blocks, world), save_block,
                        label=f"rank {ctx.rank}: 1/{world} of every batch, blocks in turn")
