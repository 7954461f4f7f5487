"""The ``reference`` executor: one process; the teacher runs once per step and every block trains on its relay."""

from __future__ import annotations

import torch

from ..distill.trainer import BlockTrainer
from ..job import Job
from .base import BlockReport, Executor, WorkerContext, WorkerReport, register

__all__ = ["ReferenceExecutor"]


@register
class ReferenceExecutor(Executor):
    """Single-process ground truth: per step, T_0..T_{N-1} run once and each S_i trains on (x_i, T_i(x_i))."""

    name = "reference"
    needs_process_group = False

    def check(self, world_size, num_blocks=None):
        if world_size != 1:
            raise ValueError(f"the reference executor runs on 1 worker, not {world_size}; "
                             "use --workers 1 or a parallel executor (dp, ...)")

    def run_worker(self, ctx: WorkerContext, job: Job, save_block) -> WorkerReport:
        spec, device = job.spec, ctx.device
        teacher = [block.to(device) for block in spec.teacher]
        trainers = [BlockTrainer(i, block.to(device), job.config.distill, job.steps_per_block)
                    for i, block in enumerate(spec.student)]
        blocks = [BlockReport() for _ in trainers]
        report, tracer = WorkerReport(ctx.rank, label="reference: all blocks"), ctx.tracer
        for epoch in range(job.config.distill.epochs):
            batches = iter(job.loader(epoch))
            while True:
                with tracer.span("data"):
                    images = next(batches, None)
                if images is None:
                    break
                x = images[0].to(device)
                report.count("samples_loaded", len(x))
                for i, (block, trainer) in enumerate(zip(teacher, trainers)):
                    with tracer.span("teacher"), torch.no_grad():
                        y = block(x)
                    report.count("teacher_block_forwards", len(x))
                    with tracer.span("student"):
                        blocks[i].add(trainer.step(x, y))
                    x = y
            for block_report in blocks:
                block_report.end_epoch()
        for i, trainer in enumerate(trainers):
            save_block(i, trainer.state_dict())
            report.blocks[i] = blocks[i]
        return report
