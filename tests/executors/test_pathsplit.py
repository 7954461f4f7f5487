"""Student blocks whose sampled paths (not their batch) are split over devices: same math as one process."""

import datetime
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import FP64, FP64_CLOSE, assert_same_blocks, load_blocks, tiny_config
from nni_pipebd.executors.forkserver import warm_start
from nni_pipebd.config import DistillConfig
from nni_pipebd.distill.trainer import BlockTrainer
from nni_pipebd.executors.comm import allreduce_path_split
from nni_pipebd.executors.launch import train
from nni_pipebd.plan.plan import Phase, Placement, Plan, Relay

pytestmark = pytest.mark.timeout(240)

TIMEOUT = datetime.timedelta(seconds=60)
STEPS = 3
TOLERANCES = {"rtol": FP64_CLOSE["rtol"], "atol": FP64_CLOSE["atol"]}


class Candidates(nn.Module):
    """Three candidate layers, one per path: with two paths a step, at least one is untouched by every rank (no
    bias before BatchNorm: its gradient is rounding noise, which Adam would blow up to steps of size lr)."""

    choices = {"op": ["a", "b", "c"]}

    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleDict({name: nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4))
                                  for name in "abc"})
        self.op = "a"

    def set_path(self, path):
        self.op = path["op"]

    def forward(self, x):
        return self.ops[self.op](x)


def _trainer():
    torch.manual_seed(0)
    config = DistillConfig(optimizer="adam", lr=0.1, paths_per_step=2, seed=11, schedule="constant")
    return BlockTrainer(0, Candidates().double(), config, STEPS)  # float64: the tolerances decide, rounding does not


def _data():
    gen = torch.Generator().manual_seed(4)
    return (torch.randn(STEPS, 6, 4, generator=gen, dtype=torch.float64),
            torch.randn(STEPS, 6, 4, generator=gen, dtype=torch.float64))


def _state(trainer, losses):
    params = trainer.trainable_parameters()
    steps = [int(trainer.optimizer.state[p]["step"]) if p in trainer.optimizer.state else 0 for p in params]
    return {"params": [p.detach().clone() for p in params], "steps": steps, "losses": losses,
            "buffers": {n: b.clone() for n, b in trainer.student.named_buffers()}}


def _worker(rank, world, folder):
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        trainer, (xs, ys), losses = _trainer(), _data(), []
        for x, y in zip(xs, ys):
            loss = trainer.forward_backward(x, y, share=(rank, world))
            loss, stop, stats = allreduce_path_split(trainer.trainable_parameters(), loss, None, rank == 1 and
                                                     len(losses) == 1, trainer.batchnorm_stats)
            trainer.replay_batchnorm(stats)
            trainer.apply(loss)
            losses.append((float(loss), stop))
        torch.save(_state(trainer, losses), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_adam_steps_only_what_some_rank_touched(tmp_path):
    """Two ranks, one path each: the all-reduce sums the gradients, leaves ``grad = None`` where no rank ran
    (Adam neither steps those parameters nor counts a step for them), and carries loss, stop flag and
    BatchNorm statistics; weights, Adam step counts and buffers equal one process running both paths."""
    trainer, (xs, ys), losses = _trainer(), _data(), []
    for x, y in zip(xs, ys):
        losses.append(float(trainer.step(x, y)))
    want = _state(trainer, losses)
    assert min(want["steps"]) < STEPS, "some candidate must have been skipped by every path of some step"
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method=warm_start())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["steps"] == want["steps"]
        for n, (a, b) in enumerate(zip(got["params"], want["params"])):
            torch.testing.assert_close(a, b, **TOLERANCES, msg=lambda m, n=n: f"rank {rank} parameter {n}: {m}")
        assert [loss for loss, _ in got["losses"]] == pytest.approx(want["losses"], rel=TOLERANCES["rtol"])
        assert [stop for _, stop in got["losses"]] == [False, True, False]  # rank 1's stop reached rank 0
        for name in want["buffers"]:
            torch.testing.assert_close(got["buffers"][name], want["buffers"][name], **TOLERANCES,
                                       msg=lambda m, name=name: f"rank {rank} {name}: {m}")


# paths of a supernet block (1) and of the fixed head (4) over both ranks of a two-rank link, next to a batch
# split on the same ranks (DDP there)
PATHS_ON_LINK = Plan([Phase((Relay(0, 5, (0, 1)),),
                            (Placement(0, (0, 1)), Placement(1, (0, 1), "paths"), Placement(2, (0,)),
                             Placement(3, (1,)), Placement(4, (0, 1), "paths")))])
# students fed from one-rank links, two of them path-split
PATHS_APART = Plan([Phase((Relay(0, 3, (0,)), Relay(3, 5, (1,))),
                          (Placement(0, (1,)), Placement(1, (0, 1), "paths"), Placement(2, (0,)),
                           Placement(3, (0, 1), "paths"), Placement(4, (1,))))])


@pytest.mark.parametrize("paths, plan, distill, execution", [
    (2, PATHS_ON_LINK, {}, {"grad_sync": "ddp"}),
    (3, PATHS_APART, {"optimizer": "adam", "lr": 0.01}, {}),  # 3 paths on 2 ranks: shares of 2 and 1
])
@pytest.mark.slow
def test_path_split_placements_match_reference(tmp_path, paths, plan, distill, execution):
    distill = {"epochs": 2, "paths_per_step": paths, **distill}
    reference = train(tiny_config(tmp_path, distill=distill, execution=FP64), tmp_path / "ref")
    path = plan.save(tmp_path / "plan.json")
    config = tiny_config(tmp_path, distill=distill,
                         execution={"executor": "pipebd", "workers": 2, "plan": str(path), **execution, **FP64})
    manifest = train(config, tmp_path / "run")
    assert_same_blocks(tmp_path / "ref", tmp_path / "run", 5, **FP64_CLOSE)
    state = load_blocks(tmp_path / "run", 5)[1]  # a path-split block's BatchNorm buffers, compared above, moved
    assert any(key.endswith("num_batches_tracked") and int(v) > 0 for key, v in state.items())
    for a, b in zip(reference["blocks"], manifest["blocks"]):
        assert a["losses"] == pytest.approx(b["losses"], rel=FP64_CLOSE["rtol"])
    assert manifest["counters"]["teacher_block_forwards_per_sample"] == 5
    assert "P" in plan.grid()
    assert Path(tmp_path / "run").is_dir()
