"""The ``pipebd`` executor: teacher relaying across stages, decoupled updates, hybrid (data-parallel) stages."""

from __future__ import annotations

from typing import List

import torch.distributed as dist

from ..job import Job
from ..plan.cost import job_block_costs
from ..plan.partition import balanced_boundaries, check_boundaries
from ..plan.plan import Plan, PlanError
from .base import Executor, WorkerContext, WorkerReport, register
from .runtime import run_plan

__all__ = ["PipeBDExecutor", "resolve_plan"]


def resolve_plan(job: Job, workers: int) -> Plan:
    """The plan to run: ``execution.plan`` (a file), ``execution.boundaries``, or stages balanced on block cost."""
    execution, n, batch = job.config.execution, job.num_blocks, job.config.data.batch_size
    if execution.plan == "auto":
        raise PlanError("execution.plan = 'auto' must be resolved to a plan file before the workers start "
                        "(nni_pipebd.train does it; under torchrun run `nni-pipebd plan CONFIG --workers W "
                        "--out plan.json` first and pass --plan plan.json)")
    if execution.plan is not None:
        return Plan.load(job.config.resolve_path(execution.plan)).validate(n, workers, batch,
                                                                           job.config.distill.paths_per_step)
    if execution.boundaries is not None:
        return Plan.from_boundaries(check_boundaries(execution.boundaries, n, workers), n)
    if workers > n:
        raise PlanError(f"pipebd gives every worker a stage of at least one block: {workers} workers > {n} "
                        f"blocks; use at most {n} workers, or a plan with data-parallel stages (--plan auto)")
    return Plan.from_boundaries(balanced_boundaries([t + s for t, s in job_block_costs(job)], workers), n)


@register
class PipeBDExecutor(Executor):
    """Runs a plan (see :class:`~nni_pipebd.plan.plan.Plan`): by default Pipe-BD's stages, each owning a contiguous
    range of blocks and served by one or more workers (ranks in plan order); a plan file may place student blocks
    on any worker (the teacher still runs once per sample as a relay chain).

    Per step, stage 0 loads the batch (each of its devices its own slice); every other stage receives the
    activation entering its first block — each device its slice of rows, assembled from the previous stage's
    devices — runs its teacher blocks once under ``no_grad``, sends the activation leaving its last block on
    (asynchronously, ``execution.queue_depth`` steps in flight), and trains its student blocks on the
    activations it holds. Inside a multi-device stage the student gradients are all-reduced (weighted by
    slice size) and BatchNorm is synchronised (``execution.sync_bn``), so the math is the whole batch's.
    With ``execution.decoupled`` (DPU) a stage steps as soon as its backward ends; without, every worker waits
    at a global barrier before each step (teacher relaying only). Every sample passes each teacher block once
    and is loaded once.
    """

    name = "pipebd"
    needs_process_group = True

    def check(self, world_size, num_blocks=None):
        execution = self.config.execution
        if num_blocks is None:
            return
        if execution.boundaries is not None:
            check_boundaries(execution.boundaries, num_blocks, world_size)
        elif execution.plan is None and world_size > num_blocks:
            raise ValueError(f"pipebd gives every worker a stage of at least one block: {world_size} workers > "
                             f"{num_blocks} blocks; use at most {num_blocks} workers, or a plan with data-parallel "
                             "stages (--plan auto)")

    def run_worker(self, ctx: WorkerContext, job: Job, save_block) -> WorkerReport:
        plan = resolve_plan(job, ctx.world_size)
        if ctx.distributed:
            _agree(ctx, plan)
        return run_plan(ctx, job, plan, save_block)


def _agree(ctx: WorkerContext, plan: Plan) -> None:
    """Every worker must have derived the same plan (same config everywhere), or the relay would mismatch."""
    mine = plan.to_dict()
    plans: List = [None] * ctx.world_size
    dist.all_gather_object(plans, mine, group=ctx.group)
    if any(other != mine for other in plans):
        raise RuntimeError(f"workers disagree on the plan: {plans}; start every worker with the same config "
                           "and code")
