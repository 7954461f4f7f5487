"""DONNA student search space: MobileNet-type blocks choosing kernel, expansion, depth, attention and width."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import nni
import torch
from torch import nn

from nni.nas.nn.pytorch import LayerChoice, ModelSpace, MutableBatchNorm2d, MutableConv2d, Repeat

from .dna import block_geometry

__all__ = ["SqueezeExcite", "DonnaLayer", "DonnaBlock", "donna_space", "width_choices", "ATTENTIONS"]

Shape = Tuple[int, ...]

ATTENTIONS = ("none", "se")
"""Attention candidates: no attention, or squeeze-and-excitation."""


def width_choices(out_channels: int, widths: Sequence[float]) -> list:
    """Inner channel counts of a block: ``max(1, round(out_channels * w))`` for each ``w``, sorted, distinct."""
    return sorted({max(1, int(round(out_channels * w))) for w in widths})


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid gate.

    Parameters
    ----------
    channels : int or nni.mutable.MutableExpression
        Channels of the gated feature map (may be an NNI choice).
    squeeze : int
        Channels of the bottleneck.
    """

    def __init__(self, *, channels: Any, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = MutableConv2d(channels, squeeze, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = MutableConv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class DonnaLayer(nn.Module):
    """Inverted residual layer whose kernel, expansion, attention and widths may be NNI choices.

    1x1 expand, kxk depthwise (stride ``stride``), attention, 1x1 project; the input is added when ``residual``.

    Parameters
    ----------
    in_channels, out_channels : int or nni.mutable.MutableExpression
        Widths of input and output.
    stride : int
        Stride of the depthwise convolution.
    kernel, expansion : int or nni.mutable.MutableExpression
        Depthwise kernel size (odd) and width of the hidden layer relative to ``in_channels``.
    attention : nn.Module
        Applied to the depthwise output (e.g. a ``LayerChoice`` of ``none`` / ``se``).
    residual : bool
        Add the input (stride 1 and equal widths only).
    """

    def __init__(self, *, in_channels: Any, out_channels: Any, stride: int, kernel: Any, expansion: Any,
                 attention: nn.Module, residual: bool):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = nn.Sequential(MutableConv2d(in_channels, hidden, 1, bias=False), MutableBatchNorm2d(hidden),
                                    nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(
            MutableConv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            MutableBatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.attention = attention
        self.project = nn.Sequential(MutableConv2d(hidden, out_channels, 1, bias=False),
                                     MutableBatchNorm2d(out_channels))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.attention(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class DonnaBlock(ModelSpace):
    """One DONNA block space: 1..``max_depth`` inverted residual layers sharing one kernel, expansion and attention
    choice, at a chosen inner width, then a 1x1 projection to the teacher block's width.

    Layer 0 maps ``in_channels`` to the inner width and does the block's whole downsampling (always present); layers
    1.. are residual. Labels: ``s{index}_width``, ``s{index}_kernel``, ``s{index}_expansion``,
    ``s{index}_attention`` and ``s{index}_depth`` (an NNI ``Repeat`` over ``(1, max_depth)``). A plain NNI model
    space: :class:`~nni_pipebd.spaces.supernet.BlockSupernet` makes it a weight-sharing supernet.

    Parameters
    ----------
    index : int
        Block index (in every label).
    in_channels, out_channels, stride : int
        What the teacher block maps: widths and downsampling factor.
    max_depth : int
        Most layers.
    kernels, expansions : sequence of int
        Candidate depthwise kernel sizes and expansion ratios.
    widths : sequence of float
        Candidate inner widths relative to ``out_channels``.
    attentions : sequence of str
        Candidate attention modules, of ``none`` and ``se``.
    """

    def __init__(self, *, index: int, in_channels: int, out_channels: int, stride: int, max_depth: int,
                 kernels: Sequence[int] = (3, 5, 7), expansions: Sequence[int] = (2, 3, 4, 6),
                 widths: Sequence[float] = (0.5, 0.75, 1.0), attentions: Sequence[str] = ATTENTIONS):
        super().__init__()
        unknown = [a for a in attentions if a not in ATTENTIONS]
        if unknown or not attentions:
            raise ValueError(f"block {index}: attentions = {list(attentions)!r}; choose among {list(ATTENTIONS)}")
        width = nni.choice(f"s{index}_width", width_choices(out_channels, widths))
        kernel = nni.choice(f"s{index}_kernel", list(kernels))
        expansion = nni.choice(f"s{index}_expansion", list(expansions))
        squeeze = max(1, out_channels // 4)

        def layer(j: int) -> DonnaLayer:
            hidden = (in_channels if j == 0 else width) * expansion
            candidates = {"none": nn.Identity(), "se": SqueezeExcite(channels=hidden, squeeze=squeeze)}
            attention = LayerChoice({a: candidates[a] for a in attentions}, label=f"s{index}_attention")
            return DonnaLayer(in_channels=in_channels if j == 0 else width, out_channels=width,
                              stride=stride if j == 0 else 1, kernel=kernel, expansion=expansion,
                              attention=attention, residual=j > 0)

        self.index = index
        self.layers = Repeat(layer, (1, max_depth), label=f"s{index}_depth")
        self.project = nn.Sequential(MutableConv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.layers(x))


def donna_space(index: int, shape_in: Shape, shape_out: Shape, teacher_block: nn.Module, *,
                kernels: Sequence[int] = (3, 5, 7), expansions: Sequence[int] = (2, 3, 4, 6),
                widths: Sequence[float] = (0.5, 0.75, 1.0), attentions: Sequence[str] = ATTENTIONS,
                layers: Optional[int] = None) -> Optional[DonnaBlock]:
    """The block-space factory of ``model.student.kind: donna``: a :class:`DonnaBlock` following the teacher block.

    The most layers is ``layers`` or, as for DNA, the teacher block's count of spatial (kernel > 1) convolutions. A
    block whose output is not a feature map (the classifier head) gets ``None``: a fresh copy of the teacher block.
    """
    if len(shape_out) != 3:
        return None
    geometry = block_geometry(index, teacher_block, shape_in, shape_out, layers)
    return DonnaBlock(index=index, in_channels=geometry.in_channels, out_channels=geometry.out_channels,
                      stride=geometry.stride, max_depth=geometry.num_layers, kernels=kernels, expansions=expansions,
                      widths=widths, attentions=attentions)
