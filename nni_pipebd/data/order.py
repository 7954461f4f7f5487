"""Deterministic, shardable sample order: which indices form step ``s`` of epoch ``e``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Optional

import numpy as np

__all__ = ["BatchOrder", "shard", "shard_sizes"]

_logger = logging.getLogger(__name__)


def _check_int(name: str, value: object, minimum: int, hint: str) -> int:
    """Return ``value`` as ``int`` or raise a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} = {value!r} must be an int; {hint}")
    if value < minimum:
        raise ValueError(f"{name} = {value!r} must be >= {minimum}; {hint}")
    return int(value)


class BatchOrder:
    """Which sample indices form step ``s`` of epoch ``e``.

    Every epoch is a permutation of ``range(num_samples)`` drawn from
    ``numpy.random.default_rng([seed, epoch])``, cut into consecutive batches of
    ``batch_size``. The last incomplete batch is dropped, so every step has the same
    (global) batch size; ``max_steps`` optionally caps the steps of an epoch. The order
    depends only on ``(num_samples, batch_size, seed, epoch)``, so every process of a job
    computes the same global batches without communication and can take its
    :func:`shard`.

    Parameters
    ----------
    num_samples : int
        Size of the data set (> 0).
    batch_size : int
        Global batch size of one step (> 0, <= ``num_samples``).
    seed : int
        Seed of the order (>= 0).
    max_steps : int, optional
        Cut every epoch after this many steps (> 0).

    Raises
    ------
    ValueError
        If a value is not a positive int (``seed``: non-negative), or if ``batch_size``
        exceeds ``num_samples`` (no complete batch would exist).

    Examples
    --------
    >>> order = BatchOrder(num_samples=10, batch_size=4, seed=0)
    >>> order.steps_per_epoch
    2
    >>> [len(b) for b in order.batches(epoch=0)]
    [4, 4]
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, max_steps: Optional[int] = None):
        self.num_samples = _check_int("num_samples", num_samples, 1, "the data set must not be empty")
        self.batch_size = _check_int("batch_size", batch_size, 1, "use a positive batch size")
        self.seed = _check_int("seed", seed, 0, "use a non-negative seed")
        if max_steps is not None:
            max_steps = _check_int("max_steps", max_steps, 1, "use a positive cap or None for no cap")
        self.max_steps = max_steps
        if self.batch_size > self.num_samples:
            raise ValueError(
                f"batch_size = {self.batch_size} is larger than the data set (num_samples = "
                f"{self.num_samples}), so no complete batch exists and every step would be dropped; "
                f"lower batch_size to at most {self.num_samples}"
            )
        self._cached_epoch: Optional[int] = None
        self._cached_perm: Optional[np.ndarray] = None

    def __repr__(self) -> str:
        return (f"BatchOrder(num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"seed={self.seed}, max_steps={self.max_steps})")

    @property
    def steps_per_epoch(self) -> int:
        """Steps of every epoch: complete batches, capped by ``max_steps``."""
        steps = self.num_samples // self.batch_size
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample permutation of an epoch.

        Parameters
        ----------
        epoch : int
            Epoch number (>= 0).

        Returns
        -------
        numpy.ndarray
            ``int64`` permutation of ``range(num_samples)`` (do not modify it: it is cached).
        """
        epoch = _check_int("epoch", epoch, 0, "epochs count from 0")
        if self._cached_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_samples).astype(np.int64, copy=False)
            perm.setflags(write=False)
            self._cached_epoch, self._cached_perm = epoch, perm
        return self._cached_perm

    def batch(self, epoch: int, step: int) -> np.ndarray:
        """The sample indices of one global batch.

        Parameters
        ----------
        epoch : int
            Epoch number (>= 0).
        step : int
            Step inside the epoch, ``0 <= step < steps_per_epoch``.

        Returns
        -------
        numpy.ndarray
            ``int64`` array of ``batch_size`` distinct sample indices (a fresh, writable copy).

        Raises
        ------
        IndexError
            If ``step`` is outside ``range(steps_per_epoch)``.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"step = {step!r} must be an int")
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(
                f"step = {step} is out of range for an epoch of {self.steps_per_epoch} steps "
                f"(num_samples = {self.num_samples}, batch_size = {self.batch_size}, "
                f"max_steps = {self.max_steps}); use 0 <= step < {self.steps_per_epoch}"
            )
        start = int(step) * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size].copy()

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """Iterate over the global batches of an epoch.

        Parameters
        ----------
        epoch : int
            Epoch number (>= 0).
        start_step : int
            First step to yield (resuming); ``steps_per_epoch`` yields nothing.

        Yields
        ------
        numpy.ndarray
            The ``int64`` indices of steps ``start_step, ..., steps_per_epoch - 1``.

        Raises
        ------
        ValueError
            If ``start_step`` is outside ``0 .. steps_per_epoch`` (checked on the call, not lazily).
        """
        _check_int("epoch", epoch, 0, "epochs count from 0")
        start_step = _check_int("start_step", start_step, 0, "steps count from 0")
        if start_step > self.steps_per_epoch:
            raise ValueError(
                f"start_step = {start_step} is beyond the end of an epoch of {self.steps_per_epoch} "
                f"steps; use 0 <= start_step <= {self.steps_per_epoch}"
            )
        return (self.batch(epoch, step) for step in range(start_step, self.steps_per_epoch))


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The contiguous part of a global batch that belongs to one rank.

    Uses :func:`numpy.array_split` semantics: the parts differ in size by at most one and
    the earlier ranks get the extra samples; concatenating the parts of ranks
    ``0 .. world-1`` gives back ``indices``.

    Parameters
    ----------
    indices : numpy.ndarray
        One-dimensional global batch (e.g. from :meth:`BatchOrder.batch`).
    rank : int
        This rank, ``0 <= rank < world``.
    world : int
        Number of ranks sharing the batch, ``1 <= world <= len(indices)``.

    Returns
    -------
    numpy.ndarray
        The rank's slice of ``indices`` (sizes as in :func:`shard_sizes`).

    Raises
    ------
    ValueError
        If ``indices`` is not 1-D, ``world`` is not in ``1 .. len(indices)`` (a rank would get
        no sample) or ``rank`` is not in ``0 .. world-1``.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {indices.shape}")
    sizes = shard_sizes(len(indices), world)
    rank = _check_int("rank", rank, 0, f"ranks count from 0 to world - 1 = {world - 1}")
    if rank >= world:
        raise ValueError(f"rank = {rank} is not in range(world) with world = {world}; "
                         f"use 0 <= rank < {world}")
    start = sum(sizes[:rank])
    return indices[start:start + sizes[rank]]


def shard_sizes(batch_size: int, world: int) -> list[int]:
    """Per-rank sizes of a global batch split by :func:`shard`.

    Parameters
    ----------
    batch_size : int
        Global batch size (> 0).
    world : int
        Number of ranks, ``1 <= world <= batch_size``.

    Returns
    -------
    list of int
        ``world`` sizes that sum to ``batch_size``, differing by at most one, larger first.

    Raises
    ------
    ValueError
        If a value is not positive or ``world > batch_size``.

    Examples
    --------
    >>> shard_sizes(10, 4)
    [3, 3, 2, 2]
    """
    batch_size = _check_int("batch_size", batch_size, 1, "a batch must not be empty")
    world = _check_int("world", world, 1, "at least one rank must share the batch")
    if world > batch_size:
        raise ValueError(
            f"world = {world} ranks cannot share a batch of {batch_size} samples (a rank would get "
            f"none); raise the batch size to at least {world} or use fewer data-parallel ranks"
        )
    base, extra = divmod(batch_size, world)
    return [base + 1 if r < extra else base for r in range(world)]
