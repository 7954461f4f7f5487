import pytest
import torch
from nni.nas.nn.pytorch import ModelSpace, Repeat
from nni.nas.oneshot.pytorch.supermodule.sampling import PathSamplingRepeat
from nni.nas.strategy import RandomOneShot
from torch import nn

from nni_pipebd.spaces.compat import ZeroDepthPathSamplingRepeat, supernet_hooks


class Stack(ModelSpace):
    def __init__(self):
        super().__init__()
        self.extra = Repeat(lambda _: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)), (0, 2),
                            label="depth")

    def forward(self, x):
        return self.extra(x)


def resample(space, depth):
    for module in space.modules():
        if hasattr(module, "resample"):
            module.resample(memo={"depth": depth})


def test_nni_repeat_at_depth_zero_still_fails_upstream():
    """The workaround is needed while NNI's own PathSamplingRepeat fails at depth 0 (drop it when this fails)."""
    space = RandomOneShot().mutate_model(Stack())
    assert type(space.extra) is PathSamplingRepeat
    resample(space, 0)
    with pytest.raises(AssertionError):
        space(torch.randn(2, 3, 4, 4))


def test_depth_zero_is_the_identity_and_runs_no_block():
    torch.manual_seed(0)
    space = RandomOneShot(mutation_hooks=supernet_hooks()).mutate_model(Stack())
    assert type(space.extra) is ZeroDepthPathSamplingRepeat
    x = torch.randn(2, 3, 4, 4)
    before = [b.clone() for b in space.buffers()]
    resample(space, 0)
    assert torch.equal(space(x), x)
    assert all(torch.equal(a, b) for a, b in zip(before, space.buffers()))  # no BatchNorm statistics moved
    assert len(space.freeze({"depth": 0}).extra) == 0


@pytest.mark.parametrize("depth", [1, 2])
def test_other_depths_are_nni_forward_and_match_the_frozen_module(depth):
    torch.manual_seed(0)
    space = RandomOneShot(mutation_hooks=supernet_hooks()).mutate_model(Stack()).eval()
    x = torch.randn(2, 3, 4, 4)
    resample(space, depth)
    frozen = space.freeze({"depth": depth}).eval()
    assert len(frozen.extra) == depth
    assert torch.equal(space(x), frozen(x))


def test_several_depths_with_zero_sum_the_identity_in():
    torch.manual_seed(0)
    space = RandomOneShot(mutation_hooks=supernet_hooks()).mutate_model(Stack()).eval()
    x = torch.randn(2, 3, 4, 4)
    resample(space, 2)
    two = space(x)
    space.extra._sampled = [0, 2]
    torch.testing.assert_close(space(x), x + two)
    assert space.extra._sampled == [0, 2]
    space.extra._sampled = None
    with pytest.raises(RuntimeError, match="no depth sampled"):
        space(x)


class NoBias(ModelSpace):
    def __init__(self):
        super().__init__()
        import nni
        from nni.nas.nn.pytorch import MutableBatchNorm2d, MutableConv2d, MutableLinear

        width = nni.choice("w", [2, 4])
        self.conv = MutableConv2d(3, width, 3, padding=1, bias=False)
        self.bn = MutableBatchNorm2d(width, affine=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = MutableLinear(width, 5, bias=False)

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.conv(x))).flatten(1))


def test_nni_freeze_of_a_mixed_operator_without_bias_still_fails_upstream():
    space = RandomOneShot().mutate_model(NoBias())
    with pytest.raises(RuntimeError, match='Unexpected key.*"bias"'):
        space.freeze({"w": 2})


def test_mixed_operators_without_bias_or_affine_weights_freeze_with_their_slices():
    torch.manual_seed(0)
    space = RandomOneShot(mutation_hooks=supernet_hooks()).mutate_model(NoBias()).eval()
    assert type(space.conv).__module__ == "nni_pipebd.spaces.compat"
    for module in space.modules():
        if hasattr(module, "resample"):
            module.resample(memo={"w": 2})
    x = torch.randn(2, 3, 4, 4)
    frozen = space.freeze({"w": 2}).eval()
    assert frozen.conv.bias is None and frozen.conv.weight.shape == (2, 3, 3, 3) and frozen.fc.bias is None
    assert torch.equal(frozen.conv.weight, space.conv.weight[:2])
    assert torch.equal(frozen(x), space(x))
