"""The samplers of a Lightning run: the seeded global batches, one shard per rank, the epoch set by Lightning."""

import numpy as np
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader, TensorDataset

from nni_pipebd.data.order import BatchOrder
from nni_pipebd.lightning.data import ClassificationData, EpochBatchSampler, ValBatchSampler


def test_rank_shards_make_up_the_global_batches_of_the_epoch_lightning_sets():
    order = BatchOrder(20, 6, seed=3, max_steps=2)
    samplers = [EpochBatchSampler(order, rank, 4) for rank in range(4)]
    loaders = [DataLoader(TensorDataset(torch.arange(20)), batch_sampler=s) for s in samplers]
    for epoch in (0, 1):
        for loader in loaders:
            _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls at every epoch start
        shards = [[b[0].tolist() for b in loader] for loader in loaders]
        for step in range(2):
            assert sum((shards[rank][step] for rank in range(4)), []) == order.batch(epoch, step).tolist()
        assert [len(s) for s in samplers] == [2] * 4
    assert [b.tolist() for b in order.batches(0)] != [b.tolist() for b in order.batches(1)]


def test_validation_counts_every_sample_once_over_the_ranks():
    for world in (1, 3):
        batches = [b for rank in range(world) for b in ValBatchSampler(10, 3, rank, world)]
        assert sorted(np.concatenate(batches).tolist()) == list(range(10)) and max(map(len, batches)) <= 3


def test_data_module_caps_the_batch_at_the_data_set():
    data = ClassificationData(TensorDataset(torch.zeros(5, 1), torch.zeros(5, dtype=torch.long)), None, 8, seed=0)
    assert data.steps_per_epoch == 1 and [len(b) for b in data.train_dataloader().batch_sampler] == [5]
    assert data.val_dataloader() == []
