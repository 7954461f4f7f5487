"""The ``dp`` executor: DNA's baseline — blocks one after another, each data-parallel over all workers."""

from __future__ import annotations

from typing import Optional

import torch

from ..data.order import shard_sizes
from ..distill.trainer import BlockTrainer
from ..job import Job
from .base import BlockReport, Executor, WorkerContext, WorkerReport, register, stage_state
from .comm import allreduce_gradients
from .faults import inject
from .syncbn import convert_sync_batchnorm

__all__ = ["DataParallelExecutor", "train_block_on_prefix"]


def train_block_on_prefix(ctx: WorkerContext, job: Job, index: int, report: WorkerReport, rank: int = 0,
                          world: int = 1, hook=None, group=None, scale: float = 1.0, checkpoint=None,
                          start: Optional[dict] = None, step_base: int = 0,
                          progress_total: Optional[int] = None, leader: bool = True) -> BlockTrainer:
    """Train block ``index`` for all epochs, re-running teacher blocks 0..index on every batch (shard).

    ``report.blocks[index]`` collects the losses. ``checkpoint(steps_done, trainer, force)`` is called after every
    step but the block's last (``force``: a stop was decided, write it whatever ``checkpoint_every`` says);
    ``start`` is a :meth:`BlockTrainer.full_state` to continue from, and ``step_base`` the worker's steps before
    this block (for fault injection). ``hook(params, loss, stop) -> (loss, stop)`` reduces gradients and the stop
    flag over the workers; ``leader``: this worker may decide a stop (rank 0 of a group, every worker alone).
    A stop decided at the block's last step returns normally with ``ctx.stop.pending`` set (the caller saves the
    block, then stops); elsewhere it raises :class:`~nni_pipebd.executors.stopping.RunStopped` (after the
    checkpoint, or without one when there is no ``checkpoint``). Returns the trained trainer.
    """
    device, tracer = ctx.device, ctx.tracer
    teacher = [block.to(device) for block in job.spec.teacher[:index + 1]]
    student = job.spec.student[index].to(device)
    if group is not None and world > 1 and job.config.execution.sync_bn:
        student = convert_sync_batchnorm(student, group, device.type)
    trainer = BlockTrainer(index, student, job.config.distill, job.steps_per_block)
    if start is not None:
        trainer.load_full_state(start)
    block_report = report.blocks.setdefault(index, BlockReport())
    steps, done = job.order.steps_per_epoch, trainer.steps
    for epoch in range(done // steps, job.config.distill.epochs):
        batches = iter(job.loader(epoch, rank, world, done % steps if epoch == done // steps else 0))
        while True:
            with tracer.span("data"):
                images = next(batches, None)
            if images is None:
                break
            last = ctx.stop.poll(leader)
            inject(ctx.rank, step_base + done)
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
                    loss, last = hook(trainer.parameters_with_grad(), loss, last)
            with tracer.span("student"):
                trainer.apply(loss)
            block_report.add(float(loss))
            done += 1
            ctx.progress.update(step_base + done, progress_total or job.steps_per_block, report.label)
            if done % steps == 0:
                block_report.end_epoch()
                report.end_epoch()
            if checkpoint is not None and done < job.steps_per_block:
                checkpoint(done, trainer, last)
            if last:
                if done < job.steps_per_block:
                    raise ctx.stop.stop(step_base + done if checkpoint is not None else None)
                ctx.stop.pending = True
    return trainer


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
            def hook(params, loss, stop):
                return allreduce_gradients(params, loss, ctx.group, stop)
        report = WorkerReport(ctx.rank, label=f"rank {ctx.rank}: 1/{world} of every batch, blocks in turn")
        ctx.announce(report.label)
        keys = [f"rank{r}" for r in range(world)]
        checkpoints = ctx.checkpointer(keys[ctx.rank], job.config.execution.checkpoint_every)
        state = ctx.resume_state(keys, keys[ctx.rank])
        spb, done = job.steps_per_block, 0
        if state is not None:
            done = int(state["steps_done"])
            report.blocks = {int(i): BlockReport.from_dict(r) for i, r in state["reports"].items()}
            report.counters = dict(state["counters"])

        for i in range(done // spb, job.num_blocks):
            def checkpoint(steps_done, trainer, force=False, i=i):
                if force or checkpoints.due(i * spb + steps_done):
                    checkpoints.save(i * spb + steps_done, stage_state([trainer], report))

            start = state["trainers"][i] if state is not None and i == done // spb and done % spb else None
            trainer = train_block_on_prefix(ctx, job, i, report, ctx.rank, world, hook, ctx.group, weight,
                                            checkpoint, start, i * spb, job.num_blocks * spb, ctx.rank == 0)
            if ctx.rank == 0:
                save_block(i, trainer.state_dict())
            stop = ctx.stop.pending and i + 1 < job.num_blocks
            if checkpoints.every or stop:  # the block is saved: a resume starts with the next one
                checkpoints.save((i + 1) * spb, stage_state([], report))
            if stop:
                raise ctx.stop.stop((i + 1) * spb)
        if ctx.rank != 0:
            report.blocks = {}
        return report
