import pytest
import torch
from torch import nn

from nni_pipebd.spaces.dna import BlockGeometry, DnaBlock as _DnaBlock
from nni_pipebd.spaces.supernet import BlockSupernet
from nni_pipebd.spec.blocks import BlockSpec, ShapeMismatchError, block_seed


def DnaBlock(index, geometry):
    return BlockSupernet(_DnaBlock(index, geometry), index)


def teacher():
    return [nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()), nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1))]


def test_spec_records_shapes_and_freezes_teacher():
    t = teacher()
    spec = BlockSpec(t, [DnaBlock(0, BlockGeometry(3, 8, 2, 1)), DnaBlock(1, BlockGeometry(8, 16, 1, 2))],
                     torch.randn(2, 3, 8, 8))
    assert spec.shapes == [((3, 8, 8), (8, 4, 4)), ((8, 4, 4), (16, 4, 4))]
    assert len(spec) == 2
    assert all(not p.requires_grad for block in t for p in block.parameters())
    assert not t[0].training


def test_mismatch_names_block_and_both_shapes():
    with pytest.raises(ShapeMismatchError, match=r"block 1: student output shape \(12, 4, 4\).* != teacher output "
                                                 r"shape \(16, 4, 4\) \(block input \(8, 4, 4\)\)"):
        BlockSpec(teacher(), [DnaBlock(0, BlockGeometry(3, 8, 2, 1)), DnaBlock(1, BlockGeometry(8, 12, 1, 1))],
                  torch.randn(2, 3, 8, 8))


def test_wrong_input_width_and_block_count():
    with pytest.raises(ShapeMismatchError, match=r"block 1: student block fails on the teacher block's input shape"):
        BlockSpec(teacher(), [DnaBlock(0, BlockGeometry(3, 8, 2, 1)), nn.Conv2d(5, 16, 1)], torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="2 teacher blocks but 1 student blocks"):
        BlockSpec(teacher(), [nn.Identity()], torch.randn(2, 3, 8, 8))


def test_block_seed_distinct():
    seeds = {block_seed(s, i) for s in range(5) for i in range(10)}
    assert len(seeds) == 50


def test_mismatch_names_the_label_and_value_that_break_a_block_space():
    import nni
    from nni.nas.nn.pytorch import LayerChoice, ModelSpace, MutableConv2d

    class Space(ModelSpace):
        def __init__(self):
            super().__init__()
            width = nni.choice("b1_width", [16, 12])
            self.op = LayerChoice({"same": nn.Conv2d(8, 8, 3, 1, 1), "down": nn.Conv2d(8, 8, 3, 2, 1)}, label="b1_op")
            self.out = MutableConv2d(8, width, 1)

        def forward(self, x):
            return self.out(self.op(x))

    with pytest.raises(ShapeMismatchError, match=r"block 1: student output shape \(12, 2, 2\) with b1_op = 'down' "
                                                 r"\(path .*\) != teacher output shape \(16, 4, 4\)"):
        BlockSpec(teacher(), [DnaBlock(0, BlockGeometry(3, 8, 2, 1)), BlockSupernet(Space(), 1)],
                  torch.randn(2, 3, 8, 8))


class _Volume(nn.Module):
    """Ends in avg_pool3d, an op autocast runs in fp32: the block's output is fp32 even under bf16."""

    def forward(self, x):
        return nn.functional.avg_pool3d(x.unsqueeze(2), 1).squeeze(2)


def test_dtypes_are_probed_under_the_precision_not_assumed():
    t = [nn.Conv2d(3, 8, 3, 1, 1), nn.Sequential(nn.Conv2d(8, 8, 1), _Volume()), nn.Conv2d(8, 4, 1)]
    spec = BlockSpec(t, [nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)], torch.randn(2, 3, 6, 6))
    f32, bf16 = torch.float32, torch.bfloat16
    assert spec.dtypes(torch.device("cpu")) == [(f32, f32)] * 3
    assert spec.dtypes(torch.device("cpu"), "bf16") == [(f32, bf16), (bf16, f32), (f32, bf16)]  # data in fp32
    assert spec.dtypes(torch.device("cpu"), "bf16", channels_last=True) == [(f32, bf16), (bf16, f32), (f32, bf16)]
    assert spec.dtypes(torch.device("cpu"), "fp64") == [(torch.float64, torch.float64)] * 3  # data cast too
    assert all(p.device.type == "cpu" and p.dtype == f32 for block in spec.teacher
               for p in block.parameters())  # left as it was
