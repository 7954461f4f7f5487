"""The ``pipebd`` executor: teacher relaying across stages, decoupled updates, hybrid (data-parallel) stages."""

from __future__ import annotations

import logging
from typing import List

import torch
import torch.distributed as dist

from ..data.order import shard_sizes
from ..distill.trainer import BlockTrainer
from ..job import Job
from ..plan.cost import job_block_costs
from ..plan.partition import balanced_boundaries, check_boundaries
from ..plan.plan import Plan, PlanError, transfers
from .base import BlockReport, Executor, WorkerContext, WorkerReport, finish_step, register, restore_stage
from .comm import Receiver, Sender, allreduce_gradients
from .faults import inject
from .stopping import RunStopped
from .syncbn import convert_sync_batchnorm

__all__ = ["PipeBDExecutor", "resolve_plan"]

_logger = logging.getLogger(__name__)


def resolve_plan(job: Job, workers: int) -> Plan:
    """The plan to run: ``execution.plan`` (a file), ``execution.boundaries``, or stages balanced on block cost."""
    execution, n, batch = job.config.execution, job.num_blocks, job.config.data.batch_size
    if execution.plan == "auto":
        raise PlanError("execution.plan = 'auto' must be resolved to a plan file before the workers start "
                        "(nni_pipebd.train does it; under torchrun run `nni-pipebd plan CONFIG --workers W "
                        "--out plan.json` first and pass --plan plan.json)")
    if execution.plan is not None:
        return Plan.load(job.config.resolve_path(execution.plan)).validate(n, workers, batch)
    if execution.boundaries is not None:
        return Plan.from_boundaries(check_boundaries(execution.boundaries, n, workers), n)
    if workers > n:
        raise PlanError(f"pipebd gives every worker a stage of at least one block: {workers} workers > {n} "
                        f"blocks; use at most {n} workers, or a plan with data-parallel stages (--plan auto)")
    return Plan.from_boundaries(balanced_boundaries([t + s for t, s in job_block_costs(job)], workers), n)


@register
class PipeBDExecutor(Executor):
    """Each stage owns a contiguous range of blocks and is served by one or more workers (ranks in plan order).

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
        spec, device, execution, tracer = job.spec, ctx.device, job.config.execution, ctx.tracer
        plan = resolve_plan(job, ctx.world_size)
        k, j = plan.locate(ctx.rank)
        stage, batch = plan.stages[k], job.config.data.batch_size
        groups = _stage_groups(ctx, plan)
        group = groups[k]
        rows = shard_sizes(batch, stage.devices)[j]
        if ctx.distributed:
            _agree(ctx, plan)
        teacher = [spec.teacher[i].to(device) for i in stage.blocks]
        trainers = []
        for i in stage.blocks:
            student = spec.student[i].to(device)
            if group is not None and execution.sync_bn:
                student = convert_sync_batchnorm(student, group, device.type)
            trainers.append(BlockTrainer(i, student, job.config.distill, job.steps_per_block))
        where = f" (device {j + 1}/{stage.devices})" if stage.devices > 1 else ""
        report = WorkerReport(ctx.rank, label=f"stage {k}{where}: blocks {stage.start}-{stage.stop - 1}")
        report.blocks = {i: BlockReport() for i in stage.blocks}
        ctx.announce(report.label)
        keys = [f"rank{r}" for r in range(ctx.world_size)]
        checkpoints = ctx.checkpointer(keys[ctx.rank], execution.checkpoint_every)
        done = restore_stage(ctx.resume_state(keys, keys[ctx.rank]), trainers, report)
        epochs, steps = job.config.distill.epochs, job.order.steps_per_epoch
        receiver = sender = None
        if k > 0:
            previous = plan.ranks(k - 1)
            lo = sum(shard_sizes(batch, stage.devices)[:j])
            routes = [(previous[a], g_lo - lo, g_hi - lo)
                      for a, b, g_lo, g_hi in transfers(batch, plan.stages[k - 1].devices, stage.devices) if b == j]
            receiver = Receiver(routes, (rows,) + spec.shapes[stage.start][0], spec.sample.dtype, device,
                                execution.queue_depth, epochs * steps - done, ctx.timeout, ctx.group)
        if k < len(plan.stages) - 1:
            following = plan.ranks(k + 1)
            lo = sum(shard_sizes(batch, stage.devices)[:j])
            routes = [(following[b], g_lo - lo, g_hi - lo)
                      for a, b, g_lo, g_hi in transfers(batch, stage.devices, plan.stages[k + 1].devices) if a == j]
            sender = Sender(routes, execution.queue_depth, ctx.timeout, ctx.group)
        for epoch in range(done // steps, epochs):
            first = done % steps if epoch == done // steps else 0
            source = iter(job.loader(epoch, j, stage.devices, first)) if k == 0 else None
            for _ in range(first, steps):
                last = ctx.stop.poll(leader=ctx.rank == 0)  # rank 0 decides; the flag travels with the step
                inject(ctx.rank, done)
                if source is not None:
                    with tracer.span("data"):
                        x = next(source)[0].to(device)
                    report.count("samples_loaded", len(x))
                else:
                    with tracer.span("recv"):
                        x = receiver.recv()
                    last = last or receiver.stop
                pairs = []
                with tracer.span("teacher"), torch.no_grad():
                    for block in teacher:
                        y = block(x)
                        pairs.append((x, y))
                        x = y
                report.count("teacher_block_forwards", rows * len(teacher))
                if sender is not None:
                    with tracer.span("send"):
                        sender.send(x, last)
                with tracer.span("student"):
                    losses = [trainer.forward_backward(xi, yi, rows / batch if group is not None else 1.0)
                              for trainer, (xi, yi) in zip(trainers, pairs)]
                if group is not None:
                    with tracer.span("comm"):
                        reduced = [allreduce_gradients(trainer.parameters_with_grad(), loss, group, last)
                                   for trainer, loss in zip(trainers, losses)]
                    losses = [loss for loss, _ in reduced]
                    last = any(flag for _, flag in reduced)
                if not execution.decoupled and ctx.distributed:
                    with tracer.span("wait"):
                        dist.barrier(group=ctx.group)
                with tracer.span("student"):
                    for trainer, loss in zip(trainers, losses):
                        trainer.apply(loss)
                        report.blocks[trainer.index].add(float(loss))
                done += 1
                try:
                    finish_step(ctx, done, epochs * steps, steps, trainers, report, checkpoints, last)
                except RunStopped:
                    if sender is not None:  # the next stage runs to this step too: let it have its input
                        sender.flush()
                    raise
        if sender is not None:
            with tracer.span("send"):
                sender.flush()
        if j == 0:
            for index, trainer in zip(stage.blocks, trainers):
                save_block(index, trainer.state_dict())
        else:
            report.blocks = {}  # the stage's first device reports its blocks
        return report


def _stage_groups(ctx: WorkerContext, plan: Plan) -> List:
    """A process group per multi-device stage (every rank creates every group, in the same order)."""
    groups = []
    for k, stage in enumerate(plan.stages):
        groups.append(dist.new_group(plan.ranks(k)) if stage.devices > 1 and ctx.distributed else None)
    return groups


def _agree(ctx: WorkerContext, plan: Plan) -> None:
    """Every worker must have derived the same plan (same config everywhere), or the relay would mismatch."""
    mine = plan.to_dict()["stages"]
    plans: List = [None] * ctx.world_size
    dist.all_gather_object(plans, mine, group=ctx.group)
    if any(other != mine for other in plans):
        raise RuntimeError(f"workers disagree on the plan: {plans}; start every worker with the same config "
                           "and code")
