"""The one stage runtime: every executor's plan runs here — receive, teacher, send, student steps, all-reduce."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..distill.convergence import plateaued
from ..distill.trainer import BlockTrainer
from ..job import Job
from ..plan.plan import Phase, Placement, Plan, RankRoutes
from ..precision import autocast, cast_dtype, formatted, memory_format, wire_dtype
from .base import BlockReport, WorkerContext, WorkerReport, stage_state
from .comm import (FlagReceiver, FlagSender, Receiver, Sender, allreduce_gradients, allreduce_path_split,
                   data_parallel)
from .faults import inject
from .syncbn import convert_sync_batchnorm

__all__ = ["run_plan", "stage_label"]


def run_plan(ctx: WorkerContext, job: Job, plan: Plan, save_block, label: Optional[str] = None,
             keys: Optional[Sequence[str]] = None) -> WorkerReport:
    """Run this rank's share of ``plan``: its phases in order, every step of every epoch.

    Per step of a phase, a rank serving a relay link loads its rows (first link) or receives them (every other),
    runs its teacher blocks once under ``no_grad``, sends the activation on and the input/target rows of its blocks
    to students trained elsewhere; a rank training students assembles their rows, runs forward and backward,
    all-reduces the gradients inside a multi-device placement (a batch split: BatchNorm synchronised with
    ``execution.sync_bn``, one flat all-reduce after backward, or with ``execution.grad_sync: ddp`` DDP's bucketed
    ones during it; a path split, ``Placement.split == 'paths'``: each rank runs its share of the step's paths on
    the whole batch, then one flat all-reduce sums every gradient, which parameters any rank touched, and the
    paths' BatchNorm statistics, replayed in path order), waits at a barrier when ``execution.decoupled`` is off,
    and steps. A single-rank student fed from a later link of the chain (``RankRoutes.late``) trains one step late,
    on the previous step's feed, so that no step waits for the links after its own; it catches up at every epoch
    end, checkpoint and last step (the same batches in the same order: the same weights). The phase's leader
    decides a stop and the decision travels with the step's messages, so every rank of a phase ends after the same
    step. A finished block is saved by the first rank of its placement.

    ``keys``: the checkpoint name of every rank (default ``rank<r>``); a plan whose phases do not all span every
    rank (``ls``) writes no resumable checkpoints.
    """
    execution, batch = job.config.execution, job.config.data.batch_size
    plan.validate(job.num_blocks, ctx.world_size, batch, job.config.distill.paths_per_step)
    groups = _groups(ctx, plan)
    mine = [phase for phase in plan.phases if ctx.rank in phase.ranks]
    per_phase = job.config.distill.epochs * job.order.steps_per_epoch
    report = WorkerReport(ctx.rank, label=label or stage_label(plan, ctx.rank))
    ctx.announce(report.label)
    keys = list(keys or [f"rank{r}" for r in range(ctx.world_size)])
    checkpoints = ctx.checkpointer(keys[ctx.rank], execution.checkpoint_every)
    state = ctx.resume_state(keys, keys[ctx.rank]) if plan.resumable else None
    done = 0
    if state is not None:
        done = int(state["steps_done"])
        report.blocks = {int(i): BlockReport.from_dict(r) for i, r in state["reports"].items()}
        report.counters = dict(state["counters"])
    if ctx.rank == 0:
        ctx.metrics.start(job.num_blocks)
    run = _Run(ctx, job, plan, groups, report, checkpoints, len(mine) * per_phase)
    for n, phase in enumerate(mine):
        begin = n * per_phase
        if done >= begin + per_phase:
            continue  # finished before an interruption: its blocks are saved
        start = state if state is not None and done > begin else None
        trainers = run.phase(phase, done - begin, begin, start)
        done = begin + per_phase
        for placement in phase.students:
            if placement.ranks[0] == ctx.rank:
                save_block(placement.block, trainers[placement.block].state_dict())
        more = n + 1 < len(mine)
        if more and (checkpoints.every or ctx.stop.pending) and plan.resumable:
            ctx.metrics.flush()
            checkpoints.save(done, stage_state([], report))  # the blocks are saved: a resume starts after them
        if more and ctx.stop.pending:
            raise ctx.stop.stop(done if plan.resumable else None)
    report.blocks = {p.block: report.blocks[p.block] for phase in mine for p in phase.students
                     if p.ranks[0] == ctx.rank}
    return report


def stage_label(plan: Plan, rank: int) -> str:
    """What ``rank`` does, for progress bars, failures and traces (``stage 0 (device 1/2): blocks 0-2``)."""
    if plan.is_pipeline:
        k, j = plan.locate(rank)
        stage = plan.stages[k]
        where = f" (device {j + 1}/{stage.devices})" if stage.devices > 1 else ""
        return f"stage {k}{where}: blocks {stage.start}-{stage.stop - 1}"
    parts = []
    for phase in plan.phases:
        if rank not in phase.ranks:
            continue
        teacher = [f"{r.start}-{r.stop - 1}" for r in phase.relays if rank in r.ranks]
        students = [p.block for p in phase.students if rank in p.ranks]
        parts.append(("teacher " + teacher[0] + ", " if teacher else "") + f"students {students}")
    return f"rank {rank}: " + "; ".join(parts)


def _groups(ctx: WorkerContext, plan: Plan) -> Dict[Tuple[int, ...], object]:
    """A process group per multi-rank placement and per phase not spanning the world (every rank creates every
    group, in plan order, as torch.distributed requires)."""
    groups: Dict[Tuple[int, ...], object] = {}
    if not ctx.distributed:
        return groups
    world = tuple(range(ctx.world_size))
    for phase in plan.phases:
        for ranks in [p.ranks for p in phase.students] + [phase.ranks]:
            key = tuple(sorted(ranks))
            if len(key) > 1 and key not in groups:
                groups[key] = ctx.group if key == world else dist.new_group(list(key))
    return groups


class _Run:
    """One rank's run of its phases: the shared state of every step."""

    def __init__(self, ctx: WorkerContext, job: Job, plan: Plan, groups, report: WorkerReport, checkpoints,
                 total: int):
        self.ctx, self.job, self.plan, self.groups, self.report = ctx, job, plan, groups, report
        self.checkpoints, self.total = checkpoints, total
        self.batch = job.config.data.batch_size
        self.steps = job.order.steps_per_epoch
        self.converged: set = set()
        self.reporting: set = set()

    def phase(self, phase: Phase, first: int, base: int, state: Optional[dict]) -> Dict[int, BlockTrainer]:
        """Run ``phase`` from its step ``first``; ``base``: this rank's steps before the phase. Returns the
        trainers of the blocks trained here.

        With ``distill.until: plateau`` the phase shrinks at every epoch end to the blocks that have not converged
        (and the relay links they need): a rank left without work idles through the steps (it still follows the
        leader's stop decisions), and the phase ends when every block has converged.
        """
        ctx, job, tracer = self.ctx, self.job, self.ctx.tracer
        execution, device, spec, distill = job.config.execution, ctx.device, job.spec, job.config.distill
        own = self.plan.routes(phase, ctx.rank, self.batch)
        precision, channels_last = execution.precision, execution.channels_last
        layout, dtype = memory_format(channels_last), cast_dtype(precision)
        linked = own.relay_in or own.relay_out or own.feeds_out or any(v is not None for v in own.feeds_in.values())
        # what relayed tensors hold, probed before the teacher forwards are counted
        dtypes = spec.dtypes(device, precision, channels_last) if linked else None
        teacher = {}
        if own.relay is not None:
            teacher = {i: spec.teacher[i].to(device, dtype, memory_format=layout)
                       for i in phase.relays[own.relay].blocks}
        trainers: Dict[int, BlockTrainer] = {}
        scales: Dict[int, float] = {}
        shares: Dict[int, Tuple[int, int]] = {}  # path splits: (this rank's index, ranks)
        for placement in own.students:
            student = spec.student[placement.block].to(device, dtype, memory_format=layout)
            group = self.groups.get(tuple(sorted(placement.ranks)))
            batch_split = group is not None and placement.split == "batch"
            if batch_split and execution.sync_bn:  # a path split gives every rank the whole batch: nothing to sync
                student = convert_sync_batchnorm(student, group, device.type)
            trainers[placement.block] = BlockTrainer(placement.block, student, distill, job.steps_per_block,
                                                     precision)
            if batch_split and execution.grad_sync == "ddp":  # gradients summed during backward
                trainers[placement.block].forward_module = data_parallel(student, group, device)
            lo, hi = placement.rows(self.batch, ctx.rank)
            scales[placement.block] = (hi - lo) / self.batch if batch_split else 1.0
            if group is not None and placement.split == "paths":
                shares[placement.block] = (placement.ranks.index(ctx.rank), len(placement.ranks))
            self.report.blocks.setdefault(placement.block, BlockReport())
        self.converged = set(state.get("converged", [])) if state is not None else set()
        self.reporting = {p.block for p in own.students if p.ranks[0] == ctx.rank}
        if state is not None:
            for block, trainer in trainers.items():
                trainer.load_full_state(state["trainers"][block])
        plateau = distill.until == "plateau"
        barrier = None if execution.decoupled else self.groups.get(phase.ranks)
        counted = [block.register_forward_hook(self._count) for block in teacher.values()]
        epochs, done, links = distill.epochs, first, None
        try:
            for epoch in range(first // self.steps, epochs):
                active = self._active(phase)
                if active is None:
                    break  # every block of the phase has converged
                skip = first % self.steps if epoch == first // self.steps else 0
                routes = self._routes(phase, active)
                if links is None or plateau:  # with plateau the links end with the epoch (the phase may shrink)
                    span = self.steps - skip if plateau else epochs * self.steps - done
                    relay = active.relays[routes.relay] if routes.relay is not None else None
                    links = _Links(ctx, job, active, routes, span, relay, dtypes)
                training = {b: trainers[b] for b in sorted(trainers) if b not in self.converged}
                placements = [p for p in routes.students if p.block in training]
                source = None
                if relay is not None and routes.relay == 0:
                    source = iter(job.loader(epoch, relay.ranks.index(ctx.rank), len(relay.ranks), skip,
                                             pin_memory=device.type == "cuda"))
                for _ in range(skip, self.steps):
                    last = ctx.stop.poll(leader=ctx.rank == active.leader)
                    inject(ctx.rank, base + done)
                    last = links.exchange_flag(last)
                    pairs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
                    if relay is not None:
                        if source is not None:
                            with tracer.span("data"):
                                x = formatted(next(source)[0].to(device, dtype, non_blocking=True), channels_last)
                            self.report.count("samples_loaded", len(x))
                        else:
                            with tracer.span("recv"):
                                x, flag = links.receive_relay()
                            last = last or flag
                        with tracer.span("teacher"), torch.no_grad(), autocast(precision, device):
                            for i in relay.blocks:
                                y = formatted(teacher[i](x), channels_last)
                                pairs[i] = (x, y)
                                x = y
                        with tracer.span("send"):
                            links.send(x, pairs, last)
                    losses = {}
                    for block in links.feed_order():  # own rows first: fed blocks' senders run meanwhile
                        with tracer.span("recv"):
                            pair, flag = links.receive_feed(block, pairs)
                        last = last or flag
                        if block in training:
                            with tracer.span("student"):
                                losses[block] = training[block].forward_backward(*pair, scales[block],
                                                                                 share=shares.get(block))
                    for placement in placements:
                        group = self.groups.get(tuple(sorted(placement.ranks)))
                        if group is not None and placement.block in shares:
                            trainer = training[placement.block]
                            with tracer.span("comm"):
                                losses[placement.block], flag, stats = allreduce_path_split(
                                    trainer.trainable_parameters(), losses[placement.block], group, last,
                                    trainer.batchnorm_stats)
                            trainer.replay_batchnorm(stats)
                            last = last or flag
                        elif group is not None:
                            trainer = training[placement.block]
                            # with grad_sync: ddp the gradients were summed in backward: only loss and stop flag
                            params = [] if trainer.forward_module is not trainer.student else \
                                trainer.parameters_with_grad()
                            with tracer.span("comm"):
                                losses[placement.block], flag = allreduce_gradients(params, losses[placement.block],
                                                                                    group, last)
                            last = last or flag
                    if barrier is not None:
                        with tracer.span("wait"):
                            dist.barrier(group=barrier)
                    with tracer.span("student"):
                        for block, trainer in training.items():
                            if block in losses:
                                self._apply(block, trainer, losses[block])
                    if links.late:  # caught up at epoch ends, checkpoints and the last step: nothing left pending
                        drain = last or (done + 1) % self.steps == 0 or self.checkpoints.due(base + done + 1)
                        last = self._late(links, training, last, drain)
                    done += 1
                    if plateau and done % self.steps == 0:
                        links.flush()  # before the epoch's decision: the next epoch has links of its own
                    self._end_step(phase, base + done, done, trainers, last, links)
            if links is not None:
                links.flush()
        finally:
            for handle in counted:
                handle.remove()
        for block in trainers:
            self.report.blocks[block].stop("epochs")  # the blocks that did not converge before the cap
        return trainers

    def _apply(self, block: int, trainer: BlockTrainer, loss: torch.Tensor) -> None:
        """Step ``block``'s optimizer on the gradients of ``loss`` and record the loss."""
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.apply(loss)
        self.report.blocks[block].add(float(loss))
        if block in self.reporting:
            self.ctx.metrics.step(block, trainer.steps, float(loss), lr)

    def _late(self, links: "_Links", training: Dict[int, BlockTrainer], last: bool, drain: bool) -> bool:
        """Train this rank's late blocks (fed from later links, see ``RankRoutes.late``) on the previous step's
        feed and, at a ``drain`` step, on this step's too; returns ``last`` with the feeds' stop flags."""
        tracer = self.ctx.tracer
        for block in links.late:
            trainer = training.get(block)
            if trainer is None:
                continue
            rounds = [True] * (block in links.pending) + [False] * drain
            for previous in rounds:
                with tracer.span("recv"):
                    pair, flag = links.receive_feed(block, {})
                if flag and previous:  # the relay tells a link rank the leader's decision before any feed
                    raise RuntimeError(f"rank {self.ctx.rank}: the feed of late student block {block} marks the "
                                       "previous step as the last, but no earlier message did (a plan routing bug)")
                last = last or flag
                with tracer.span("student"):
                    self._apply(block, trainer, trainer.forward_backward(*pair))
            if drain:
                links.pending.discard(block)
            else:
                links.pending.add(block)
        return last

    def _active(self, phase: Phase) -> Optional[Phase]:
        """``phase`` without its converged blocks and the relay links after the last block still training."""
        students = tuple(p for p in phase.students if p.block not in self.converged)
        if not students:
            return None
        last = max(p.block for p in students)
        return Phase(tuple(r for r in phase.relays if r.start <= last), students)

    def _routes(self, phase: Phase, active: Phase) -> RankRoutes:
        """This rank's routes in ``active``; ranks of ``phase`` left without work get the leader's stop decisions."""
        routes = self.plan.routes(active, self.ctx.rank, self.batch)
        idle = [r for r in phase.ranks if r not in active.ranks]
        if self.ctx.rank == active.leader:
            routes.flag_to = routes.flag_to + idle
        elif self.ctx.rank in idle:
            routes.flag_from = active.leader
        return routes

    def _decide(self, phase: Phase) -> None:
        """At an epoch end: which blocks have converged (each block's first rank decides from its epoch losses;
        every rank of the phase learns all decisions)."""
        distill, report = self.job.config.distill, self.report
        flags = torch.zeros(self.job.num_blocks, device=self.ctx.device)
        for placement in phase.students:
            block = placement.block
            if placement.ranks[0] == self.ctx.rank and block not in self.converged and \
                    plateaued(report.blocks[block].losses, distill.patience, distill.min_improvement):
                flags[block] = 1.0
        group = self.groups.get(phase.ranks)
        if group is not None:
            dist.all_reduce(flags, group=group)
        for block in torch.nonzero(flags).flatten().tolist():
            self.converged.add(block)
            if block in report.blocks:
                report.blocks[block].stop("plateau")

    def _count(self, _module, inputs, _output) -> None:
        self.report.count("teacher_block_forwards", inputs[0].shape[0])

    def _end_step(self, phase: Phase, done: int, in_phase: int, trainers: Dict[int, BlockTrainer], last: bool,
                  links) -> None:
        """Progress, epoch ends (with ``until: plateau``, which blocks converged), due checkpoints; a stop decided
        at this step ends the run here (after a checkpoint when resumable) — or, at a phase's last step, after its
        blocks are saved."""
        ctx, report = self.ctx, self.report
        ctx.progress.update(done, self.total, report.label)
        if in_phase % self.steps == 0:
            ended = {}
            for block in trainers:
                losses = report.blocks[block].losses
                count = len(losses)
                report.blocks[block].end_epoch()
                if block in self.reporting and len(losses) > count:
                    ended[block] = (len(losses), losses[-1])
            report.end_epoch()
            before = set(self.converged)
            if self.job.config.distill.until == "plateau":
                self._decide(phase)
            ctx.metrics.epoch(ended, {b: len(report.blocks[b].losses) for b in self.converged - before
                                      if b in self.reporting})
        phase_end = in_phase == self.job.config.distill.epochs * self.steps
        stop = last and done < self.total and not phase_end
        if last and phase_end and done < self.total:
            ctx.stop.pending = True
        if self.plan.resumable and (self.checkpoints.due(done) or stop) and not phase_end:
            ctx.metrics.flush()
            self.checkpoints.save(done, stage_state(list(trainers.values()), report, self.converged))
        if stop:
            links.flush()  # the ranks after this one run to this step too: let them have their input
            raise ctx.stop.stop(done if self.plan.resumable else None)


class _Links:
    """This rank's messages in one phase: the relay in and out, the feeds of students trained elsewhere, and the
    leader's stop decision where no other message would carry it in time."""

    def __init__(self, ctx: WorkerContext, job: Job, phase: Phase, routes: RankRoutes, steps: int, relay,
                 dtypes: Optional[List[Tuple[torch.dtype, torch.dtype]]]):
        execution, spec, device = job.config.execution, job.spec, ctx.device
        depth, timeout, group = execution.queue_depth, ctx.timeout, ctx.group
        self.rank, self.routes, self.phase, self.relay = ctx.rank, routes, phase, relay
        self.batch = job.config.data.batch_size
        self.dtypes, self.channels_last = dtypes, execution.channels_last
        lo, hi = routes.rows
        self.relay_in = self.relay_out = None
        if routes.relay_in:
            self.relay_in = Receiver([(src, a - lo, b - lo) for src, a, b in routes.relay_in],
                                     (hi - lo,) + tuple(spec.shapes[relay.start][0]), dtypes[relay.start][0], device,
                                     depth, steps, timeout, group)
        if routes.relay_out:
            self.relay_out = Sender([(dst, a - lo, b - lo) for dst, a, b in routes.relay_out], depth, timeout, group)
        self.feeds_out: Dict[int, Sender] = {}
        for block in sorted({b for b, _, _, _ in routes.feeds_out}):
            paths = [(dst, a - lo, b - lo) for i, dst, a, b in routes.feeds_out if i == block]
            self.feeds_out[block] = Sender(paths, depth, timeout, group, tag=_feed_tag(block))
        self.feeds_in: Dict[int, Tuple[Optional[Receiver], List, Tuple[int, int], Placement]] = {}
        for placement in routes.students:
            sources = routes.feeds_in[placement.block]
            if sources is None:
                continue
            p_lo, p_hi = placement.rows(self.batch, ctx.rank)
            shape_in, shape_out = spec.shapes[placement.block]
            width = _numel(shape_in) + _numel(shape_out)
            remote = [(src, a - p_lo, b - p_lo) for src, a, b in sources if src != ctx.rank]
            local = [(a, b) for src, a, b in sources if src == ctx.rank]
            receiver = Receiver(remote, (p_hi - p_lo, width), wire_dtype(*dtypes[placement.block]), device, depth,
                                steps, timeout, group, tag=_feed_tag(placement.block)) if remote else None
            self.feeds_in[placement.block] = (receiver, local, (p_lo, p_hi), placement)
        self.shapes = spec.shapes
        self.flag_in = (FlagReceiver(routes.flag_from, steps, depth, timeout, device, group)
                        if routes.flag_from is not None else None)
        self.flag_out = FlagSender(routes.flag_to, depth, timeout, device, group) if routes.flag_to else None
        self.late = routes.late
        self.pending: set = set()  # late blocks whose previous step's feed is still to be trained on

    def exchange_flag(self, last: bool) -> bool:
        if self.flag_out is not None:
            self.flag_out.send(last)
        if self.flag_in is not None:
            last = last or self.flag_in.recv()
        return last

    def receive_relay(self) -> Tuple[torch.Tensor, bool]:
        x = self.relay_in.recv()  # plain layout on the wire; the blocks take the setting's
        return formatted(x, self.channels_last), self.relay_in.stop

    def send(self, x: torch.Tensor, pairs, last: bool) -> None:
        if self.relay_out is not None:
            block = self.relay.blocks[-1]
            _expect(x, self.dtypes[block][1], f"the output of teacher block {block}")
            self.relay_out.send(x, last)
        for block, sender in self.feeds_out.items():
            sender.send(self._pack(block, *pairs[block]), last)

    def _pack(self, block: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype_in, dtype_out = self.dtypes[block]
        _expect(x, dtype_in, f"the input of teacher block {block}")
        _expect(y, dtype_out, f"the output of teacher block {block}")
        return _pack(x, y, wire_dtype(dtype_in, dtype_out))

    def feed_order(self) -> List[int]:
        """The student blocks this rank trains within the step, in order: single-rank blocks on this rank's own
        relay rows first, then single-rank blocks fed by other ranks (their senders compute meanwhile), then
        multi-rank blocks by index — the same order on every rank of their group, since their BatchNorm and gradient
        collectives run inside forward and backward. Late blocks (fed from later links) come after the step."""
        def key(placement: Placement) -> Tuple[int, int]:
            if len(placement.ranks) > 1:
                return 2, placement.block
            return int(placement.block in self.feeds_in), placement.block

        return [p.block for p in sorted(self.routes.students, key=key) if p.block not in self.late]

    def receive_feed(self, block: int, pairs) -> Tuple[Tuple[torch.Tensor, torch.Tensor], bool]:
        """(input, target) of student block ``block`` trained here, and whether its sender marked the step as last."""
        if block not in self.feeds_in:  # trained on this rank's own relay rows
            return pairs[block], False
        receiver, local, (p_lo, p_hi), _ = self.feeds_in[block]
        packed, stop = None, False
        if receiver is not None:
            packed = receiver.recv()
            stop = receiver.stop
        if local:
            mine, lo = self._pack(block, *pairs[block]), self.routes.rows[0]
            if packed is None:
                packed = torch.empty((p_hi - p_lo,) + mine.shape[1:], dtype=mine.dtype, device=mine.device)
            for a, b in local:
                packed[a - p_lo:b - p_lo].copy_(mine[a - lo:b - lo])
        x, y = _unpack(packed, *self.shapes[block], *self.dtypes[block])
        return (formatted(x, self.channels_last), formatted(y, self.channels_last)), stop

    def flush(self) -> None:
        for sender in [self.relay_out, self.flag_out, *self.feeds_out.values()]:
            if sender is not None:
                sender.flush()


def _feed_tag(block: int) -> int:
    return 4 + 2 * block  # relay rows and flag: tags 0 and 1, the leader's decision: 2


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _expect(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise when ``tensor`` does not have the dtype its receivers allocated for (the setup probe's)."""
    if tensor.dtype != dtype:
        raise RuntimeError(f"{what} is {tensor.dtype}, but the probe forward at setup gave {dtype} (receive buffers "
                           "are allocated for it); a teacher block whose output dtype depends on its input data "
                           "cannot be relayed — make its output dtype fixed, or use execution.precision: fp32")


def _pack(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A teacher block's input and output rows side by side in ``dtype`` (the wider of theirs), one message per
    peer; :func:`_unpack` casts each half back, exactly."""
    return torch.cat([x.reshape(len(x), -1).to(dtype), y.reshape(len(y), -1).to(dtype)], dim=1)


def _unpack(packed: torch.Tensor, shape_in, shape_out, dtype_in: torch.dtype,
            dtype_out: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    n, width = len(packed), _numel(shape_in)
    return (packed[:, :width].reshape((n,) + tuple(shape_in)).to(dtype_in),
            packed[:, width:].reshape((n,) + tuple(shape_out)).to(dtype_out))

