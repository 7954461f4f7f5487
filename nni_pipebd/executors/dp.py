"""The ``dp`` executor: DNA's baseline — blocks one after another, each data-parallel over all workers."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..data.order import shard_sizes
from ..distill.trainer import BlockTrainer
from ..job import Job
from .base import BlockReport, Executor, WorkerContext, WorkerReport, register
from .comm import allreduce_gradients
from .syncbn import convert_sync_batchnorm

__all__ = ["DataParallelExecutor", "train_block_on_prefix"]


def train_block_on_prefix(ctx: WorkerContext, job: Job, index: int, report: WorkerReport, rank: int = 0,
                          world: int = 1, hook=None, group=None, scale: float = 1.0
                          ) -> Tuple[BlockReport, Dict[str, torch.Tensor]]:
    """Train block ``index`` for all epochs, re-running teacher blocks 0..index on every batch (shard).

    Returns the block's report and its trained ``state_dict``.
    """
    device, tracer = ctx.device, ctx.tracer
    teacher = [block.to(device) for block in job.spec.teacher[:index + 1]]
    student = job.spec.student[index].to(device)
    if group is not None and world > 1 and job.config.execution.sync_bn:
        student = convert_sync_batchnorm(student, group, device.type)
    trainer = BlockTrainer(index, student, job.config.distill, job.steps_per_block)
    block_report = BlockReport()
    for epoch in range(job.config.distill.epochs):
        batches = iter(job.loader(epoch, rank, world))
        while True:
            with tracer.span("data"):
                images = next(batches, None)
            if images is None:
                break
            x = images[0].to(device)
            report.count("samples_loaded", len(x))
            with tracer.span("teacher"), torch.no_grad():
                for block in teacher[:-1]:
                    x = block(x)
                y = teacher[-1](x)
            report.count("teacher_block_forwards", len(x) * (index + 1))
            with tracer.span("student"):
                loss = trainer.forward_backward(x, y, scale)
            if hook is not None:
                with tracer.span("comm"):
                    loss = hook(trainer.parameters_with_grad(), loss)
            with tracer.span("student"):
                trainer.apply(loss)
            block_report.add(float(loss))
        block_report.end_epoch()
    return block_report, trainer.state_dict()


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
        weight = shard_sizes(job.config.data.batch_size, world)[ctx.rank] / job.config.data.batch_size
        hook: Optional[object] = None
        if world > 1:
            def hook(params, loss):
                return allreduce_gradients(params, loss, ctx.group)
        report = WorkerReport(ctx.rank, label=f"rank {ctx.rank}: 1/{world} of every batch, blocks in turn")
        for i in range(job.num_blocks):
            block_report, state = train_block_on_prefix(ctx, job, i, report, ctx.rank, world, hook, ctx.group,
                                                        weight)
            if ctx.rank == 0:
                save_block(i, state)
                report.blocks[i] = block_report
        return report
