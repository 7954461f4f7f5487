"""The data set names ``data.name`` takes — ours and torchvision's — known without importing torch."""

from __future__ import annotations

import importlib.metadata
from typing import FrozenSet, Optional

__all__ = ["DATASET_NAMES", "TORCHVISION_RELEASE", "installed_torchvision", "torchvision_names"]

DATASET_NAMES = ("digits", "synthetic", "cifar10", "imagefolder")
"""The data sets this package builds itself."""

TORCHVISION_RELEASE = "0.29.1"
"""The torchvision release :data:`_TORCHVISION_NAMES` was read from (``tests/data/test_names.py`` compares them)."""

_TORCHVISION_NAMES = frozenset((
    "celeba", "cifar10", "cifar100", "cityscapes", "clevrclassification", "country211", "dtd", "emnist",
    "eth3dstereo", "fashionmnist", "fer2013", "fgvcaircraft", "flowers102", "flyingchairs", "flyingthings3d",
    "food101", "gtsrb", "hd1k", "hmdb51", "imagenet", "imagenette", "instereo2k", "kinetics", "kitti",
    "kitti2012stereo", "kitti2015stereo", "kittiflow", "kmnist", "lfwpairs", "lfwpeople", "middlebury2014stereo",
    "mnist", "movingmnist", "oxfordiiitpet", "pcam", "phototour", "places365", "qmnist", "renderedsst2", "sintel",
    "stanfordcars", "stl10", "svhn", "ucf101", "usps", "widerface",
))


def installed_torchvision() -> Optional[str]:
    """The installed torchvision release without its local part (``0.29.1+cu130`` -> ``0.29.1``); ``None`` if absent."""
    try:
        return importlib.metadata.version("torchvision").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def torchvision_names() -> FrozenSet[str]:
    """Lower-case names of the torchvision data sets whose constructor takes ``root`` and ``train`` or ``split``.

    Under torchvision :data:`TORCHVISION_RELEASE` these are known without importing it (that import takes
    seconds: it loads torch); under any other release they are read from it
    (:func:`~nni_pipebd.data.datasets.torchvision_datasets`), so the answer is the same either way.
    """
    if installed_torchvision() == TORCHVISION_RELEASE:
        return _TORCHVISION_NAMES
    from .datasets import torchvision_datasets

    return frozenset(torchvision_datasets())
