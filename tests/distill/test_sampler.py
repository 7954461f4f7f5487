import random

import numpy as np
import torch

from nni_pipebd.distill.sampler import PathSampler

CHOICES = {"s0_i0": ["k3e3", "k3e6", "k5e3"], "s0_i1": ["k3e3", "skip"]}


def draw(sampler, n=30):
    return [sampler.sample() for _ in range(n)]


def test_same_seed_and_block_same_paths_whatever_the_global_rng():
    expected = draw(PathSampler(CHOICES, 7, 1))
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    assert draw(PathSampler(CHOICES, 7, 1)) == expected
    assert all(p["s0_i0"] in CHOICES["s0_i0"] for p in expected)
    assert {p["s0_i0"] for p in expected} == set(CHOICES["s0_i0"])  # uniform draws reach every candidate


def test_paths_depend_on_block_and_seed():
    paths = draw(PathSampler(CHOICES, 7, 1))
    assert paths != draw(PathSampler(CHOICES, 7, 2))
    assert paths != draw(PathSampler(CHOICES, 8, 1))


def test_state_round_trip_and_fixed_block():
    a = PathSampler(CHOICES, 0, 0)
    draw(a, 5)
    state = a.state_dict()
    expected = draw(a, 5)
    b = PathSampler(CHOICES, 0, 0)
    b.load_state_dict(state)
    assert draw(b, 5) == expected
    assert PathSampler({}, 0, 0).sample() == {}
