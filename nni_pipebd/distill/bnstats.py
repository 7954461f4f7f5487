"""BatchNorm running statistics of a step's paths, recorded where the paths ran and replayed in path order."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormRecorder"]

_HEAD = 3  # per path and layer: calls, channels used, num_batches_tracked advanced; then means and variances


class BatchNormRecorder:
    """What the sampled paths of one step fold into the running statistics of ``module``'s BatchNorm layers.

    In a single process the ``paths`` forwards of a step update every BatchNorm layer's ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` one after another, in path order. When the paths are shared out
    over ranks (each rank the whole batch, a share of the paths), each rank records, per path it runs and per
    layer in training mode with running statistics, the batch mean and unbiased variance of the layer's input
    (a forward pre-hook), and leaves the buffers as they were before the step. The records of all ranks are
    summed (every path runs on exactly one rank, so the sum holds every path's records) and
    :meth:`replay` applies them in path order: the buffers then equal the single process's up to float rounding.

    Layout of :attr:`slots` (one flat tensor, so it can ride in a gradient all-reduce): per path ``j`` and
    layer ``l`` (of ``module.modules()`` order), ``3 + 2 * num_features`` values: the number of calls ``c`` of
    the layer in that path, the channels the path used (a searched width: NNI's sampled ``MutableBatchNorm2d``
    normalises a prefix of its channels and updates that prefix of its buffers), how much the calls advanced
    ``num_batches_tracked`` (PyTorch's layers count every call, NNI's sampled ones none), then the accumulated
    mean and variance. One call (the usual case) stores the statistics themselves; a layer called ``c > 1`` times
    in one path stores ``sum_i (1 - m)^(c - i) s_i`` (momentum ``m``) or ``sum_i s_i`` (``momentum=None``, the
    cumulative average), replayed in closed form.

    Parameters
    ----------
    module : nn.Module
        The student block.
    paths : int
        Paths per step (``distill.paths_per_step``).
    """

    def __init__(self, module: nn.Module, paths: int):
        self.layers: List[_BatchNorm] = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        self.paths = paths
        widths = [_HEAD + 2 * layer.num_features for layer in self.layers]
        self.offsets: List[int] = []
        position = 0
        for width in widths:
            self.offsets.append(position)
            position += width
        self.per_path = position
        self.slots: Optional[torch.Tensor] = None
        self._path = 0
        self._calls: set = set()
        self._saved: List[List[Optional[torch.Tensor]]] = []
        self._handles: list = []
        self._tracked: dict = {}  # layer -> num_batches_tracked before its running call

    @property
    def size(self) -> int:
        """Values in :attr:`slots`."""
        return self.paths * self.per_path

    def start(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Save the buffers and record from now on (into fresh zero :attr:`slots` of ``dtype``)."""
        self.slots = torch.zeros(self.size, device=device, dtype=dtype)
        self._calls = set()
        self._saved = [[None if b is None else b.detach().clone()
                        for b in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
                       for layer in self.layers]
        self._handles = [hook for n, layer in enumerate(self.layers)
                         for hook in (layer.register_forward_pre_hook(self._hook(n)),
                                      layer.register_forward_hook(self._counted(n)))]

    def path(self, j: int) -> None:
        """The forwards from now on run path ``j`` (0..paths-1) of the step."""
        if not 0 <= j < self.paths:
            raise ValueError(f"path {j} is not one of the step's {self.paths} paths (0..{self.paths - 1})")
        self._path = j

    def finish(self) -> torch.Tensor:
        """Stop recording, put the buffers back as they were at :meth:`start`; returns :attr:`slots`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with torch.no_grad():
            for layer, saved in zip(self.layers, self._saved):
                for buffer, value in zip((layer.running_mean, layer.running_var, layer.num_batches_tracked), saved):
                    if buffer is not None and value is not None:
                        buffer.copy_(value)
        self._saved = []
        return self.slots

    def _hook(self, n: int):
        layer = self.layers[n]

        def record(_module, inputs) -> None:
            if not (layer.training and layer.track_running_stats and layer.running_mean is not None):
                return
            x = inputs[0].detach()
            used, c = x.shape[1], layer.num_features
            base = self._path * self.per_path + self.offsets[n]
            slot = self.slots[base:base + _HEAD + 2 * c]
            again = (self._path, n) in self._calls
            if used > c or (again and int(slot[1]) != used):
                earlier = f", after {int(slot[1])} earlier in the same path" if again else ""
                raise ValueError(f"BatchNorm layer {n} of {c} channels got {used} channels in path "
                                 f"{self._path}{earlier}: its statistics cannot be replayed; split this block's "
                                 "batch instead of its paths")
            with torch.no_grad():
                x = x.to(torch.promote_types(x.dtype, torch.float32))
                dims = [0] + list(range(2, x.dim()))
                var, mean = torch.var_mean(x, dim=dims, correction=1)
                if layer.momentum is not None and again:  # called again in this path
                    slot[_HEAD:].mul_(1.0 - layer.momentum)
                self._calls.add((self._path, n))
                slot[0] += 1
                slot[1] = used
                slot[_HEAD:_HEAD + used] += mean.to(slot.dtype)
                slot[_HEAD + c:_HEAD + c + used] += var.to(slot.dtype)
            self._tracked[n] = None if layer.num_batches_tracked is None else int(layer.num_batches_tracked)

        return record

    def _counted(self, n: int):
        layer = self.layers[n]

        def count(_module, _inputs, _output) -> None:
            before = self._tracked.pop(n, None)
            if before is not None:
                self.slots[self._path * self.per_path + self.offsets[n] + 2] += int(layer.num_batches_tracked) - before

        return count

    def replay(self, slots: torch.Tensor) -> None:
        """Apply the summed records of every path, in path order, to the buffers (as the forwards would have)."""
        if slots.numel() != self.size:
            raise ValueError(f"{slots.numel()} recorded values, expected {self.size} ({self.paths} paths x "
                             f"{self.per_path} per path); every rank of a group must record the same block")
        if not self.layers:
            return
        heads = [self.offsets[n] + j * self.per_path + k for j in range(self.paths) for n in range(len(self.layers))
                 for k in range(_HEAD)]
        heads = slots[torch.tensor(heads, dtype=torch.long, device=slots.device)].round().long().tolist()
        with torch.no_grad():
            for j in range(self.paths):
                for n, (layer, offset) in enumerate(zip(self.layers, self.offsets)):
                    base = j * self.per_path + offset
                    k = (j * len(self.layers) + n) * _HEAD
                    calls, used, tracked = heads[k:k + _HEAD]
                    if calls == 0:
                        continue
                    c = layer.num_features
                    mean = slots[base + _HEAD:base + _HEAD + used]
                    var = slots[base + _HEAD + c:base + _HEAD + c + used]
                    _fold(layer, calls, used, tracked, mean, var)


def _fold(layer: _BatchNorm, calls: int, used: int, counted: int, mean: torch.Tensor, var: torch.Tensor) -> None:
    """``calls`` forwards' worth of statistics into the first ``used`` channels of ``layer``'s buffers (one call:
    exactly PyTorch's update), ``num_batches_tracked`` advanced by ``counted``."""
    tracked = layer.num_batches_tracked
    if tracked is not None:
        tracked.add_(counted)
    running_mean, running_var = layer.running_mean[:used], layer.running_var[:used]
    mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
    if layer.momentum is not None:
        m = layer.momentum
        if calls == 1:
            running_mean.mul_(1.0 - m).add_(mean, alpha=m)
            running_var.mul_(1.0 - m).add_(var, alpha=m)
        else:
            keep = (1.0 - m) ** calls
            running_mean.mul_(keep).add_(mean, alpha=m)
            running_var.mul_(keep).add_(var, alpha=m)
        return
    total = float(tracked)  # momentum=None: the cumulative average over every batch so far
    if calls == 1:
        factor = 1.0 / total
        running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        running_var.mul_(1.0 - factor).add_(var, alpha=factor)
    else:
        before = total - calls
        running_mean.mul_(before).add_(mean).div_(total)
        running_var.mul_(before).add_(var).div_(total)
