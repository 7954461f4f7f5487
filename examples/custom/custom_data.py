"""A user's own data: scikit-learn's digits as one-channel images of any size, split 80/20 with a fixed seed.

The config names ``custom_data:digits`` as ``data.class_path``; it returns ``(train, val)`` data sets whose items are
``(float image tensor [1, size, size], int label)`` — any map-style data set of such pairs works the same.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class DigitImages(Dataset):
    """Images and labels held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def digits(size: int = 16, val_fraction: float = 0.2, seed: int = 0):
    """``(train, val)``: digits resized to ``size`` x ``size``, scaled to zero mean and unit variance."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images / 16.0).float().unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.from_numpy(data.target).long()
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    cut = int(round(val_fraction * len(labels)))
    val, train = order[:cut], order[cut:]
    return DigitImages(images[train], labels[train]), DigitImages(images[val], labels[val])
