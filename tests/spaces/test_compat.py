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


class Widths(ModelSpace):
    def __init__(self):
        super().__init__()
        import nni
        from nni.nas.nn.pytorch import MutableBatchNorm2d, MutableConv2d
        width = nni.choice("w", [2, 4])
        self.conv = MutableConv2d(3, width, 1)
        self.bn = MutableBatchNorm2d(width)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_mixed_batchnorm_follows_its_momentum_like_nn_batchnorm():
    """BN recalibration sets momentum = None for an exact average; NNI 3.0's mixed BN kept the constructor's 0.1."""
    torch.manual_seed(0)
    space = RandomOneShot(mutation_hooks=supernet_hooks()).mutate_model(Widths())
    for module in space.modules():
        if hasattr(module, "resample"):
            module.resample(memo={"w": 2})
    batches = [torch.randn(5, 3, 4, 4) * (i + 1) + i for i in range(3)]
    plain = nn.BatchNorm2d(2)
    space.bn.momentum = plain.momentum = None
    space.train(), plain.train()
    with torch.no_grad():
        for x in batches:
            h = space.conv(x)
            torch.testing.assert_close(space.bn(h), plain(h), rtol=0, atol=0)
    assert int(space.bn.num_batches_tracked) == int(plain.num_batches_tracked) == 3
    torch.testing.assert_close(space.bn.running_mean[:2], plain.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(space.bn.running_var[:2], plain.running_var, rtol=0, atol=0)
    # the default momentum: NNI's exponential average, unchanged
    space.bn.momentum = plain.momentum = 0.1
    with torch.no_grad():
        h = space.conv(batches[0])
        space.bn(h), plain(h)
    torch.testing.assert_close(space.bn.running_var[:2], plain.running_var, rtol=0, atol=0)


def test_a_space_survives_pickling(monkeypatch):
    """NNI 3.0 tests its "no default" sentinel by identity; without the fix an unpickled space fails on a sample."""
    import io

    from conftest import EXAMPLES
    from nni_pipebd.spaces.supernet import BlockSupernet

    monkeypatch.syspath_prepend(str(EXAMPLES / "custom"))
    import custom_space

    buffer = io.BytesIO()
    torch.save(custom_space.BlockSpace(0, 3, 4, 2), buffer)
    buffer.seek(0)
    supernet = BlockSupernet(torch.load(buffer, weights_only=False), 0)
    supernet.set_path({"b0_width": 2, "b0_op": "conv5", "b0_depth": 1})
    assert supernet(torch.zeros(2, 3, 8, 8)).shape == (2, 4, 4, 4)
