"""A user's own teacher: a small residual CNN whose forward has functional ops between its modules.

Nothing here knows nni_pipebd: the config names ``custom_teacher:build`` as ``model.teacher.class_path`` and the
plugin traces the model and splits it at module names (``nni-pipebd blocks config.yaml`` lists where it can).
"""

import torch
import torch.nn.functional as F
from torch import nn


class ResidualStage(nn.Module):
    """Two 3x3 convolutions with a projected shortcut; the first one strided."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, two stages that halve the resolution, global pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.stage1 = ResidualStage(width, 2 * width, stride=2)
        self.stage2 = ResidualStage(2 * width, 4 * width, stride=2)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.stage2(self.stage1(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def build(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> TinyResNet:
    """The teacher the config builds (``init_args`` are these keyword arguments)."""
    return TinyResNet(num_classes, in_channels, width)
