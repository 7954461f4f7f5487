"""A user's own student block space, written with NNI 3.0 mutables: one ``ModelSpace`` per teacher block.

Nothing here knows nni_pipebd: the config names ``custom_space:block_space`` as ``model.student.class_path``; the
plugin calls it once per teacher block with the block's geometry and trains each returned space as a weight-sharing
supernet (NNI's one-shot path sampling). Each block chooses its width (``nni.choice`` in ``MutableConv2d`` /
``MutableBatchNorm2d``), its operation (``LayerChoice``) and how many extra layers it runs (``Repeat``, 0 included).
Labels carry the block index, so a sample dict of the whole student names every block's choices.
"""

from typing import Optional, Sequence, Tuple

import nni
from nni.nas.nn.pytorch import LayerChoice, ModelSpace, MutableBatchNorm2d, MutableConv2d, Repeat
from torch import nn


def conv_bn_relu(in_channels, out_channels, kernel: int, stride: int = 1) -> nn.Sequential:
    """A convolution whose widths may be NNI choices, its BatchNorm and a ReLU."""
    return nn.Sequential(MutableConv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         MutableBatchNorm2d(out_channels), nn.ReLU(inplace=True))


class BlockSpace(ModelSpace):
    """Strided entry convolution of a searched width, a searched operation, 0..``max_depth`` extra layers, and a
    1x1 projection to the teacher block's width.

    Parameters
    ----------
    index : int
        Block index (in every label).
    in_channels, out_channels, stride : int
        What the teacher block maps.
    widths : sequence of float
        Candidate inner widths, relative to ``out_channels``.
    max_depth : int
        Most extra 3x3 layers.
    """

    def __init__(self, index: int, in_channels: int, out_channels: int, stride: int,
                 widths: Sequence[float] = (0.5, 1.0), max_depth: int = 2):
        super().__init__()
        width = nni.choice(f"b{index}_width", sorted({max(1, round(out_channels * w)) for w in widths}))
        self.entry = conv_bn_relu(in_channels, width, 3, stride)
        self.op = LayerChoice({"conv3": conv_bn_relu(width, width, 3), "conv5": conv_bn_relu(width, width, 5),
                               "skip": nn.Identity()}, label=f"b{index}_op")
        self.extra = Repeat(lambda _: conv_bn_relu(width, width, 3), (0, max_depth), label=f"b{index}_depth")
        self.project = nn.Sequential(MutableConv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.project(self.extra(self.op(self.entry(x))))


def block_space(index: int, shape_in: Tuple[int, ...], shape_out: Tuple[int, ...], teacher_block: nn.Module,
                widths: Sequence[float] = (0.5, 1.0), max_depth: int = 2) -> Optional[BlockSpace]:
    """The factory the config names: a :class:`BlockSpace` for a feature block, ``None`` for the classifier head
    (the plugin then trains a fresh copy of the teacher's head)."""
    if len(shape_out) != 3:
        return None
    return BlockSpace(index, shape_in[0], shape_out[0], shape_in[1] // shape_out[1], widths, max_depth)


class StudentSpace(ModelSpace):
    """The whole student as one NNI space, for Python users: ``blocks`` are the block spaces, in teacher order.

    Hand it to ``NasExperiment`` with a ``BlockwiseDistillation`` evaluator and that very space is distilled (one
    fewer block than the teacher: the classifier head is a fresh copy of the teacher's). E.g. for the teacher of
    ``custom_teacher.build(in_channels=1, width=16)`` on 16x16 images:
    ``StudentSpace([BlockSpace(0, 1, 16, 1), BlockSpace(1, 16, 32, 2), BlockSpace(2, 32, 64, 2)])``.
    """

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
