"""Communication helpers shared by the distributed executors (the only modules that touch torch.distributed)."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["allreduce_gradients"]


def allreduce_gradients(params: List[torch.Tensor], loss: torch.Tensor, weight: float, group=None) -> torch.Tensor:
    """Sum ``weight * grad`` (and ``weight * loss``) over ``group`` in one flat all-reduce.

    With ``weight`` = local samples / global batch, every rank ends with the gradient and loss of the whole
    batch (losses are per-sample means). All ranks must pass the same parameters (the same sampled path).
    Returns the reduced loss.
    """
    tensors = [p.grad for p in params] + [loss.detach().reshape(1)]
    flat = _flatten_dense_tensors(tensors).mul_(weight)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    reduced = _unflatten_dense_tensors(flat, tensors)
    for p, grad in zip(params, reduced[:-1]):
        p.grad.copy_(grad)
    return reduced[-1].reshape(())
