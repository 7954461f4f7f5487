"""BatchNorm statistics of a step's paths recorded on the ranks that ran them and replayed in path order."""

import copy

import pytest
import torch
from torch import nn

from nni_pipebd.config import DistillConfig
from nni_pipebd.distill.bnstats import BatchNormRecorder
from nni_pipebd.distill.trainer import BlockTrainer


class TinySupernet(nn.Module):
    """A stem and three candidates: plain BatchNorm, ``momentum=None`` (cumulative average), and one whose
    BatchNorm runs twice per forward."""

    choices = {"op": ["plain", "average", "twice"]}

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.ops = nn.ModuleDict({"plain": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
                                  "average": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None)),
                                  "twice": nn.Conv2d(4, 4, 1)})
        self.twice_bn = nn.BatchNorm2d(4, momentum=0.3)
        self.head = nn.BatchNorm1d(4)  # on (N, C) after pooling: another input layout
        self.op = "plain"

    def set_path(self, path):
        self.op = path["op"]

    def forward(self, x):
        x = self.stem(x)
        if self.op == "twice":
            x = self.twice_bn(torch.relu(self.twice_bn(self.ops["twice"](x))))
        else:
            x = self.ops[self.op](x)
        return self.head(x.mean(dim=(2, 3)))[:, :, None, None] + x


def _buffers(module):
    return {name: b.clone() for name, b in module.named_buffers()}


def _assert_buffers(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


PATHS = ["twice", "average", "plain", "average", "twice"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_replay_of_recorded_paths_equals_sequential_forwards(ranks):
    torch.manual_seed(0)
    net = TinySupernet().train()
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    reference = copy.deepcopy(net)
    for step in range(2):  # the second step starts from non-default buffers and counts
        for op in PATHS:
            reference.set_path({"op": op})
            reference(x + step)
        copies = [copy.deepcopy(net) for _ in range(ranks)]
        recorders = [BatchNormRecorder(c, len(PATHS)) for c in copies]
        for q, (c, recorder) in enumerate(zip(copies, recorders)):
            before = _buffers(c)
            recorder.start(x.device)
            for j, op in enumerate(PATHS):
                if j % ranks == q:
                    recorder.path(j)
                    c.set_path({"op": op})
                    c(x + step)
            recorder.finish()
            _assert_buffers(_buffers(c), before)  # left as before the step
        total = sum(recorder.slots for recorder in recorders)
        for c, recorder in zip(copies, recorders):
            recorder.replay(total)
            _assert_buffers(_buffers(c), _buffers(reference))
        net = copies[0]
    assert int(net.twice_bn.num_batches_tracked) == 2 * 2 * PATHS.count("twice")


def test_replay_refuses_records_of_another_block():
    recorder = BatchNormRecorder(TinySupernet(), 2)
    with pytest.raises(ValueError, match=r"3 recorded values, expected 110 \(2 paths x 55 per path\)"):
        recorder.replay(torch.zeros(3))
    with pytest.raises(ValueError, match="path 2 is not one of the step's 2 paths"):
        recorder.path(2)


def nni_width_space():
    """A user's NNI space whose BatchNorm widths are searched (``MutableBatchNorm2d``): a sampled path normalises
    a prefix of the channels and, sampled by NNI's one-shot supernet, does not count ``num_batches_tracked``."""
    import sys
    from pathlib import Path

    from nni_pipebd.spaces.supernet import BlockSupernet

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "custom"))
    try:
        from custom_space import BlockSpace
    finally:
        sys.path.pop(0)
    return BlockSupernet(BlockSpace(0, 3, 4, 1, widths=(0.5, 1.0)), 0)


def _trainer(paths, optimizer="adam", space=TinySupernet):
    torch.manual_seed(0)
    config = DistillConfig(optimizer=optimizer, lr=0.05, paths_per_step=paths, seed=5)
    return BlockTrainer(0, space(), config, 10)


@pytest.mark.parametrize("paths, ranks, space", [(2, 2, TinySupernet), (3, 2, TinySupernet),
                                                 (4, 2, nni_width_space), (3, 3, nni_width_space)])
def test_shared_paths_sum_to_the_whole_step(paths, ranks, space):
    """Ranks sharing the paths (gradients and statistics summed by hand here) match one trainer running them all:
    the loss, every gradient (``None`` exactly where no path reached), the paths, the BatchNorm buffers."""
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 5, 5), torch.randn(6, 4, 5, 5)
    whole = _trainer(paths, space=space)
    shared = [_trainer(paths, space=space) for _ in range(ranks)]
    widths = set()
    for _ in range(3):
        loss = whole.forward_backward(x, y)
        parts = [t.forward_backward(x, y, share=(q, ranks)) for q, t in enumerate(shared)]
        torch.testing.assert_close(sum(parts), loss)
        assert all(t.last_paths == whole.last_paths for t in shared)
        stats = sum(t.batchnorm_stats for t in shared)
        for name, p in whole.student.named_parameters():
            grads = [dict(t.student.named_parameters())[name].grad for t in shared]
            if p.grad is None:
                assert all(g is None for g in grads), name
            else:
                torch.testing.assert_close(sum(g for g in grads if g is not None), p.grad)
        for t in shared:
            t.replay_batchnorm(stats)
            _assert_buffers(_buffers(t.student), _buffers(whole.student))
        widths.update(path.get("b0_width") for path in whole.last_paths)
        x = x + 0.5
    if space is nni_width_space:
        assert widths == {2, 4}  # both widths were sampled: a prefix of the buffers and all of them
    with pytest.raises(ValueError, match=r"share \(2, 2\) must be \(index, count\)"):
        shared[0].forward_backward(x, y, share=(2, 2))


def test_recording_refuses_more_channels_than_the_layer_has():
    recorder = BatchNormRecorder(nn.Sequential(nn.BatchNorm2d(4)), 1)
    recorder.start(torch.device("cpu"))
    with pytest.raises(ValueError, match="BatchNorm layer 0 of 4 channels got 6 channels in path 0: its statistics "
                                         "cannot be replayed; split this block's batch instead of its paths"):
        recorder.layers[0](torch.randn(2, 6, 3, 3))
    recorder.finish()
