"""BlockTrainer: one student block, its optimizer, LR schedule and path sampler; one step from (input, target)."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import DistillConfig
from ..precision import autocast, autocast_dtype, needs_scaler
from .bnstats import BatchNormRecorder
from .loss import get_loss
from .sampler import PathSampler

__all__ = ["BlockTrainer", "NonFiniteLossError"]

_logger = logging.getLogger(__name__)

GradHook = Callable[[List[torch.Tensor], torch.Tensor], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """A block's loss became NaN or infinite."""


class BlockTrainer:
    """Trains student block ``index`` to reproduce its teacher block.

    A step is :meth:`forward_backward` (``paths_per_step`` sampled paths, gradients averaged) followed by
    :meth:`apply` (optimizer and LR schedule step). Executors may act between the two: all-reduce the
    gradients of a data-parallel group, or wait at a barrier.

    Parameters
    ----------
    index : int
        Block index.
    student : nn.Module
        The student block (a supernet with ``choices``/``set_path``, e.g. ``BlockSupernet``, or fixed).
    config : DistillConfig
        Loss, optimizer, schedule, paths per step, seed.
    total_steps : int
        Steps this block will take (length of the cosine schedule).
    precision : str
        ``fp32``, ``bf16``, ``fp16`` or ``fp64`` (``execution.precision``): the student's forward and the loss run
        under that autocast on the input's device (the loss itself in fp32), backward outside it; weights and
        optimizer stay fp32. ``fp16`` scales the loss with a ``torch.amp.GradScaler`` whose state is part of
        :meth:`full_state`. ``fp64`` has no autocast: the runtime gives this trainer a float64 student and float64
        inputs, and everything stays float64 (the recorded BatchNorm statistics of a path split too).

    Attributes
    ----------
    forward_module : nn.Module
        What :meth:`forward_backward` calls: ``student`` itself (the default), or a wrapper of it whose hooks
        reduce the gradients during backward (``DistributedDataParallel``, set by the runtime). A wrapper with
        ``no_sync`` reduces only in the last of the ``paths_per_step`` backward passes. ``student`` stays the
        module that is saved, loaded and given its path.
    batchnorm_stats : torch.Tensor or None
        After a :meth:`forward_backward` with ``share``: the BatchNorm statistics its paths recorded (see
        :class:`~nni_pipebd.distill.bnstats.BatchNormRecorder`), to be summed over the group and passed to
        :meth:`replay_batchnorm`; ``None`` otherwise.
    """

    def __init__(self, index: int, student: nn.Module, config: DistillConfig, total_steps: int,
                 precision: str = "fp32"):
        self._amp = autocast_dtype(precision) is not None  # (a clear error for an unknown name)
        self.index = index
        self.precision = precision
        self.student = student.train()
        self.forward_module: nn.Module = self.student
        self.config = config
        self.loss_fn = get_loss(config.loss)
        self.sampler = PathSampler(getattr(student, "choices", {}), config.seed, index)
        params = [p for p in student.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        elif config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {config.optimizer!r}; valid: ['adam', 'sgd']")
        if config.schedule == "cosine":
            self.scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(1, total_steps))
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.scaler: Optional[torch.amp.GradScaler] = None
        if needs_scaler(precision):
            kind = next((p.device.type for p in params), "cuda")
            self.scaler = torch.amp.GradScaler(kind)
        self.steps = 0
        self.skipped = 0
        self._buffers: List[torch.Tensor] = []
        self.last_paths: List[Dict[str, Any]] = []
        self.batchnorm_stats: Optional[torch.Tensor] = None
        self._recorder: Optional[BatchNormRecorder] = None

    def forward_backward(self, x: torch.Tensor, target: torch.Tensor, scale: float = 1.0,
                         share: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Gradients of ``scale`` x the block loss on (x, target), averaged over the sampled paths.

        A data-parallel rank holding n of the batch's B samples passes ``scale = n / B``: its gradients are
        then its exact share of the whole batch's (BatchNorm synchronisation included) and sum over the
        group. Returns the scaled loss (detached), never multiplied by the fp16 loss scale (the gradients are:
        :meth:`apply` unscales them, so a data-parallel group all-reduces them scaled and every rank's scaler sees
        the same overflow).

        ``share = (index, count)``: the step's paths are split over ``count`` ranks, each with the whole batch.
        All ``paths_per_step`` paths are sampled (every rank's sampler stays in step), but only paths ``j`` with
        ``j % count == index`` run here, each with factor ``1 / paths_per_step``: the gradients and the returned
        loss are this rank's part of the sums over the group. BatchNorm buffers are left as before the step and
        the statistics of its paths kept in :attr:`batchnorm_stats` (see :meth:`replay_batchnorm`).
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.on_nonfinite == "skip":  # a skipped batch must not leave its BatchNorm statistics behind
            self._buffers = [b.detach().clone() for b in self.student.buffers()]
        k = self.config.paths_per_step
        if share is not None and not (0 <= share[0] < share[1] <= k):
            raise ValueError(f"block {self.index}: share {tuple(share)} must be (index, count) with 0 <= index < "
                             f"count <= distill.paths_per_step = {k}; split the paths over at most {k} ranks")
        factor = scale / k
        self.last_paths = []
        self.batchnorm_stats = None
        recorder = None
        if share is not None:
            if self._recorder is None:
                self._recorder = BatchNormRecorder(self.student, k)
            recorder = self._recorder
            recorder.start(x.device, torch.promote_types(x.dtype, torch.float32))
        module = self.forward_module
        try:
            total = self._paths(module, x, target, k, factor, share, recorder)
        finally:
            if recorder is not None:
                self.batchnorm_stats = recorder.finish()
        return total * factor if factor != 1.0 else total

    def _paths(self, module: nn.Module, x: torch.Tensor, target: torch.Tensor, k: int, factor: float,
               share: Optional[Tuple[int, int]], recorder: Optional[BatchNormRecorder]) -> torch.Tensor:
        """Sample the step's ``k`` paths; forward and backward those of this rank's ``share`` (all without one);
        returns the sum of their losses."""
        total = torch.zeros((), device=x.device)
        mine = [j for j in range(k) if share is None or j % share[1] == share[0]]
        for j in range(k):
            path = self.sampler.sample()
            self.last_paths.append(path)
            if j not in mine:
                continue
            if path:
                self.student.set_path(path)
            if recorder is not None:
                recorder.path(j)
            # a reducing wrapper accumulates the first paths' gradients locally and reduces them with the last's
            local = module.no_sync() if j < mine[-1] and hasattr(module, "no_sync") else contextlib.nullcontext()
            with local:
                with autocast(self.precision, x.device):
                    out = module(x)
                    if self._amp:  # the loss in fp32, whatever dtype autocast left the output and the target in
                        out, target = out.float(), target.float()
                    loss = self.loss_fn(out, target)
                scaled = loss * factor if factor != 1.0 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total = total + loss.detach()
        return total

    def parameters_with_grad(self) -> List[torch.Tensor]:
        """Parameters that received a gradient in the last :meth:`forward_backward` (the sampled path's)."""
        return [p for p in self.student.parameters() if p.grad is not None]

    def trainable_parameters(self) -> List[torch.Tensor]:
        """Every parameter the optimizer steps, in its order (the same on every rank of a group)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def replay_batchnorm(self, stats: torch.Tensor) -> None:
        """Fold the BatchNorm statistics of every path of the step (:attr:`batchnorm_stats` summed over the ranks
        sharing the paths) into the buffers, in path order: as if one process had run all the paths."""
        if self._recorder is None:
            raise RuntimeError(f"block {self.index}: replay_batchnorm needs a forward_backward with share= first")
        self._recorder.replay(stats)

    def apply(self, loss: Optional[torch.Tensor] = None) -> bool:
        """Optimizer and LR schedule step; returns False when a non-finite ``loss`` made it skip the update.

        A NaN/Inf ``loss`` raises :class:`NonFiniteLossError` (``on_nonfinite: stop``) or skips the optimizer
        step of this batch (``skip``; the schedule still advances, so every layout stays in step).
        """
        applied = True
        if loss is not None and not math.isfinite(float(loss)):
            if self.config.on_nonfinite == "stop":
                raise NonFiniteLossError(f"block {self.index}: loss is {float(loss)} at step {self.steps}; lower "
                                         "distill.lr, check the data, or set distill.on_nonfinite: skip")
            _logger.warning("block %d: loss is %s at step %d; update skipped", self.index, float(loss), self.steps)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.student.buffers(), self._buffers):
                    buffer.copy_(saved)
            self.skipped += 1
            applied = False
        elif self.scaler is not None:  # unscales, skips the step on inf/NaN gradients, adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped first update (overflow, non-finite loss) is deliberate
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.steps += 1
        return applied

    def step(self, x: torch.Tensor, target: torch.Tensor, grad_hook: Optional[GradHook] = None,
             scale: float = 1.0) -> float:
        """One whole step; ``grad_hook(params, loss)`` may reduce gradients and returns the loss to report."""
        loss = self.forward_backward(x, target, scale)
        if grad_hook is not None:
            loss = grad_hook(self.parameters_with_grad(), loss)
        self.apply(loss)
        return float(loss)

    def state_dict(self) -> dict:
        """Student weights only (what the block library stores)."""
        return self.student.state_dict()

    def full_state(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer, schedule, path sampler, step count and the
        fp16 loss scaler (``None`` without one)."""
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "steps": self.steps,
                "skipped": self.skipped, "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_full_state(self, state: dict) -> None:
        """Restore :meth:`full_state`."""
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.steps = int(state["steps"])
        self.skipped = int(state["skipped"])
        if self.scaler is not None:
            if state.get("scaler") is None:
                raise ValueError(f"block {self.index}: the saved state has no fp16 loss scaler (it was trained at "
                                 "another execution.precision); resume with the precision it was trained at")
            self.scaler.load_state_dict(state["scaler"])
