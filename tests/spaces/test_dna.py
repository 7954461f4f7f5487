import pytest
import torch
from nni.nas.nn.pytorch import LayerChoice

from nni_pipebd.spaces.dna import SKIP, BlockGeometry, DnaBlock, MBConv, StudentSpace
from nni_pipebd.spaces.supernet import BlockSupernet


def supernet(index, geometry, **kwargs):
    return BlockSupernet(DnaBlock(index, geometry, **kwargs), index)


def test_labels_candidates_and_strides():
    block = supernet(2, BlockGeometry(8, 16, 2, 3), kernels=(3, 5), expansions=(3, 6), identity=True)
    choices = block.choices
    assert list(choices) == ["s2_i0", "s2_i1", "s2_i2"]
    assert choices["s2_i0"] == ["k3e3", "k3e6", "k5e3", "k5e6"]          # stride 2, width changes: no skip
    assert choices["s2_i1"] == ["k3e3", "k3e6", "k5e3", "k5e6", SKIP]
    block.set_path({"s2_i0": "k5e6", "s2_i1": SKIP, "s2_i2": "k3e3"})
    assert block(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)


def test_stride_four_spreads_over_layers_and_adds_layers():
    block = supernet(0, BlockGeometry(3, 8, 4, 1))
    assert len(block.layers) == 2
    block.set_path({label: "k3e3" for label in block.choices})
    assert block(torch.randn(1, 3, 16, 16)).shape == (1, 8, 4, 4)


def test_bad_stride_and_bad_path():
    with pytest.raises(ValueError, match="block 1: .*downsamples by 3"):
        DnaBlock(1, BlockGeometry(3, 8, 3, 2))
    block = supernet(0, BlockGeometry(4, 4, 1, 1))
    with pytest.raises(KeyError, match="s0_i0"):
        block.set_path({})
    with pytest.raises(ValueError, match="'k9e9' is not a candidate"):
        block.set_path({"s0_i0": "k9e9"})
    with pytest.raises(RuntimeError, match="call set_path"):
        block(torch.randn(1, 4, 4, 4))


def test_freeze_gives_plain_module_sharing_trained_weights():
    space = StudentSpace([supernet(0, BlockGeometry(3, 8, 2, 2)), supernet(1, BlockGeometry(8, 8, 1, 1))])
    sample = {"s0_i0": "k3e3", "s0_i1": "k7e6", "s1_i0": "k5e3"}
    assert set(space.simplify()) == set(sample)
    for block in space.blocks:
        block.set_path(sample)
    x = torch.randn(2, 3, 8, 8)
    space.eval()
    expected = space(x)
    net = space.freeze(sample)
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    net.eval()
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    assert isinstance(net.blocks[0].layers[1], MBConv)
