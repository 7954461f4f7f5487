"""The ``pipebd`` executor: teacher relaying across stages, with decoupled parameter updates (Pipe-BD)."""

from __future__ import annotations

import logging
from typing import List

import torch
import torch.distributed as dist

from ..distill.trainer import BlockTrainer
from ..job import Job
from ..plan.cost import job_block_costs
from ..plan.partition import balanced_boundaries, check_boundaries, stage_blocks
from .base import BlockReport, Executor, WorkerContext, WorkerReport, register
from .comm import Receiver, Sender

__all__ = ["PipeBDExecutor", "stage_boundaries"]

_logger = logging.getLogger(__name__)


def stage_boundaries(job: Job, stages: int) -> List[int]:
    """First block of each stage: ``execution.boundaries`` if given, else balanced on block cost."""
    given = job.config.execution.boundaries
    if given is not None:
        return check_boundaries(given, job.num_blocks, stages)
    return balanced_boundaries([t + s for t, s in job_block_costs(job)], stages)


@register
class PipeBDExecutor(Executor):
    """Each worker is a stage owning a contiguous range of blocks.

    Per step, stage 0 loads the batch; every stage receives the activation entering its first block (from the
    previous stage), runs its teacher blocks once under ``no_grad``, sends the activation leaving its last
    block on (asynchronously, ``execution.queue_depth`` in flight), and trains its student blocks on the
    activations it holds. With ``execution.decoupled`` (DPU) a stage steps its optimizers as soon as its
    backward ends; without, every stage waits at a global barrier before each step (TR only).
    Every sample passes each teacher block once and is loaded once.
    """

    name = "pipebd"
    needs_process_group = True

    def check(self, world_size, num_blocks=None):
        if num_blocks is not None and world_size > num_blocks:
            raise ValueError(f"pipebd gives every worker a stage of at least one block: {world_size} workers > "
                             f"{num_blocks} blocks; use at most {num_blocks} workers")
        given = self.config.execution.boundaries
        if given is not None and num_blocks is not None:
            check_boundaries(given, num_blocks, world_size)

    def run_worker(self, ctx: WorkerContext, job: Job, save_block) -> WorkerReport:
        spec, device, stage, stages = job.spec, ctx.device, ctx.rank, ctx.world_size
        boundaries = stage_boundaries(job, stages)
        blocks = stage_blocks(boundaries, job.num_blocks)[stage]
        batch = job.config.data.batch_size
        shape_in = (batch,) + spec.shapes[blocks.start][0]
        if ctx.distributed:
            _agree(ctx, boundaries)
        execution, tracer = job.config.execution, ctx.tracer
        teacher = [spec.teacher[i].to(device) for i in blocks]
        trainers = [BlockTrainer(i, spec.student[i].to(device), job.config.distill, job.steps_per_block)
                    for i in blocks]
        block_reports = [BlockReport() for _ in blocks]
        report = WorkerReport(ctx.rank, label=f"stage {stage}: blocks {blocks.start}-{blocks.stop - 1}")
        epochs, steps = job.config.distill.epochs, job.order.steps_per_epoch
        receiver = sender = None
        if stage > 0:
            receiver = Receiver(stage - 1, shape_in, job.spec.sample.dtype, device, execution.queue_depth,
                                epochs * steps, ctx.timeout, ctx.group)
        if stage < stages - 1:
            sender = Sender(stage + 1, execution.queue_depth, ctx.timeout, ctx.group)
        for epoch in range(epochs):
            source = iter(job.loader(epoch)) if stage == 0 else None
            for _ in range(steps):
                if source is not None:
                    with tracer.span("data"):
                        x = next(source)[0].to(device)
                    report.count("samples_loaded", len(x))
                else:
                    with tracer.span("recv"):
                        x = receiver.recv()
                pairs = []
                with tracer.span("teacher"), torch.no_grad():
                    for block in teacher:
                        y = block(x)
                        pairs.append((x, y))
                        x = y
                report.count("teacher_block_forwards", batch * len(teacher))
                if sender is not None:
                    with tracer.span("send"):
                        sender.send(x)
                with tracer.span("student"):
                    losses = [trainer.forward_backward(xi, yi) for trainer, (xi, yi) in zip(trainers, pairs)]
                if not execution.decoupled and ctx.distributed:
                    with tracer.span("wait"):
                        dist.barrier(group=ctx.group)
                with tracer.span("student"):
                    for trainer, loss, block_report in zip(trainers, losses, block_reports):
                        trainer.apply(loss)
                        block_report.add(float(loss))
            for block_report in block_reports:
                block_report.end_epoch()
        if sender is not None:
            with tracer.span("send"):
                sender.flush()
        for index, trainer, block_report in zip(blocks, trainers, block_reports):
            save_block(index, trainer.state_dict())
            report.blocks[index] = block_report
        return report


def _agree(ctx: WorkerContext, boundaries: List[int]) -> None:
    """Every stage must have derived the same plan (same config everywhere), or the relay would mismatch."""
    plans: List = [None] * ctx.world_size
    dist.all_gather_object(plans, boundaries, group=ctx.group)
    if any(plan != boundaries for plan in plans):
        raise RuntimeError(f"workers disagree on the stage boundaries: {plans}; start every worker with the "
                           "same config and code")
