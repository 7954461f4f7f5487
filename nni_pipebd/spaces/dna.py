"""DNA student search space: MBConv block spaces built with NNI 3.0 ``LayerChoice``, and its block factory."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nni.nas.nn.pytorch import LayerChoice, ModelSpace

__all__ = ["MBConv", "BlockGeometry", "DnaBlock", "StudentSpace", "dna_space", "block_geometry", "candidate_name",
           "path_choices", "SKIP"]

_logger = logging.getLogger(__name__)

Shape = Tuple[int, ...]

SKIP = "skip"
"""Name of the identity candidate."""


def candidate_name(kernel: int, expansion: int) -> str:
    """NNI candidate name of an MBConv choice, e.g. ``k3e6``."""
    return f"k{kernel}e{expansion}"


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2) block: 1x1 expand, kxk depthwise, 1x1 project, residual when shapes allow.

    Parameters
    ----------
    in_channels, out_channels : int
        Widths of input and output.
    kernel : int
        Depthwise kernel size (odd).
    expansion : int
        Width of the hidden layer relative to ``in_channels``.
    stride : int
        Stride of the depthwise convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: List[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


@dataclass(frozen=True)
class BlockGeometry:
    """What a student block must map: input width, output width, downsampling factor and layer count."""

    in_channels: int
    out_channels: int
    stride: int
    num_layers: int


class DnaBlock(ModelSpace):
    """One DNA block space: ``num_layers`` layers, each an NNI ``LayerChoice`` over MBConv kernels x expansions.

    Layers are labelled ``s{index}_i{layer}`` and candidates ``k{kernel}e{expansion}`` (plus ``skip`` where the
    layer keeps stride 1 and width and ``identity`` is on). The downsampling of the block is spread as stride-2
    layers at its start; inner layers have ``round(out_channels * width_mult)`` channels, the last layer maps to
    ``out_channels``. A plain NNI model space: :class:`~nni_pipebd.spaces.supernet.BlockSupernet` makes it a
    weight-sharing supernet (NNI's ``PathSamplingLayer``) that runs one path at a time.

    Parameters
    ----------
    index : int
        Block index (used in labels).
    geometry : BlockGeometry
        Widths, stride and layer count.
    kernels, expansions : sequence of int
        Candidate kernel sizes and expansion ratios.
    identity : bool
        Offer a ``skip`` candidate where possible.
    width_mult : float
        Width of inner layers relative to ``out_channels``.
    """

    def __init__(self, index: int, geometry: BlockGeometry, kernels: Sequence[int] = (3, 5, 7),
                 expansions: Sequence[int] = (3, 6), identity: bool = False, width_mult: float = 1.0):
        super().__init__()
        self.index = index
        strides = _strides(geometry.stride, geometry.num_layers, index)
        inner = max(1, int(round(geometry.out_channels * width_mult)))
        widths = [inner] * (len(strides) - 1) + [geometry.out_channels]
        layers = []
        c_in = geometry.in_channels
        for layer, (stride, c_out) in enumerate(zip(strides, widths)):
            candidates: Dict[str, nn.Module] = OrderedDict(
                (candidate_name(k, e), MBConv(c_in, c_out, k, e, stride)) for k in kernels for e in expansions
            )
            if identity and stride == 1 and c_in == c_out:
                candidates[SKIP] = nn.Identity()
            layers.append(LayerChoice(candidates, label=f"s{index}_i{layer}"))
            c_in = c_out
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def dna_space(index: int, shape_in: Shape, shape_out: Shape, teacher_block: nn.Module, *,
              kernels: Sequence[int] = (3, 5, 7), expansions: Sequence[int] = (3, 6), identity: bool = False,
              width_mult: float = 1.0, layers: Optional[int] = None) -> Optional[DnaBlock]:
    """The block-space factory of ``model.student.kind: dna``: a :class:`DnaBlock` following the teacher block.

    Called like any user factory (``model.student.class_path``) with the block's geometry; the other arguments are
    ``model.student``'s DNA options. A block whose output is not a feature map (the classifier head) gets ``None``:
    the builder then gives it a freshly initialised copy of the teacher block.
    """
    if len(shape_out) != 3:
        return None
    geometry = block_geometry(index, teacher_block, shape_in, shape_out, layers)
    return DnaBlock(index, geometry, kernels, expansions, identity, width_mult)


def block_geometry(index: int, teacher_block: nn.Module, shape_in: Shape, shape_out: Shape,
                   num_layers: Union[int, None] = None) -> BlockGeometry:
    """Widths, downsampling and layer count a student block needs to replace ``teacher_block``.

    The layer count defaults to the number of spatial (kernel > 1) convolutions in the teacher block.
    """
    if len(shape_in) != 3 or len(shape_out) != 3:
        raise ValueError(f"block {index}: a DNA block maps feature maps [C, H, W]; the teacher block maps "
                         f"{shape_in} -> {shape_out}")
    if shape_in[1] % shape_out[1] or shape_in[2] % shape_out[2] or \
            shape_in[1] // shape_out[1] != shape_in[2] // shape_out[2]:
        raise ValueError(f"block {index}: the teacher block resizes {shape_in[1:]} -> {shape_out[1:]}, "
                         "not an integer square downsampling a strided student can follow")
    if num_layers is None:
        num_layers = sum(1 for m in teacher_block.modules()
                         if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1)
    return BlockGeometry(shape_in[0], shape_out[0], shape_in[1] // shape_out[1], max(1, num_layers))


class StudentSpace(ModelSpace):
    """The whole student: one block per teacher block, a block supernet or a fixed module.

    ``freeze(sample)`` with one choice per label of every block gives a plain network (blocks in order) holding the
    supernets' weights.

    Parameters
    ----------
    blocks : list of nn.Module
        Student blocks S_0..S_{N-1}.
    """

    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _strides(stride: int, num_layers: int, index: int) -> List[int]:
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"block {index}: the teacher block downsamples by {stride}, which is not a power of two; "
                         "choose block boundaries at stride-2 layers")
    downsample = int(math.log2(stride))
    layers = max(num_layers, downsample, 1)
    return [2] * downsample + [1] * (layers - downsample)


def path_choices(blocks: Sequence[nn.Module]) -> Dict[str, List[Any]]:
    """All labels -> candidate values across ``blocks`` (fixed blocks contribute nothing)."""
    choices: Dict[str, List[Any]] = {}
    for block in blocks:
        choices.update(getattr(block, "choices", {}))
    return choices

