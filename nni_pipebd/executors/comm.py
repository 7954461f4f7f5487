"""Communication helpers shared by the distributed executors (the only modules that touch torch.distributed)."""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["allreduce_gradients", "Sender", "Receiver"]


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


class Sender:
    """Asynchronous sends of one activation per step to rank ``dst``, at most ``depth`` in flight.

    A sent tensor is kept alive until its send completes; when ``depth`` sends are pending, the oldest is
    waited for first (with ``timeout``), which bounds how far this stage runs ahead of the next.
    """

    def __init__(self, dst: int, depth: int, timeout, group=None):
        self.dst, self.depth, self.timeout, self.group = dst, depth, timeout, group
        self._pending: Deque[Tuple[torch.Tensor, Any]] = deque()

    def send(self, tensor: torch.Tensor) -> None:
        while len(self._pending) >= self.depth:
            self._wait_oldest()
        tensor = tensor.contiguous()
        self._pending.append((tensor, dist.isend(tensor, self.dst, group=self.group)))

    def flush(self) -> None:
        """Wait for every pending send."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        _, work = self._pending.popleft()
        _wait(work, self.timeout, f"send to rank {self.dst}")


class Receiver:
    """Receives one activation per step from rank ``src`` into preallocated buffers, posted ahead.

    ``depth`` receives are posted in advance (shape and dtype agreed at setup). The tensor returned by
    :meth:`recv` stays valid until the next call; ``total`` is the number of steps to receive, so no
    receive is left posted at the end.
    """

    def __init__(self, src: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device, depth: int,
                 total: int, timeout, group=None):
        self.src, self.timeout, self.group = src, timeout, group
        self._free = [torch.empty(tuple(shape), dtype=dtype, device=device) for _ in range(depth + 1)]
        self._pending: Deque[Tuple[torch.Tensor, Any]] = deque()
        self._to_post = total
        self._lent: Optional[torch.Tensor] = None
        for _ in range(depth):
            self._post()

    def _post(self) -> None:
        if self._to_post > 0 and self._free:
            buffer = self._free.pop()
            self._pending.append((buffer, dist.irecv(buffer, self.src, group=self.group)))
            self._to_post -= 1

    def recv(self) -> torch.Tensor:
        """The next step's activation."""
        if self._lent is not None:
            self._free.append(self._lent)
            self._lent = None
        self._post()
        if not self._pending:
            raise RuntimeError(f"receive from rank {self.src}: all expected activations were already received")
        buffer, work = self._pending.popleft()
        _wait(work, self.timeout, f"receive from rank {self.src}")
        self._lent = buffer
        return buffer


def _wait(work, timeout, what: str) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as err:
        raise RuntimeError(f"{what} did not complete within {timeout.total_seconds():.0f} s "
                           f"(execution.timeout_s); a peer may have failed: {err}") from err
