"""The ``dp`` executor: DNA's baseline — blocks one after another, each data-parallel over all workers."""

from __future__ import annotations

import torch

from ..data.order import shard_sizes
from ..distill.trainer import BlockTrainer
from ..job import Job
from .base import BlockReport, Executor, WorkerContext, WorkerReport, register
from .comm import allreduce_gradients
from .syncbn import convert_sync_batchnorm

__all__ = ["DataParallelExecutor"]


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
        spec, device, world = job.spec, ctx.device, ctx.world_size
        weight = shard_sizes(job.config.data.batch_size, world)[ctx.rank] / job.config.data.batch_size
        teacher = [block.to(device) for block in spec.teacher]
        report = WorkerReport(ctx.rank)
        for i, student in enumerate(spec.student):
            student = student.to(device)
            if world > 1 and job.config.execution.sync_bn:
                student = convert_sync_batchnorm(student, ctx.group, device.type)
            trainer = BlockTrainer(i, student, job.config.distill, job.steps_per_block)
            hook = None
            if world > 1:
                def hook(params, loss):
                    return allreduce_gradients(params, loss, weight, ctx.group)
            block_report = BlockReport()
            for epoch in range(job.config.distill.epochs):
                for images, _ in job.loader(epoch, ctx.rank, world):
                    x = images.to(device)
                    report.count("samples_loaded", len(x))
                    with torch.no_grad():
                        for block in teacher[:i]:
                            x = block(x)
                        y = teacher[i](x)
                    report.count("teacher_block_forwards", len(x) * (i + 1))
                    block_report.add(trainer.step(x, y, hook))
                block_report.end_epoch()
            if ctx.rank == 0:
                save_block(i, trainer.state_dict())
                report.blocks[i] = block_report
        return report
