"""``execution.grad_sync: ddp``: batch-split student blocks in DistributedDataParallel train what the flat all-reduce
and the single-process reference train (the same math, up to float64 rounding), stop together and resume.

The gloo workers of the first test import this module: it keeps NNI (the plan and launch modules) out of its imports.
"""

import copy
import datetime
import os
import signal
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import FP64, FP64_CLOSE, assert_same_blocks, tiny_config
from nni_pipebd.executors.forkserver import warm_start
from nni_pipebd.config import DistillConfig
from nni_pipebd.distill.trainer import BlockTrainer
from nni_pipebd.executors.comm import allreduce_gradients, data_parallel
from nni_pipebd.executors.syncbn import convert_sync_batchnorm

pytestmark = pytest.mark.timeout(240)

DISTILL = {"paths_per_step": 2}  # the first path's gradients accumulate under no_sync, summed with the last's


def train(config, out, **kwargs):
    from nni_pipebd.executors.launch import train as launch_train

    return launch_train(config, out, **kwargs)


def same_losses(a, b):
    for x, y in zip(a["blocks"], b["blocks"]):
        assert x["losses"] == pytest.approx(y["losses"], rel=FP64_CLOSE["rtol"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ref"
    return out, train(tiny_config(distill=DISTILL, execution=FP64), out)


class _Supernet(nn.Module):
    """A stem and one of three candidate convolutions (+ BatchNorm) per step: most parameters get no gradient."""

    choices = {"op": ["k1", "k3", "k5"]}

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.ops = nn.ModuleDict({f"k{k}": nn.Sequential(nn.Conv2d(4, 4, k, padding=k // 2), nn.BatchNorm2d(4))
                                  for k in (1, 3, 5)})
        self.op = "k1"

    def set_path(self, path):
        self.op = path["op"]

    def forward(self, x):
        return self.ops[self.op](self.stem(x))


ROWS = (3, 5)  # an uneven split of 8 rows: averaging instead of summing would show
TOLERANCES = {"rtol": FP64_CLOSE["rtol"], "atol": FP64_CLOSE["atol"]}


def _ddp_worker(rank, store):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(ROWS),
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(len(ROWS))))
        torch.manual_seed(0)
        student = _Supernet().double()  # float64: the tolerances below decide, rounding does not
        batches = [(torch.randn(8, 3, 6, 6).double(), torch.randn(8, 4, 6, 6).double()) for _ in range(4)]
        lo, hi = sum(ROWS[:rank]), sum(ROWS[:rank + 1])
        for k in (1, 2):
            config = DistillConfig(optimizer="sgd", lr=0.1, paths_per_step=k, seed=3)
            flat, ddp = (BlockTrainer(0, convert_sync_batchnorm(copy.deepcopy(student), group, "cpu"), config, 4)
                         for _ in range(2))
            ddp.forward_module = data_parallel(ddp.student, group, torch.device("cpu"))
            assert ddp.forward_module is not ddp.student and ddp.state_dict().keys() == flat.state_dict().keys()
            unused = mixed = 0
            for x, target in batches:
                scale = (hi - lo) / 8
                a = flat.forward_backward(x[lo:hi], target[lo:hi], scale)
                a = allreduce_gradients(flat.parameters_with_grad(), a, group)
                b = allreduce_gradients([], ddp.forward_backward(x[lo:hi], target[lo:hi], scale), group)
                torch.testing.assert_close(b, a, **TOLERANCES)
                assert flat.last_paths == ddp.last_paths
                mixed += len({path["op"] for path in ddp.last_paths}) > 1
                for (name, p), q in zip(flat.student.named_parameters(), ddp.student.parameters()):
                    assert (p.grad is None) == (q.grad is None), f"k={k} {name}: {p.grad is None} {q.grad is None}"
                    unused += p.grad is None
                    if p.grad is not None:
                        torch.testing.assert_close(q.grad, p.grad, **TOLERANCES,
                                                   msg=lambda m, name=name: f"k={k} {name}: {m}")
                flat.apply(a)
                ddp.apply(b)
            assert unused and (k == 1 or mixed), (k, unused, mixed)  # unused candidates; paths accumulated
            for (name, p), q in zip(flat.student.state_dict().items(), ddp.student.state_dict().values()):
                torch.testing.assert_close(q, p, **TOLERANCES, msg=lambda m, name=name: f"k={k} {name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sums_the_gradients_of_the_sampled_paths_like_the_flat_all_reduce(tmp_path):
    """Per step: the same loss and gradients as the flat all-reduce, no gradient where no path went (momentum
    leaves those parameters alone), the paths of a step accumulated under ``no_sync`` and summed with the last."""
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "store"),), nprocs=len(ROWS), join=True,
                       start_method=warm_start())


@pytest.mark.slow
def test_hybrid_plan_with_ddp_matches_reference(tmp_path, reference):
    """Pipe-BD's AHD: blocks 0 and 1 batch-split over ranks 0 and 1, blocks 2-4 on rank 2."""
    from nni_pipebd.plan.plan import Plan, Stage

    path = Plan([Stage(0, 2, 2), Stage(2, 5, 1)]).save(tmp_path / "plan.json")
    config = tiny_config(tmp_path, distill=DISTILL,
                         execution={"executor": "pipebd", "workers": 3, "plan": str(path), "grad_sync": "ddp", **FP64})
    manifest = train(config, tmp_path / "run")
    assert_same_blocks(reference[0], tmp_path / "run", 5, **FP64_CLOSE)
    same_losses(reference[1], manifest)
    assert manifest["counters"]["teacher_block_forwards_per_sample"] == 5


@pytest.mark.slow
def test_dp_with_ddp_stops_together_and_resumes_to_the_reference(tmp_path, reference, monkeypatch):
    """dp: the leader's stop decision reaches rank 1 only in the all-reduce of loss and flag after DDP's backward;
    both ranks checkpoint the same step, and the resumed run ends at the reference's weights."""
    from nni_pipebd.executors.faults import ENV
    from nni_pipebd.executors.stopping import RunStopped
    from test_stopping import SLOW, checkpointed, stopped_steps, wait_for

    config = tiny_config(tmp_path, distill=DISTILL,
                         execution={"executor": "dp", "workers": 2, "grad_sync": "ddp", "checkpoint_every": 1, **FP64})
    run, finished = tmp_path / "run", threading.Event()

    def signal_after_the_first_checkpoints():
        ready = checkpointed(run, ["rank0", "rank1"])
        wait_for(lambda: finished.is_set() or ready(), 120, "the first checkpoints")
        if not finished.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # to this process, the run's lead

    monkeypatch.setenv(ENV, SLOW)  # rank 0 sleeps before every step: the run lasts long enough to signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a signal that comes after the run does nothing
    thread = threading.Thread(target=signal_after_the_first_checkpoints, daemon=True)
    try:
        thread.start()
        with pytest.raises(RunStopped, match="stopped on SIGTERM after step") as stopped:
            train(config, run)
    finally:
        finished.set()
        thread.join(10)
        signal.signal(signal.SIGTERM, previous)
    step = stopped.value.step
    assert step < 15 and stopped_steps(run) == {"rank0": step, "rank1": step}
    monkeypatch.delenv(ENV)
    manifest = train(config, run, resume=True)
    assert_same_blocks(reference[0], run, 5, **FP64_CLOSE)
    same_losses(reference[1], manifest)
