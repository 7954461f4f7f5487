"""Synchronised BatchNorm over a torch.distributed process group (CPU/gloo-friendly)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = ["GroupBatchNorm2d", "convert_group_batchnorm", "convert_sync_batchnorm", "is_sliced_batchnorm"]

_REDUCE_DIMS = (0, 2, 3)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which statistics and the normalisation are computed for inputs of ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _should_sync() -> bool:
    """Whether a default process group exists, i.e. whether collectives can be issued."""
    return dist.is_available() and dist.is_initialized()


def _channel(t: torch.Tensor) -> torch.Tensor:
    """View a per-channel vector ``(C,)`` as ``(1, C, 1, 1)`` for broadcasting against NCHW."""
    return t.view(1, -1, 1, 1)


def _global_stats(x: torch.Tensor, group: Any, sync: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean, biased variance and element count of ``x`` over all ranks of ``group``.

    Each rank contributes its local per-channel sum, sum of squares and count; the three are
    all-reduced (SUM) as one concatenated float64 tensor.  The local sums are formed from a
    locally-centred ``var_mean`` so the final ``E[x^2] - E[x]^2`` does not lose precision to
    cancellation when ``|mean| >> std``.

    Parameters
    ----------
    x : torch.Tensor
        Local NCHW input (may have a zero-sized batch).
    group : ProcessGroup or None
        Group to reduce over (``None``: the default group).
    sync : bool
        Issue the all-reduce; ``False`` gives the local statistics.

    Returns
    -------
    mean, var : torch.Tensor
        Global per-channel mean and biased variance, float64, shape ``(C,)``.
    count : int
        Global number of elements per channel.
    """
    channels = x.shape[1]
    local_count = x.numel() // channels if channels else 0
    if local_count > 0:
        var_l, mean_l = torch.var_mean(x.to(_acc_dtype(x.dtype)), dim=_REDUCE_DIMS, correction=0)
        mean_l = mean_l.double()
        total = mean_l * local_count
        total_sq = (var_l.double() + mean_l * mean_l) * local_count
    else:
        total = torch.zeros(channels, dtype=torch.float64, device=x.device)
        total_sq = torch.zeros_like(total)
    count_t = torch.full((1,), float(local_count), dtype=torch.float64, device=x.device)
    packed = torch.cat([total, total_sq, count_t])
    if sync:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    count = int(round(packed[-1].item()))
    if count <= 1:
        raise ValueError(
            f"GroupBatchNorm2d needs more than 1 value per channel in training mode, got {count} "
            f"over the whole group (local input shape {tuple(x.shape)}); use a larger batch or "
            "call .eval() to normalise with the running statistics"
        )
    mean = packed[:channels] / count
    var = (packed[channels:2 * channels] / count - mean * mean).clamp_min_(0.0)
    return mean, var, count


class _GroupBatchNormFunction(torch.autograd.Function):
    """Normalise + affine with given global statistics; the backward all-reduces its two per-channel sums."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                mean: torch.Tensor, invstd: torch.Tensor, count: int, group: Any, sync: bool) -> torch.Tensor:
        """Return ``(x - mean) * invstd * weight + bias`` (``mean``/``invstd`` are treated as functions of ``x``)."""
        acc = _acc_dtype(x.dtype)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(acc)
        y = x.to(acc) * _channel(scale) + _channel(shift)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = count
        ctx.group = group
        ctx.sync = sync
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """Standard BatchNorm backward with the per-channel sums all-reduced over the group."""
        x, weight, mean, invstd = ctx.saved_tensors
        acc = _acc_dtype(x.dtype)
        channels = x.shape[1]
        g = grad_out.to(acc)
        x_hat = (x.to(acc) - _channel(mean)) * _channel(invstd)
        sum_dy = g.sum(dim=_REDUCE_DIMS)
        sum_dy_xhat = (g * x_hat).sum(dim=_REDUCE_DIMS)

        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)  # local: the data-parallel grad all-reduce sums ranks
        if ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype if weight is not None else x.dtype)
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat]).double()
            if ctx.sync:
                dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
            mean_dy = _channel((packed[:channels] / ctx.count).to(acc))
            mean_dy_xhat = _channel((packed[channels:] / ctx.count).to(acc))
            scale = invstd if weight is None else invstd * weight.to(acc)
            grad_x = ((g - mean_dy - x_hat * mean_dy_xhat) * _channel(scale)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are reduced over a process group in training mode.

    In training mode every rank contributes its local per-channel sum, sum of squares and count
    (one all-reduce), so a batch split over the ranks of ``group`` is normalised exactly like the
    whole batch in one process, also when the ranks hold different numbers of samples.  The backward
    all-reduces the per-channel sums of ``grad_out`` and ``grad_out * x_hat`` (one all-reduce) and
    uses the global count; the weight and bias gradients are the *local* sums, to be added up by the
    usual data-parallel gradient all-reduce.  Running statistics follow :class:`torch.nn.BatchNorm2d`
    exactly (unbiased variance, ``momentum=None`` cumulative average, ``num_batches_tracked``) and are
    identical on all ranks.  In eval mode this is a plain BatchNorm2d with no communication.

    Without an initialised default process group the layer normalises with local statistics (like
    :class:`torch.nn.SyncBatchNorm`).  Every rank of ``group`` must run the forward (and backward)
    of the layer in the same order, as with any collective.  For CUDA tensors with NCCL prefer
    :class:`torch.nn.SyncBatchNorm` (see :func:`convert_sync_batchnorm`).

    Parameters
    ----------
    num_features : int
        Number of channels ``C`` of the NCHW input.
    eps : float
        Added to the variance for numerical stability.
    momentum : float or None
        Running-statistics momentum; ``None`` uses a cumulative moving average.
    affine : bool
        Learnable per-channel weight and bias.
    track_running_stats : bool
        Keep running mean/variance buffers.
    group : torch.distributed.ProcessGroup, optional
        Process group to synchronise over; ``None`` is the default (WORLD) group.
    device, dtype : optional
        Factory arguments of the parameters and buffers.
    sliced : bool
        Stand in for a width-sliced BatchNorm of a supernet (NNI's path-sampling ``MixedBatchNorm2d``): an input of
        ``c <= num_features`` channels uses the first ``c`` entries of the weight, bias and running statistics
        (momentum and ``num_batches_tracked`` as ``nn.BatchNorm2d``, as that layer with
        :class:`nni_pipebd.spaces.compat.MixedBatchNorm2d`).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group: Any = None,
                 device: Any = None, dtype: Any = None, sliced: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        if group is not None and dist.is_available() and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group must be a torch.distributed.ProcessGroup or None (the default group), got "
                f"{type(group).__name__}; create one with torch.distributed.new_group(ranks)"
            )
        self.group = group
        self.sliced = sliced

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """Reject inputs that are not NCHW."""
        if input.dim() != 4:
            raise ValueError(
                f"GroupBatchNorm2d expects a 4D (N, C, H, W) input, got {input.dim()}D input of shape "
                f"{tuple(input.shape)}; add a singleton spatial dim with x[..., None, None] for (N, C) data"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` with group-wide batch statistics (training) or running statistics (eval).

        Parameters
        ----------
        input : torch.Tensor
            Local shard of the batch, shape ``(N_local, C, H, W)``; ``N_local`` may differ across ranks
            (and may be 0 as long as the group as a whole holds more than one value per channel).

        Returns
        -------
        torch.Tensor
            Normalised tensor of the same shape and dtype.
        """
        self._check_input_dim(input)
        channels = input.shape[1]
        if self.sliced and channels > self.num_features or not self.sliced and channels != self.num_features:
            raise ValueError(
                f"GroupBatchNorm2d expects {'at most ' if self.sliced else ''}{self.num_features} channels, got "
                f"input of shape {tuple(input.shape)}; check the num_features of the layer against the previous layer"
            )
        weight, bias, rm, rv = self.weight, self.bias, self.running_mean, self.running_var
        if self.sliced and channels < self.num_features:
            weight = None if weight is None else weight[:channels]
            bias = None if bias is None else bias[:channels]
            rm = None if rm is None else rm[:channels]
            rv = None if rv is None else rv[:channels]
        if not self.training:
            if not self.sliced:
                return super().forward(input)
            return F.batch_norm(input, rm, rv, weight, bias, rm is None and rv is None, 0.0, self.eps)

        sync = _should_sync()
        group = self.group if sync else None
        with torch.no_grad():
            mean, var, count = _global_stats(input.detach(), group, sync)

            # same momentum semantics as nn.BatchNorm2d.forward (and the compat MixedBatchNorm2d of a sliced layer)
            exponential_average_factor = 0.0 if self.momentum is None else self.momentum
            if self.track_running_stats and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            if self.track_running_stats and rm is not None:
                f = exponential_average_factor
                unbiased = var * (count / (count - 1))
                rm.copy_((rm.double() * (1.0 - f) + mean.to(rm.device) * f).to(rm.dtype))
                rv.copy_((rv.double() * (1.0 - f) + unbiased.to(rv.device) * f).to(rv.dtype))

            acc = _acc_dtype(input.dtype)
            invstd = torch.rsqrt(var + self.eps).to(acc)
            mean = mean.to(acc)
        return _GroupBatchNormFunction.apply(input, weight, bias, mean, invstd, count, group, sync)

    def extra_repr(self) -> str:
        """Usual BatchNorm description plus whether a non-default group is used."""
        base = super().extra_repr() + (", sliced" if self.sliced else "")
        return base if self.group is None else f"{base}, group=custom"


def convert_group_batchnorm(module: nn.Module, group: Any = None) -> nn.Module:
    """Replace every :class:`torch.nn.BatchNorm2d` in ``module`` with a :class:`GroupBatchNorm2d`.

    Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, the new layers reuse the original
    weight/bias ``Parameter`` objects (so existing optimizers keep working) and the running-statistics
    buffers and ``num_batches_tracked``; the training flag is kept.  Layers that already are
    :class:`GroupBatchNorm2d` are left as they are.

    Parameters
    ----------
    module : torch.nn.Module
        Network to convert (in place for its children).
    group : torch.distributed.ProcessGroup, optional
        Process group of the new layers; ``None`` is the default group.

    Returns
    -------
    torch.nn.Module
        ``module`` with converted children, or a new :class:`GroupBatchNorm2d` when ``module`` itself
        is a BatchNorm2d.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_group_batchnorm expects a torch.nn.Module, got {type(module).__name__}; "
            "pass the model (not its state_dict or parameters)"
        )
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GroupBatchNorm2d):
        ref = module.running_mean if module.running_mean is not None else module.weight
        out = GroupBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            group=group,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
            sliced=is_sliced_batchnorm(module),
        )
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_group_batchnorm(child, group))
    return out


def convert_sync_batchnorm(module: nn.Module, group: Any = None, device_type: str = "cpu") -> nn.Module:
    """Convert BatchNorm layers for data-parallel training on ``device_type``.

    Parameters
    ----------
    module : torch.nn.Module
        Network to convert.
    group : torch.distributed.ProcessGroup, optional
        Process group to synchronise over; ``None`` is the default group.
    device_type : str
        ``"cuda"`` (or ``"cuda:N"``) uses :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`;
        any other device type uses :func:`convert_group_batchnorm`.

    Returns
    -------
    torch.nn.Module
        The converted network.
    """
    try:
        kind = torch.device(device_type).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device_type must be a torch device string such as 'cpu' or 'cuda', got {device_type!r}"
        ) from exc
    if kind == "cuda":
        return _convert_cuda(module, group)
    return convert_group_batchnorm(module, group)


def is_sliced_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a supernet's width-sliced BatchNorm (NNI's ``MixedBatchNorm2d``, recognised by its
    mixed-operation interface: ``mutable_arguments`` and ``freeze_weight``)."""
    return isinstance(module, nn.BatchNorm2d) and hasattr(module, "mutable_arguments") and \
        hasattr(module, "freeze_weight")


def _convert_cuda(module: nn.Module, group: Any) -> nn.Module:
    """:class:`torch.nn.SyncBatchNorm` for plain BatchNorm layers, a sliced :class:`GroupBatchNorm2d` for sliced ones."""
    if is_sliced_batchnorm(module):
        return convert_group_batchnorm(module, group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GroupBatchNorm2d):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    for name, child in module.named_children():
        module.add_module(name, _convert_cuda(child, group))
    return module
