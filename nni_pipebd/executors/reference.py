"""The ``reference`` executor: one process; the teacher runs once per step and every block trains on its relay."""

from __future__ import annotations

import torch

from ..distill.trainer import BlockTrainer
from ..job import Job
from .base import BlockReport, Executor, WorkerContext, WorkerReport, finish_step, register, restore_stage
from .faults import inject

__all__ = ["ReferenceExecutor"]


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
        spec, device, tracer = job.spec, ctx.device, ctx.tracer
        teacher = [block.to(device) for block in spec.teacher]
        trainers = [BlockTrainer(i, block.to(device), job.config.distill, job.steps_per_block)
                    for i, block in enumerate(spec.student)]
        report = WorkerReport(ctx.rank, label="reference: all blocks")
        report.blocks = {i: BlockReport() for i in range(job.num_blocks)}
        ctx.announce(report.label)
        checkpoints = ctx.checkpointer("reference", job.config.execution.checkpoint_every)
        done = restore_stage(ctx.resume_state(["reference"], "reference"), trainers, report)
        steps = job.order.steps_per_epoch
        for epoch in range(done // steps, job.config.distill.epochs):
            batches = iter(job.loader(epoch, start_step=done % steps if epoch == done // steps else 0))
            while True:
                with tracer.span("data"):
                    images = next(batches, None)
                if images is None:
                    break
                last = ctx.stop.poll(leader=True)
                inject(ctx.rank, done)
                x = images[0].to(device)
                report.count("samples_loaded", len(x))
                for i, (block, trainer) in enumerate(zip(teacher, trainers)):
                    with tracer.span("teacher"), torch.no_grad():
                        y = block(x)
                    report.count("teacher_block_forwards", len(x))
                    with tracer.span("student"):
                        report.blocks[i].add(trainer.step(x, y))
                    x = y
                done += 1
                finish_step(ctx, done, job.config.distill.epochs * steps, steps, trainers, report, checkpoints, last)
        for i, trainer in enumerate(trainers):
            save_block(i, trainer.state_dict())
        return report

