"""The ``reference`` executor: one process; the teacher runs once per step and every block trains on its relay."""

from __future__ import annotations

from ..job import Job
from ..plan.plan import Plan, Stage
from .base import Executor, WorkerContext, WorkerReport, register
from .runtime import run_plan

__all__ = ["ReferenceExecutor", "reference_plan"]


def reference_plan(num_blocks: int) -> Plan:
    """One rank runs every teacher block once per step and trains every student block on the relay."""
    return Plan([Stage(0, num_blocks, 1)])


@register
class ReferenceExecutor(Executor):
    """Single-process ground truth: per step, T_0..T_{N-1} run once and each S_i trains on (x_i, T_i(x_i))."""

    name = "reference"
    needs_process_group = False

    def check(self, world_size, num_blocks=None):
        if world_size != 1:
            raise ValueError(f"the reference executor runs on 1 worker, not {world_size}; "
                             "use --workers 1 or a parallel executor (dp, ls, pipebd)")

    def run_worker(self, ctx: WorkerContext, job: Job, save_block) -> WorkerReport:
        return run_plan(ctx, job, reference_plan(job.num_blocks), save_block, label="reference: all blocks",
                        keys=["reference"])
