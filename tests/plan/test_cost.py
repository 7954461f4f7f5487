import torch
from torch import nn

import pytest

from conftest import tiny_config
from nni_pipebd.job import build_job
from nni_pipebd.plan.cost import STUDENT_STEP_FACTOR, estimate_block_costs, forward_macs, job_block_costs
from nni_pipebd.spaces.dna import BlockGeometry, DnaBlock
from nni_pipebd.spaces.supernet import BlockSupernet


def test_forward_macs_counts_convs_and_linears():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert forward_macs(net, (3, 4, 4)) == 8 * 16 * 3 * 9 + 8 * 16 * 1 * 9 + 10 * 128


def test_block_cost_averages_candidates():
    teacher = [nn.Conv2d(4, 4, 3, padding=1)]
    student = BlockSupernet(DnaBlock(0, BlockGeometry(4, 4, 1, 1), kernels=(3, 5), expansions=(1,)), 0)
    shapes = [((4, 4, 4), (4, 4, 4))]
    per_kernel = {k: 16 * 4 * k * k + 16 * 4 * 4 for k in (3, 5)}   # depthwise k x k + 1x1 projection
    expected = (16 * 4 * 4 * 9, STUDENT_STEP_FACTOR * sum(per_kernel.values()) / 2)
    assert estimate_block_costs(teacher, [student], shapes) == [expected]
    assert not student.path  # the probe was a copy
    x = torch.zeros(1, 4, 4, 4)
    assert teacher[0](x).shape == x.shape


def test_job_costs_from_config_or_estimate(tmp_path):
    job = build_job(tiny_config(tmp_path))
    estimated = job_block_costs(job)
    assert len(estimated) == 5 and all(t > 0 and s > 0 for t, s in estimated)
    given = [[1, 2]] * 5
    job.config = tiny_config(tmp_path, execution={"block_costs": given})
    assert job_block_costs(job) == [(1.0, 2.0)] * 5
    job.config = tiny_config(tmp_path, execution={"block_costs": [[1, 2]]})
    with pytest.raises(ValueError, match=r"one \[teacher, student\] pair per block \(5 blocks\)"):
        job_block_costs(job)
