"""A user's cell-style block space (ENAS / DARTS habits) with NNI 3.0 mutables: ``InputChoice`` and width expressions.

Nothing here knows nni_pipebd: name ``cell_space:block_space`` as ``model.student.class_path``. Each block chooses a
width ``w`` (``nni.choice``) that two layers use as the expression ``w * 2`` and two as ``w // 2``, an operation
(``LayerChoice``), one of two hidden states (``InputChoice``, ``n_chosen=1``) and two of three more to sum
(``InputChoice``, ``n_chosen=2``). A path holds an ``InputChoice``'s chosen inputs as a list of indices, NNI's sample
format: e.g. ``{"c1_width": 8, "c1_op": "conv5", "c1_first": [1], "c1_pair": [0, 2]}``.
"""

from typing import Optional, Sequence, Tuple

import nni
from nni.nas.nn.pytorch import InputChoice, LayerChoice, ModelSpace, MutableBatchNorm2d, MutableConv2d
from torch import nn


def conv_bn_relu(in_channels, out_channels, kernel: int, stride: int = 1) -> nn.Sequential:
    """A convolution whose widths may be NNI choices or expressions of them, its BatchNorm and a ReLU."""
    return nn.Sequential(MutableConv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         MutableBatchNorm2d(out_channels), nn.ReLU(inplace=True))


class CellSpace(ModelSpace):
    """Entry (strided, ``2w`` wide), a searched operation and a 3x3 layer on it; the sum of one chosen state and two
    more chosen ones, squeezed to ``w // 2`` and projected to the teacher block's width.

    Parameters
    ----------
    index : int
        Block index (in every label).
    in_channels, out_channels, stride : int
        What the teacher block maps.
    widths : sequence of int
        Candidate values of ``w``.
    """

    def __init__(self, index: int, in_channels: int, out_channels: int, stride: int, widths: Sequence[int] = (4, 8)):
        super().__init__()
        w = nni.choice(f"c{index}_width", list(widths))
        self.entry = conv_bn_relu(in_channels, w * 2, 3, stride)
        self.op = LayerChoice({"conv3": conv_bn_relu(w * 2, w * 2, 3), "conv5": conv_bn_relu(w * 2, w * 2, 5)},
                              label=f"c{index}_op")
        self.extra = conv_bn_relu(w * 2, w * 2, 3)
        self.first = InputChoice(2, n_chosen=1, reduction="sum", label=f"c{index}_first")
        self.pair = InputChoice(3, n_chosen=2, reduction="sum", label=f"c{index}_pair")
        self.squeeze = nn.Sequential(MutableConv2d(w * 2, w // 2, 1, bias=False), MutableBatchNorm2d(w // 2))
        self.project = nn.Sequential(MutableConv2d(w // 2, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        h0 = self.entry(x)
        h1 = self.op(h0)
        h2 = self.extra(h1)
        return self.project(self.squeeze(self.first([h1, h2]) + self.pair([h0, h1, h2])))


def block_space(index: int, shape_in: Tuple[int, ...], shape_out: Tuple[int, ...], teacher_block: nn.Module,
                widths: Sequence[int] = (4, 8)) -> Optional[CellSpace]:
    """The factory the config names: a :class:`CellSpace` per feature block, ``None`` for the classifier head."""
    if len(shape_out) != 3:
        return None
    return CellSpace(index, shape_in[0], shape_out[0], shape_in[1] // shape_out[1], widths)
