"""Data sets (digits, synthetic, CIFAR-10, image folders) with deterministic preprocessing, and batch loading."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, ImageFolder

from .names import DATASET_NAMES

if TYPE_CHECKING:
    from nni_pipebd.config import DataConfig

__all__ = [
    "DATASET_NAMES", "SPLITS", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "CIFAR10_FILES", "TensorImageDataset", "build_dataset", "make_loader", "torchvision_datasets",
]

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Files torchvision's ``CIFAR10`` reads from ``<root>/cifar-10-batches-py/``.
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_CIFAR10_FOLDER = "cifar-10-batches-py"

_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_SYNTHETIC_CLASSES = 10


class TensorImageDataset(Dataset):
    """An in-memory data set of images and integer labels.

    Like :class:`torch.utils.data.TensorDataset` (it has ``tensors = (images, labels)``),
    but an item's label is a Python ``int``.

    Parameters
    ----------
    images : torch.Tensor
        ``float32`` images ``[N, C, H, W]``.
    labels : torch.Tensor
        ``int64`` labels ``[N]``.
    """

    def __init__(self, images: Tensor, labels: Tensor):
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"expected images [N, C, H, W] and labels [N], got shapes "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.tensors = (images.to(torch.float32).contiguous(), labels.to(torch.int64).contiguous())

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.tensors[0][index], int(self.tensors[1][index])

    def __repr__(self) -> str:
        images, _ = self.tensors
        return f"TensorImageDataset(num_samples={len(self)}, image_shape={tuple(images.shape[1:])})"


def build_dataset(config: "DataConfig", base_dir: Union[str, Path], split: str = "train") -> Dataset:
    """Build one split of the configured data set.

    Preprocessing is deterministic (no random augmentation): images are resized to
    ``image_size x image_size``, have ``config.channels`` channels and are normalised.

    Parameters
    ----------
    config : DataConfig
        The ``data`` section of the job (``name``, ``root``, ``image_size``, ``channels``,
        ``num_samples``).
    base_dir : str or Path
        Folder a relative ``config.root`` is resolved against (the config file's folder).
    split : str
        ``train`` or ``val`` (CIFAR-10: the official test batch).

    Returns
    -------
    torch.utils.data.Dataset
        Map-style data set whose items are ``(image, label)``: a ``float32`` tensor
        ``[channels, image_size, image_size]`` and an ``int``. ``digits`` and ``synthetic``
        are a :class:`TensorImageDataset` held in memory.

    Raises
    ------
    ValueError
        Unknown ``config.name`` or ``split``, a missing ``root``, unsupported ``channels``, or a ``class_path``
        data set whose items are not ``(image [C, H, W], int label)`` (the message names the data set and sample).
    FileNotFoundError
        The CIFAR-10 or image folder is missing or incomplete (the message gives the layout).

    Notes
    -----
    * ``digits``: :func:`sklearn.datasets.load_digits` (1797 grey 8x8 images, values 0..16),
      scaled to [0, 1], resized bilinearly (``align_corners=False``), normalised with the
      mean/std of the train split and replicated to ``channels``. 20% of a fixed permutation
      (seed 0, independent of the run seed) is the val split (360 val / 1437 train).
    * ``synthetic``: ``num_samples`` standard-normal images (train; seed 0) or
      ``max(num_samples // 4, 1)`` (val; seed 1), labels uniform in 0..9.
    * ``cifar10``: ``torchvision.datasets.CIFAR10`` from ``<root>/cifar-10-batches-py/``
      (no download), CIFAR mean/std.
    * ``imagefolder``: ``torchvision.datasets.ImageFolder`` on ``<root>/train`` or
      ``<root>/val``, resize to ``int(1.14 * image_size)``, center crop, ImageNet mean/std.
      The class list is the train folder's, so labels agree between the splits.
    * a torchvision data set (``name`` is its class, any case, e.g. ``MNIST``, ``SVHN``): constructed from ``root``
      with ``train=`` or ``split=`` (``val`` reads ``val``, ``valid`` or ``test``, what the class accepts) and
      ``download=False``; resized, converted to ``channels`` and normalised to [-1, 1].
    * ``class_path``: the user's factory is called with ``init_args`` and returns ``(train, val)``; its items are
      used as they are, after a check of the first and last item of the split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    if config.class_path is not None:
        return _build_user_data(config, base_dir, split)
    name = config.name or "digits"
    if config.image_size <= 0 or config.channels <= 0:
        raise ValueError(f"image_size = {config.image_size} and channels = {config.channels} must be > 0")
    if name == "digits":
        dataset = _build_digits(config, split)
    elif name == "synthetic":
        dataset = _build_synthetic(config, split)
    elif name == "cifar10":
        dataset = _build_cifar10(config, _resolve_root(config, base_dir), split)
    elif name == "imagefolder":
        dataset = _build_imagefolder(config, _resolve_root(config, base_dir), split)
    else:
        dataset = _build_torchvision(config, name, base_dir, split)
    _logger.info("built %s/%s: %d samples of [%d, %d, %d]", name, split, len(dataset),
                 config.channels, config.image_size, config.image_size)
    return dataset


def torchvision_datasets() -> dict:
    """Lower-case name -> torchvision data set class, for classes whose constructor takes ``train`` or ``split``."""
    import inspect

    import torchvision.datasets as tvd

    found = {}
    for attr in getattr(tvd, "__all__", dir(tvd)):
        cls = getattr(tvd, attr, None)
        if isinstance(cls, type) and issubclass(cls, Dataset):
            params = inspect.signature(cls.__init__).parameters
            if ("train" in params or "split" in params) and "root" in params:
                found[attr.lower()] = cls
    return found


def _build_torchvision(config: "DataConfig", name: str, base_dir: Union[str, Path], split: str) -> Dataset:
    classes = torchvision_datasets()
    cls = classes.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown data set name {name!r}; valid names: {list(DATASET_NAMES)} or a torchvision data "
                         f"set with a train flag or split ({', '.join(sorted(c.__name__ for c in classes.values()))}); "
                         "or set data.class_path to your own factory")
    root = _resolve_root(config, base_dir)
    _check_rgb_channels(config)
    steps = [transforms.Resize((config.image_size, config.image_size)),
             transforms.Grayscale(num_output_channels=config.channels), transforms.ToTensor(),
             transforms.Normalize((0.5,) * config.channels, (0.5,) * config.channels)]
    if config.channels == 3:  # colour stays colour; grey images become three equal channels
        steps[1] = _to_rgb
    transform = transforms.Compose(steps)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    attempts = [{"train": split == "train"}] if "train" in params else (
        [{"split": "train"}] if split == "train" else [{"split": s} for s in ("val", "valid", "test")])
    if "download" in params:
        attempts = [{**a, "download": False} for a in attempts]
    errors = []
    for kwargs in attempts:
        try:
            return cls(str(root), transform=transform, **kwargs)
        except ValueError as err:  # a split value this class does not know
            errors.append(f"{kwargs}: {err}")
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise FileNotFoundError(f"torchvision {cls.__name__} ({split}) not found in '{root}' ({err}); place "
                                    f"the data set's files there as {cls.__name__} expects (it is never "
                                    "downloaded)") from None
    raise ValueError(f"torchvision {cls.__name__} has no {split} split ({'; '.join(errors)})")


def _to_rgb(image):
    """A PIL image as RGB (grey images get three equal channels)."""
    return image.convert("RGB")


def _build_user_data(config: "DataConfig", base_dir: Union[str, Path], split: str) -> Dataset:
    from ..imports import import_object

    factory = import_object(config.class_path, "data.class_path", base_dir)
    try:
        result = factory(**dict(config.init_args))
    except TypeError as err:
        raise ValueError(f"data.class_path {config.class_path!r} rejects init_args {sorted(config.init_args)}: "
                         f"{err}") from err
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ValueError(f"data.class_path {config.class_path!r} returned {type(result).__name__}; it must return "
                         "(train_dataset, val_dataset)")
    dataset = result[SPLITS.index(split)]
    where = f"the {split} data set of {config.class_path!r}"
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError(f"{where} is a {type(dataset).__name__}, not a map-style Dataset (__getitem__ and __len__)")
    if len(dataset) == 0:
        raise ValueError(f"{where} is empty")
    shapes = set()
    for index in sorted({0, len(dataset) - 1}):
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{where}: sample {index} is a {type(item).__name__}, not an (image, label) pair")
        image, label = item
        if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
            got = f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor) else \
                f"a {type(image).__name__}"
            raise ValueError(f"{where}: sample {index}'s image is {got}; it must be a float tensor [C, H, W] (add "
                             "transforms.ToTensor() to the data set)")
        is_int = isinstance(label, int) and not isinstance(label, bool) or (
            isinstance(label, Tensor) and label.dim() == 0 and not label.is_floating_point())
        if not is_int:
            raise ValueError(f"{where}: sample {index}'s label is {label!r} ({type(label).__name__}); it must be an "
                             "int class index")
        shapes.add(tuple(image.shape))
    if len(shapes) > 1:
        raise ValueError(f"{where}: samples have different shapes {sorted(shapes)}; resize them to one size")
    return dataset


def make_loader(dataset: Dataset, batches: Iterable[np.ndarray],
                num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Load the given batches of sample indices, in order.

    In-memory data sets (with ``tensors = (images, labels)``, e.g.
    :class:`TensorImageDataset`) are indexed directly when ``num_workers == 0``; everything
    else goes through a :class:`torch.utils.data.DataLoader` with the batches as its
    ``batch_sampler``, so files are decoded in ``num_workers`` worker processes. Both paths
    give identical tensors.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Map-style data set of ``(image, label)`` items.
    batches : iterable of numpy.ndarray
        Index batches, e.g. ``BatchOrder.batches(epoch)`` or a :func:`shard` of each.
    num_workers : int
        Loader worker processes (0: load in this process).
    pin_memory : bool
        Yield batches in page-locked host memory, so that ``.to(cuda_device, non_blocking=True)`` copies them
        asynchronously (only where CUDA is available; elsewhere there is no pinned memory and this is ignored).

    Yields
    ------
    tuple of torch.Tensor
        ``(images [B, C, H, W] float32, labels [B] int64)`` for each batch.

    Raises
    ------
    ValueError
        If ``num_workers`` is negative.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers = {num_workers!r} must be an int >= 0 (0 loads in this process)")
    pin_memory = bool(pin_memory) and torch.cuda.is_available()
    tensors = getattr(dataset, "tensors", None)
    if num_workers == 0 and isinstance(tensors, (tuple, list)) and len(tensors) == 2:
        return _index_tensors(tensors[0], tensors[1], batches, pin_memory)
    index_lists = [np.asarray(b).astype(np.int64).tolist() for b in batches]
    if not index_lists:
        return iter(())
    loader = DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers, pin_memory=pin_memory)
    return ((images, labels) for images, labels in loader)


def _index_tensors(images: Tensor, labels: Tensor, batches: Iterable[np.ndarray],
                   pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """The fast path of :func:`make_loader`: index in-memory tensors."""
    for batch in batches:
        idx = torch.as_tensor(np.asarray(batch), dtype=torch.int64)
        x, y = images[idx], labels[idx].to(torch.int64)
        yield (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)


def _resolve_root(config: "DataConfig", base_dir: Union[str, Path]) -> Path:
    """``config.root`` as a path, relative ones resolved against ``base_dir`` (as ``Config.resolve_path``)."""
    if config.root is None:
        raise ValueError(f"data.root must name the {config.name} folder (data.name = {config.name!r}); "
                         f"set data.root in the config (relative paths are relative to the config file)")
    root = Path(config.root).expanduser()
    return root if root.is_absolute() else Path(base_dir) / root


def _check_rgb_channels(config: "DataConfig") -> None:
    if config.channels not in (1, 3):
        raise ValueError(f"data.channels = {config.channels} is not supported for {config.name!r} "
                         f"(colour images); use 3 (RGB) or 1 (greyscale)")


def _image_transform(config: "DataConfig", pre: list, mean: tuple, std: tuple):
    """``pre`` resizes, then (greyscale), ToTensor and Normalize."""
    steps = list(pre)
    if config.channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def _build_digits(config: "DataConfig", split: str) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).to(torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    labels = torch.from_numpy(digits.target).to(torch.int64)
    if config.image_size != images.shape[-1]:
        images = F.interpolate(images, size=(config.image_size, config.image_size),
                               mode="bilinear", align_corners=False)
    num = images.shape[0]
    num_val = math.ceil(_DIGITS_VAL_FRACTION * num)
    perm = torch.from_numpy(np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(num))
    val_idx, train_idx = perm[:num_val], perm[num_val:]
    train_images = images[train_idx]
    mean, std = train_images.mean(), train_images.std()
    chosen = train_idx if split == "train" else val_idx
    images = ((images[chosen] - mean) / std).repeat(1, config.channels, 1, 1)
    return TensorImageDataset(images, labels[chosen])


def _build_synthetic(config: "DataConfig", split: str) -> TensorImageDataset:
    num = config.num_samples if split == "train" else max(config.num_samples // 4, 1)
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    images = torch.randn(num, config.channels, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, _SYNTHETIC_CLASSES, (num,), generator=generator)
    return TensorImageDataset(images, labels)


def _build_cifar10(config: "DataConfig", root: Path, split: str) -> Dataset:
    _check_rgb_channels(config)
    folder = root / _CIFAR10_FOLDER
    layout = (f"put the extracted official python archive (cifar-10-python.tar.gz from "
              f"https://www.cs.toronto.edu/~kriz/cifar.html) there, i.e. the folder "
              f"'{folder}/' with the files {', '.join(CIFAR10_FILES)}; data.root names the folder "
              f"that contains {_CIFAR10_FOLDER}/")
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 root folder '{root}' does not exist; {layout}")
    if not folder.is_dir():
        hint = ""
        if root.name == _CIFAR10_FOLDER:
            hint = f" (data.root points at {_CIFAR10_FOLDER} itself; set it to its parent '{root.parent}')"
        raise FileNotFoundError(f"CIFAR-10 folder '{folder}' does not exist{hint}; {layout}")
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder '{folder}' lacks {', '.join(missing)}; {layout}")
    pre = [] if config.image_size == 32 else [transforms.Resize(config.image_size)]
    transform = _image_transform(config, pre, CIFAR10_MEAN, CIFAR10_STD)
    try:
        return CIFAR10(str(root), train=split == "train", transform=transform, download=False)
    except RuntimeError as err:  # torchvision: md5 of a file differs from the official one
        raise RuntimeError(f"CIFAR-10 files in '{folder}' do not match the official archive ({err}); "
                           f"re-extract cifar-10-python.tar.gz there") from err


class _FixedClassImageFolder(ImageFolder):
    """``ImageFolder`` whose class list is given (the train split's) instead of found in its folder.

    Classes without a sub-folder are allowed (a val split may lack some), and labels agree
    between the splits.
    """

    def __init__(self, root: str, classes: list, **kwargs):
        self._fixed_classes = list(classes)
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory: str) -> tuple[list, dict]:
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}


def _build_imagefolder(config: "DataConfig", root: Path, split: str) -> Dataset:
    _check_rgb_channels(config)
    layout = (f"expected the layout '{root}/train/<class>/<image>' and '{root}/val/<class>/<image>' "
              f"(one sub-folder per class, the same class names in both)")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root '{root}' does not exist; {layout}")
    split_dir = root / split
    train_dir = root / "train"
    for folder in dict.fromkeys((split_dir, train_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder split '{folder}' does not exist; {layout}")
    classes = sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"'{train_dir}' has no class sub-folders; {layout}")
    extra = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and entry.name not in classes)
    if extra:
        raise ValueError(f"'{split_dir}' has classes that '{train_dir}' lacks: {extra}; {layout}")
    pre = [transforms.Resize(int(config.image_size * 1.14)), transforms.CenterCrop(config.image_size)]
    transform = _image_transform(config, pre, IMAGENET_MEAN, IMAGENET_STD)
    dataset = _FixedClassImageFolder(str(split_dir), classes, transform=transform)
    if len(dataset) == 0:
        raise FileNotFoundError(f"'{split_dir}' contains no images with a supported extension; {layout}")
    return dataset
