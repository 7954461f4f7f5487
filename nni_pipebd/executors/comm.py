"""Communication helpers shared by the distributed executors (the only modules that touch torch.distributed)."""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any, Deque, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["allreduce_gradients", "allreduce_path_split", "data_parallel", "Sender", "Receiver", "FlagSender",
           "FlagReceiver"]


def allreduce_gradients(params: List[torch.Tensor], loss: torch.Tensor, group=None,
                        stop: Optional[bool] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, bool]]:
    """Sum the gradients (and the loss) over ``group`` in one flat all-reduce.

    Each rank's gradients and loss must already be its share of the whole batch (the loss scaled by local
    samples / batch before backward, see ``BlockTrainer.forward_backward``), so the sums are the whole
    batch's. All ranks must pass the same parameters (the same sampled path). Returns the reduced loss; with
    ``stop`` given, also whether any rank passed ``stop=True`` (the flag rides in the same all-reduce).
    """
    tensors = [p.grad for p in params] + [loss.detach().reshape(1)]
    if stop is not None:
        tensors.append(torch.full((1,), float(bool(stop)), dtype=loss.dtype, device=loss.device))
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    reduced = _unflatten_dense_tensors(flat, tensors)
    for p, grad in zip(params, reduced[:len(params)]):
        p.grad.copy_(grad)
    if stop is None:
        return reduced[-1].reshape(())
    return reduced[-2].reshape(()), bool(reduced[-1].item() > 0)


def allreduce_path_split(params: List[torch.Tensor], loss: torch.Tensor, group=None, stop: Optional[bool] = None,
                         stats: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, bool, Optional[torch.Tensor]]:
    """Sum what the ranks sharing a step's paths computed, in one flat all-reduce over ``group``.

    Each rank ran its share of the sampled paths on the whole batch (``BlockTrainer.forward_backward`` with
    ``share=``), so different ranks touched different parameters. Every parameter of ``params`` (all the
    optimizer's, in the same order on every rank) takes part (zeros where this rank's gradient is ``None``) with
    a flag saying whether this rank touched it; afterwards a parameter no rank touched gets ``grad = None`` again,
    so the optimizer skips it exactly as in one process (Adam's moments and step count stay put). The loss, the
    stop flag and ``stats`` (the recorded BatchNorm statistics, ``BlockTrainer.batchnorm_stats``) ride along.

    Parameters
    ----------
    params : list of torch.Tensor
        Every trainable parameter of the block, in the same order on every rank.
    loss : torch.Tensor
        This rank's part of the step's loss (a scalar).
    group : ProcessGroup, optional
        The ranks sharing the paths.
    stop : bool, optional
        This rank's stop decision; the result says whether any rank decided to stop.
    stats : torch.Tensor, optional
        Flat values summed over the group as they are.

    Returns
    -------
    tuple
        (summed loss, whether any rank passed ``stop=True``, summed ``stats`` or ``None``).
    """
    device, dtype = loss.device, loss.dtype
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    touched = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device)
    tensors = grads + [touched, loss.detach().reshape(1).to(dtype),
                       torch.full((1,), float(bool(stop)), dtype=dtype, device=device)]
    if stats is not None:
        tensors.append(stats)
    dtypes = {t.dtype for t in tensors}
    common = dtypes.pop() if len(dtypes) == 1 else torch.float64
    flat = _flatten_dense_tensors([t.to(common) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    reduced = _unflatten_dense_tensors(flat, tensors)
    used = reduced[len(params)].tolist()
    for p, grad, count in zip(params, reduced[:len(params)], used):
        if count > 0:
            if p.grad is None:
                p.grad = grad.to(p.dtype).clone()
            else:
                p.grad.copy_(grad)
        else:
            p.grad = None
    summed = reduced[len(params) + 1].reshape(())
    flag = bool(reduced[len(params) + 2].item() > 0)
    return summed, flag, (reduced[-1].to(stats.dtype) if stats is not None else None)


def data_parallel(module: nn.Module, group, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` over ``group``: its gradients are SUMMED in bucketed all-reduces
    that overlap with backward (``execution.grad_sync: ddp``), the same sums as :func:`allreduce_gradients`.

    Each rank's loss is its share of the whole batch's (see ``BlockTrainer.forward_backward``), so the gradients
    are summed, not averaged as DDP does by default: a communication hook all-reduces every bucket with SUM. A
    supernet block trains one sampled path per step, so unused parameters are found at every step
    (``find_unused_parameters``; a parameter no rank used keeps no gradient, as with the flat all-reduce). Buffers
    are not broadcast (synchronised BatchNorm keeps them equal; without it each rank keeps its own, as in the flat
    path). A module without trainable parameters is returned as it is (nothing to reduce).

    Parameters
    ----------
    module : nn.Module
        The student block, already on ``device`` (BatchNorm converted for the group, if synchronised).
    group : ProcessGroup
        The ranks that split the block's batch; every one of them wraps the block, in the same order.
    device : torch.device
        ``module``'s device (CUDA: its index becomes DDP's ``device_ids``).

    Returns
    -------
    nn.Module
        The wrapper to call forward on (``BlockTrainer.forward_module``); ``module`` itself stays the one to save.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in module.parameters()):
        return module
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    # no buffer broadcast before every forward (newer torch names it forward_sync_buffers and deprecates the old
    # name; both still sync the buffers once at construction, where every rank's are equal anyway)
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    wrapped = DistributedDataParallel(module, device_ids=ids, process_group=group, find_unused_parameters=True,
                                      gradient_as_bucket_view=True, **{buffers: False})
    wrapped.register_comm_hook(group, _sum_hook)
    return wrapped


def _sum_hook(group, bucket):  # no annotations: DDP rejects any but its own objects, and ours are strings
    """DDP communication hook: SUM all-reduce of the bucket over ``group`` (DDP's own hook divides by its size)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


_DATA = 0  # message tags: ``tag`` for a stream's rows, ``tag + 1`` for the step's stop flag beside them


class Sender:
    """Asynchronous sends of one activation per step, cut into row ranges for one or more next-stage ranks.

    ``routes`` lists (destination rank, lo, hi) in local rows. A sent tensor is kept alive until its sends
    complete; when ``depth`` steps are pending, the oldest is waited for first (with ``timeout``), which bounds
    how far this stage runs ahead of the next. Each step also sends a one-element stop flag to every destination
    (``True``: this step is the run's last, see :mod:`~nni_pipebd.executors.stopping`). ``tag`` tells streams
    between the same two ranks apart (the flag uses ``tag + 1``).
    """

    def __init__(self, routes: Sequence[Tuple[int, int, int]], depth: int, timeout, group=None, tag: int = _DATA):
        self.routes, self.depth, self.timeout, self.group = list(routes), depth, timeout, group
        self.tag = tag
        self._pending: Deque[Tuple[torch.Tensor, List[Any]]] = deque()

    def send(self, tensor: torch.Tensor, stop: bool = False) -> None:
        while len(self._pending) >= self.depth:
            self._wait_oldest()
        tensor = tensor.contiguous()
        flag = torch.full((1,), int(bool(stop)), dtype=torch.int64, device=tensor.device)
        works = [dist.isend(tensor[lo:hi], dst, group=self.group, tag=self.tag) for dst, lo, hi in self.routes]
        works += [dist.isend(flag, dst, group=self.group, tag=self.tag + 1) for dst, _, _ in self.routes]
        self._pending.append(((tensor, flag), works))

    def flush(self) -> None:
        """Wait for every pending send."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        _, works = self._pending.popleft()
        for (dst, _, _), work in zip(self.routes + self.routes, works):
            _wait(work, self.timeout, f"send to rank {dst}")


class Receiver:
    """Receives one activation per step, assembled from row ranges sent by previous-stage ranks.

    ``routes`` lists (source rank, lo, hi) in local rows of a buffer of ``shape``. Receives for ``depth``
    steps are posted ahead into preallocated buffers (shapes agreed at setup); the tensor returned by
    :meth:`recv` stays valid until the next call. ``total`` is the number of steps, so nothing is left posted.
    After :meth:`recv`, :attr:`stop` tells whether a sender marked that step as the run's last.
    """

    def __init__(self, routes: Sequence[Tuple[int, int, int]], shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device, depth: int, total: int, timeout, group=None, tag: int = _DATA):
        self.routes, self.timeout, self.group, self.tag = list(routes), timeout, group, tag
        self._free = [torch.empty(tuple(shape), dtype=dtype, device=device) for _ in range(depth + 1)]
        self._device = device
        self._pending: Deque[Tuple[torch.Tensor, List[torch.Tensor], List[Any]]] = deque()
        self.stop = False
        self._to_post = total
        self._lent: Optional[torch.Tensor] = None
        for _ in range(depth):
            self._post()

    def _post(self) -> None:
        if self._to_post > 0 and self._free:
            buffer = self._free.pop()
            flags = [torch.zeros(1, dtype=torch.int64, device=self._device) for _ in self.routes]
            works = [dist.irecv(buffer[lo:hi], src, group=self.group, tag=self.tag) for src, lo, hi in self.routes]
            works += [dist.irecv(flag, src, group=self.group, tag=self.tag + 1)
                      for flag, (src, _, _) in zip(flags, self.routes)]
            self._pending.append((buffer, flags, works))
            self._to_post -= 1

    def recv(self) -> torch.Tensor:
        """The next step's activation."""
        if self._lent is not None:
            self._free.append(self._lent)
            self._lent = None
        self._post()
        if not self._pending:
            raise RuntimeError(f"receive from ranks {[src for src, _, _ in self.routes]}: all expected "
                               "activations were already received")
        buffer, flags, works = self._pending.popleft()
        for (src, _, _), work in zip(self.routes + self.routes, works):
            _wait(work, self.timeout, f"receive from rank {src}")
        self.stop = any(bool(flag.item()) for flag in flags)
        self._lent = buffer
        return buffer


_FLAG = 2  # tag of the leader's stop decision sent on its own


class FlagSender:
    """Sends the leader's stop decision at the start of every step to ranks no other message would tell in time
    (at most ``depth`` steps in flight)."""

    def __init__(self, destinations: Sequence[int], depth: int, timeout, device: torch.device, group=None):
        self.destinations, self.depth, self.timeout = list(destinations), depth, timeout
        self.device, self.group = device, group
        self._pending: Deque[List[Any]] = deque()

    def send(self, stop: bool) -> None:
        while len(self._pending) >= self.depth:
            self._wait_oldest()
        flag = torch.full((1,), int(bool(stop)), dtype=torch.int64, device=self.device)
        self._pending.append([flag] + [dist.isend(flag, dst, group=self.group, tag=_FLAG)
                                       for dst in self.destinations])

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works = self._pending.popleft()[1:]
        for dst, work in zip(self.destinations, works):
            _wait(work, self.timeout, f"send of the stop decision to rank {dst}")


class FlagReceiver:
    """Receives the leader's stop decision of every step (``total`` steps, ``depth`` receives posted ahead)."""

    def __init__(self, source: int, total: int, depth: int, timeout, device: torch.device, group=None):
        self.source, self.timeout, self.device, self.group = source, timeout, device, group
        self._pending: Deque[Tuple[torch.Tensor, Any]] = deque()
        self._to_post = total
        for _ in range(depth):
            self._post()

    def _post(self) -> None:
        if self._to_post > 0:
            flag = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._pending.append((flag, dist.irecv(flag, self.source, group=self.group, tag=_FLAG)))
            self._to_post -= 1

    def recv(self) -> bool:
        """Whether the leader decided that this step is the run's last."""
        self._post()
        flag, work = self._pending.popleft()
        _wait(work, self.timeout, f"receive of the stop decision from rank {self.source}")
        return bool(flag.item())


def _wait(work, timeout, what: str) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as err:
        raise RuntimeError(f"{what} did not complete within {timeout.total_seconds():.0f} s "
                           f"(execution.timeout_s); a peer may have failed: {err}") from err
