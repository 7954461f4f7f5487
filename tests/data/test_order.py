"""Tests of the deterministic, shardable batch order."""

from __future__ import annotations

import numpy as np
import pytest

from nni_pipebd.data.order import BatchOrder, shard, shard_sizes


def test_same_seed_and_epoch_give_same_batches():
    a = BatchOrder(num_samples=100, batch_size=8, seed=3)
    b = BatchOrder(num_samples=100, batch_size=8, seed=3)
    for step in range(a.steps_per_epoch):
        np.testing.assert_array_equal(a.batch(2, step), b.batch(2, step))
    np.testing.assert_array_equal(np.concatenate(list(a.batches(2))), np.concatenate(list(b.batches(2))))


def test_epoch_and_seed_change_the_order():
    order = BatchOrder(num_samples=100, batch_size=8, seed=3)
    e0 = np.concatenate(list(order.batches(0)))
    e1 = np.concatenate(list(order.batches(1)))
    other_seed = np.concatenate(list(BatchOrder(100, 8, seed=4).batches(0)))
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, other_seed)
    # going back to an epoch gives its order again (the cache does not leak between epochs)
    np.testing.assert_array_equal(np.concatenate(list(order.batches(0))), e0)


def test_permutation_is_default_rng_of_seed_and_epoch():
    order = BatchOrder(num_samples=50, batch_size=10, seed=7)
    expected = np.random.default_rng([7, 5]).permutation(50)
    np.testing.assert_array_equal(np.concatenate(list(order.batches(5))), expected)


def test_batches_are_int64_distinct_and_drop_last():
    order = BatchOrder(num_samples=103, batch_size=10, seed=0)
    assert order.steps_per_epoch == 10
    batches = list(order.batches(0))
    assert len(batches) == 10
    assert all(b.dtype == np.int64 and b.shape == (10,) for b in batches)
    seen = np.concatenate(batches)
    assert len(np.unique(seen)) == 100  # no sample twice; the 3 left over are dropped
    assert seen.min() >= 0 and seen.max() < 103


def test_exact_multiple_keeps_all_samples():
    order = BatchOrder(num_samples=40, batch_size=10, seed=1)
    assert order.steps_per_epoch == 4
    assert sorted(np.concatenate(list(order.batches(0))).tolist()) == list(range(40))


def test_max_steps_caps_the_epoch():
    order = BatchOrder(num_samples=100, batch_size=10, seed=0, max_steps=3)
    assert order.steps_per_epoch == 3
    capped = list(order.batches(1))
    assert len(capped) == 3
    full = BatchOrder(num_samples=100, batch_size=10, seed=0)
    for step, batch in enumerate(capped):  # the cap cuts the epoch, it does not change the order
        np.testing.assert_array_equal(batch, full.batch(1, step))
    assert BatchOrder(100, 10, 0, max_steps=50).steps_per_epoch == 10


def test_batches_resume_from_start_step():
    order = BatchOrder(num_samples=64, batch_size=8, seed=2)
    all_batches = list(order.batches(0))
    resumed = list(order.batches(0, start_step=5))
    assert len(resumed) == 3
    for a, b in zip(all_batches[5:], resumed):
        np.testing.assert_array_equal(a, b)
    assert list(order.batches(0, start_step=order.steps_per_epoch)) == []


def test_returned_batch_is_a_private_copy():
    order = BatchOrder(num_samples=20, batch_size=5, seed=0)
    batch = order.batch(0, 0)
    expected = batch.copy()
    batch[:] = -1
    np.testing.assert_array_equal(order.batch(0, 0), expected)


def test_batch_size_larger_than_data_set_names_both_values():
    with pytest.raises(ValueError, match=r"batch_size = 65.*num_samples = 64.*lower batch_size"):
        BatchOrder(num_samples=64, batch_size=65, seed=0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_samples=0, batch_size=1, seed=0), "num_samples"),
    (dict(num_samples=10, batch_size=0, seed=0), "batch_size"),
    (dict(num_samples=10, batch_size=-2, seed=0), "batch_size"),
    (dict(num_samples=10, batch_size=2, seed=-1), "seed"),
    (dict(num_samples=10, batch_size=2, seed=0, max_steps=0), "max_steps"),
    (dict(num_samples=10, batch_size=2.0, seed=0), "batch_size"),
])
def test_invalid_constructor_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BatchOrder(**kwargs)


def test_invalid_step_epoch_and_start_step():
    order = BatchOrder(num_samples=20, batch_size=5, seed=0, max_steps=2)
    with pytest.raises(IndexError, match=r"step = 2 .*2 steps"):
        order.batch(0, 2)
    with pytest.raises(IndexError, match="step = -1"):
        order.batch(0, -1)
    with pytest.raises(ValueError, match="epoch = -1"):
        order.batch(-1, 0)
    with pytest.raises(ValueError, match="start_step = 3"):
        order.batches(0, start_step=3)


def test_shard_covers_the_batch_in_order():
    batch = BatchOrder(num_samples=100, batch_size=10, seed=0).batch(0, 0)
    for world in (1, 2, 3, 4, 10):
        parts = [shard(batch, rank, world) for rank in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)
        assert [len(p) for p in parts] == shard_sizes(10, world)
        for expected, part in zip(np.array_split(batch, world), parts):
            np.testing.assert_array_equal(part, expected)


def test_shard_sizes_earlier_ranks_get_the_extra():
    assert shard_sizes(10, 4) == [3, 3, 2, 2]
    assert shard_sizes(10, 5) == [2, 2, 2, 2, 2]
    assert shard_sizes(7, 7) == [1] * 7
    assert shard_sizes(5, 1) == [5]
    for batch_size in range(1, 30):
        for world in range(1, batch_size + 1):
            sizes = shard_sizes(batch_size, world)
            assert sum(sizes) == batch_size and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)


def test_shard_errors():
    batch = np.arange(4)
    with pytest.raises(ValueError, match=r"world = 5.*batch of 4"):
        shard(batch, 0, 5)
    with pytest.raises(ValueError, match=r"rank = 2.*world = 2"):
        shard(batch, 2, 2)
    with pytest.raises(ValueError, match="rank = -1"):
        shard(batch, -1, 2)
    with pytest.raises(ValueError, match="world = 0"):
        shard(batch, 0, 0)
    with pytest.raises(ValueError, match="one-dimensional"):
        shard(np.zeros((2, 2), dtype=np.int64), 0, 1)
    with pytest.raises(ValueError, match=r"world = 3.*batch of 2"):
        shard_sizes(2, 3)
    with pytest.raises(ValueError, match="batch_size = 0"):
        shard_sizes(0, 1)
