"""The data of a Lightning run: every epoch the global batches of a seeded ``BatchOrder``, each rank its shard."""

from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.order import BatchOrder, shard

__all__ = ["EpochBatchSampler", "ValBatchSampler", "ClassificationData"]


class _Epoch:
    """The epoch Lightning announces (``set_epoch``); Lightning looks for it at ``batch_sampler.sampler``."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class EpochBatchSampler(Sampler[List[int]]):
    """The global batches of epoch ``e`` of ``order`` (``e`` set by Lightning), this rank's shard of each.

    Concatenating the shards of ranks ``0 .. world-1`` gives the global batch, so a run on ``world`` devices sees the
    samples a run on one device sees, step by step.

    Parameters
    ----------
    order : BatchOrder
        Seeded sample order.
    rank, world : int
        This rank and the data-parallel world size (``world <= order.batch_size``).
    """

    def __init__(self, order: BatchOrder, rank: int = 0, world: int = 1):
        self.order, self.rank, self.world = order, rank, world
        self.sampler = _Epoch()

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.order.batches(self.sampler.epoch):
            yield shard(batch, self.rank, self.world).tolist()

    def __len__(self) -> int:
        return self.order.steps_per_epoch


class ValBatchSampler(Sampler[List[int]]):
    """Consecutive batches of the whole validation set; rank ``r`` of ``world`` takes the ``r``-th contiguous part,
    so every sample is counted exactly once (no padding as with ``DistributedSampler``)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world: int = 1):
        part = np.array_split(np.arange(num_samples), world)[rank]
        self.batches = [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ClassificationData(pl.LightningDataModule):
    """Training and validation loaders of ``(image, label)`` data sets, in the project's seeded sample order.

    Parameters
    ----------
    train_set, val_set : Dataset
        Map-style data sets of ``(image tensor, int label)``.
    batch_size : int
        Global batch size (capped at the training set's size); the last incomplete batch of an epoch is dropped.
    seed : int
        Seed of the sample order (epoch ``e`` is a permutation drawn from ``(seed, e)``).
    max_steps_per_epoch : int, optional
        Cut every epoch after this many steps.
    num_workers : int
        Loader worker processes.
    """

    def __init__(self, train_set: Dataset, val_set: Optional[Dataset], batch_size: int, seed: int = 0,
                 max_steps_per_epoch: Optional[int] = None, num_workers: int = 0):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.order = BatchOrder(len(train_set), min(batch_size, len(train_set)), seed, max_steps_per_epoch)
        self.batch_size, self.num_workers = batch_size, num_workers

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of every epoch."""
        return self.order.steps_per_epoch

    def _rank_world(self):
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        return DataLoader(self.train_set, batch_sampler=EpochBatchSampler(self.order, rank, world),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []  # type: ignore[return-value]
        rank, world = self._rank_world()
        return DataLoader(self.val_set, batch_sampler=ValBatchSampler(len(self.val_set), self.batch_size, rank, world),
                          num_workers=self.num_workers)
