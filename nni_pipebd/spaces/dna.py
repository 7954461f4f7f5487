"""DNA student search space: MBConv supernet blocks built with NNI 3.0 ``LayerChoice``."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn

from nni.nas.nn.pytorch import LayerChoice, ModelSpace

__all__ = ["MBConv", "BlockGeometry", "DnaBlock", "StudentSpace", "candidate_name", "path_choices", "SKIP"]

_logger = logging.getLogger(__name__)

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
    """One DNA supernet block: ``num_layers`` layers, each an NNI ``LayerChoice`` over MBConv kernels x expansions.

    Layers are labelled ``s{index}_i{layer}`` and candidates ``k{kernel}e{expansion}`` (plus ``skip`` where the
    layer keeps stride 1 and width and ``identity`` is on). The downsampling of the block is spread as stride-2
    layers at its start; inner layers have ``round(out_channels * width_mult)`` channels, the last layer maps to
    ``out_channels``. The active path (``set_path``) selects which candidate each layer runs; ``freeze(sample)``
    returns a plain module holding the chosen candidates.

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
        self.path: Dict[str, str] = {}

    @property
    def choices(self) -> Dict[str, List[str]]:
        """Label -> candidate names of every layer that still has a choice (empty once frozen)."""
        return {layer.label: list(layer.names) for layer in self.layers if isinstance(layer, LayerChoice)}

    def set_path(self, sample: Mapping[str, str]) -> None:
        """Select the candidate each layer runs; ``sample`` may hold labels of other blocks too."""
        path = {}
        for label, names in self.choices.items():
            if label not in sample:
                raise KeyError(f"block {self.index}: the path has no choice for {label!r}; "
                               f"it needs one of {names} for each of {sorted(self.choices)}")
            if sample[label] not in names:
                raise ValueError(f"block {self.index}: {label} = {sample[label]!r} is not a candidate; valid: {names}")
            path[label] = sample[label]
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, LayerChoice):
                try:
                    layer = layer[self.path[layer.label]]
                except KeyError:
                    raise RuntimeError(f"block {self.index}: no path selected for {layer.label!r}; "
                                       "call set_path(sample) before forward") from None
            x = layer(x)
        return x


class StudentSpace(ModelSpace):
    """The whole student: one block per teacher block, a ``DnaBlock`` or a fixed module.

    ``freeze(sample)`` with one choice per label of every block gives a plain network (blocks in order).

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


def path_choices(blocks: Sequence[nn.Module]) -> Dict[str, List[str]]:
    """All labels -> candidate names across ``blocks`` (fixed blocks contribute nothing)."""
    choices: Dict[str, List[str]] = {}
    for block in blocks:
        choices.update(getattr(block, "choices", {}))
    return choices

