"""Tests of the data sets (digits, synthetic, CIFAR-10 and image folders on generated files) and of make_loader."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from nni_pipebd.config import DataConfig
from nni_pipebd.data.datasets import (
    CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, TensorImageDataset, build_dataset, make_loader,
)
from nni_pipebd.data.order import BatchOrder, shard


# --------------------------------------------------------------------------------------------- digits

def _expected_digits(image_size: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented digits preprocessing, re-derived independently."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    perm = np.random.default_rng(0).permutation(len(images))
    val, train = perm[:360], perm[360:]
    mean, std = images[train].mean(), images[train].std()
    chosen = train if split == "train" else val
    return (images[chosen] - mean) / std, torch.as_tensor(digits.target[chosen])


def test_digits_shapes_dtypes_and_split_sizes():
    config = DataConfig(name="digits", image_size=16, channels=3)
    train = build_dataset(config, ".", "train")
    val = build_dataset(config, ".", "val")
    assert isinstance(train, TensorImageDataset)
    assert (len(train), len(val)) == (1437, 360)
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert type(label) is int and 0 <= label <= 9
    assert set(train.tensors[1].tolist()) == set(range(10))
    images = train.tensors[0]
    torch.testing.assert_close(images[:, 0], images[:, 1])  # grey replicated to the channels
    torch.testing.assert_close(images[:, 0], images[:, 2])


@pytest.mark.parametrize("image_size", [8, 16])
def test_digits_values_follow_the_documented_preprocessing(image_size):
    config = DataConfig(name="digits", image_size=image_size, channels=1)
    for split in ("train", "val"):
        dataset = build_dataset(config, ".", split)
        expected_images, expected_labels = _expected_digits(image_size, split)
        torch.testing.assert_close(dataset.tensors[0], expected_images)
        assert torch.equal(dataset.tensors[1], expected_labels)


def test_digits_normalised_with_train_statistics():
    config = DataConfig(name="digits", image_size=32, channels=3)
    train = build_dataset(config, ".", "train").tensors[0]
    val = build_dataset(config, ".", "val").tensors[0]
    assert abs(train.mean().item()) < 1e-5
    assert abs(train.std().item() - 1.0) < 1e-4
    assert abs(val.mean().item()) < 0.1 and abs(val.std().item() - 1.0) < 0.1  # same stats, other images
    assert abs(val.mean().item()) > 1e-6  # not normalised with its own statistics


def test_digits_deterministic_across_builds():
    config = DataConfig(name="digits", image_size=12, channels=2)
    a, b = build_dataset(config, ".", "val"), build_dataset(config, "/elsewhere", "val")
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])


# ------------------------------------------------------------------------------------------ synthetic

def test_synthetic_shapes_sizes_and_determinism():
    config = DataConfig(name="synthetic", image_size=6, channels=2, num_samples=40)
    train, val = build_dataset(config, ".", "train"), build_dataset(config, ".", "val")
    assert (len(train), len(val)) == (40, 10)
    image, label = train[3]
    assert image.shape == (2, 6, 6) and image.dtype == torch.float32 and type(label) is int
    labels = train.tensors[1]
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() <= 9
    again = build_dataset(config, ".", "train")
    assert torch.equal(train.tensors[0], again.tensors[0]) and torch.equal(labels, again.tensors[1])
    assert not torch.equal(train.tensors[0][:10], val.tensors[0])  # seeds 0 and 1 differ
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(train.tensors[0], torch.randn(40, 2, 6, 6, generator=generator))
    assert len(build_dataset(DataConfig(name="synthetic", num_samples=3), ".", "val")) == 1


# ----------------------------------------------------------------------------------------- errors

def test_unknown_name_and_split():
    with pytest.raises(ValueError, match=r"'mnist2'.*digits.*synthetic.*cifar10.*imagefolder.*MNIST.*class_path"):
        build_dataset(DataConfig(name="mnist2"), ".")
    with pytest.raises(ValueError, match=r"'test'.*train.*val"):
        build_dataset(DataConfig(name="digits"), ".", "test")
    with pytest.raises(ValueError, match="data.root"):
        build_dataset(DataConfig(name="cifar10", root=None), ".")


# ----------------------------------------------------------------------------------------- CIFAR-10

from datagen import _CIFAR_TEST, _CIFAR_TRAIN_PER_BATCH, _make_cifar, _write_py2_pickle  # noqa: E402

def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A generated CIFAR-10 folder whose md5 sums torchvision's own integrity check accepts.

    torchvision's ``CIFAR10._check_integrity`` / ``_load_meta`` compare the md5 of every file
    with the digests in the class attributes ``train_list``, ``test_list`` and ``meta``. We
    keep that check and only replace the expected digests by those of the generated files.
    """
    root = tmp_path / "cifar"
    written = _make_cifar(root)
    folder = root / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list", [[n, _md5(folder / n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, _md5(folder / n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return root, written


def test_generated_cifar_files_have_the_official_pickle_format(tmp_path):
    _make_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # how the CIFAR-10 web page reads the files
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (2, 3072)


def test_cifar10_from_generated_folder(cifar_root):
    root, written = cifar_root
    config = DataConfig(name="cifar10", root="cifar", image_size=32, channels=3)
    train = build_dataset(config, root.parent, "train")  # relative root resolved against base_dir
    val = build_dataset(config, root.parent, "val")
    assert (len(train), len(val)) == (5 * _CIFAR_TRAIN_PER_BATCH, _CIFAR_TEST)
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    for dataset, split in ((train, "train"), (val, "val")):
        data, labels = written[split]
        for i in range(len(dataset)):
            image, label = dataset[i]
            raw = torch.from_numpy(data[i].reshape(3, 32, 32).astype(np.float32)) / 255.0  # R, G, B planes
            assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
            torch.testing.assert_close(image, (raw - mean) / std)
            assert label == labels[i]
    assert train.classes[0] == "airplane"


def test_cifar10_resized_and_greyscale(cifar_root):
    root, _ = cifar_root
    small = build_dataset(DataConfig(name="cifar10", root=str(root), image_size=16), "/ignored", "val")
    assert small[0][0].shape == (3, 16, 16)
    grey = build_dataset(DataConfig(name="cifar10", root=str(root), image_size=32, channels=1), ".", "val")
    assert grey[0][0].shape == (1, 32, 32)


def test_cifar10_wrong_checksum_is_reported(tmp_path):
    _make_cifar(tmp_path)  # no md5 patch: the generated files are not the official ones
    with pytest.raises(RuntimeError, match=r"do not match the official archive.*re-extract"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), ".", "train")


def test_cifar10_missing_folders_explain_the_layout(tmp_path):
    config = DataConfig(name="cifar10", root="nowhere")
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(config, tmp_path)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "cifar-10-batches-py" in message and "data_batch_1" in message and "batches.meta" in message
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nowhere/cifar-10-batches-py' does not exist.*test_batch"):
        build_dataset(config, tmp_path)
    folder = tmp_path / "nowhere" / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_2, data_batch_3.*batches\.meta;"):
        build_dataset(config, tmp_path)
    with pytest.raises(FileNotFoundError, match="set it to its parent"):
        build_dataset(DataConfig(name="cifar10", root=str(folder)), ".")


# -------------------------------------------------------------------------------------- image folder

_COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "fox": (0, 255, 0)}


def _make_image_folder(root: Path) -> None:
    for split, classes, per_class in (("train", ("cat", "dog", "fox"), 2), ("val", ("dog", "fox"), 1)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 14), _COLOURS[name]).save(folder / f"{i}.png")
    Image.new("L", (10, 10), 255).save(root / "train" / "cat" / "grey.png")  # grey file -> 3 channels


def test_image_folder_from_generated_pngs(tmp_path):
    _make_image_folder(tmp_path / "imgs")
    config = DataConfig(name="imagefolder", root="imgs", image_size=8, channels=3)
    train = build_dataset(config, tmp_path, "train")
    val = build_dataset(config, tmp_path, "val")
    assert (len(train), len(val)) == (7, 2)
    assert train.classes == ["cat", "dog", "fox"] and val.classes == train.classes
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for dataset in (train, val):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and type(label) is int
            name = train.classes[label]
            path = Path(dataset.samples[i][0])
            assert path.parent.name == name  # val labels use the train class indices (val has no cat)
            colour = (255, 255, 255) if path.name == "grey.png" else _COLOURS[name]
            expected = (torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255.0 - mean) / std
            torch.testing.assert_close(image, expected.expand(3, 8, 8))
    assert [label for _, label in val.samples] == [1, 2]


def test_image_folder_missing_folders_explain_the_layout(tmp_path):
    config = DataConfig(name="imagefolder", root=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(config, ".")
    assert str(tmp_path / "data") in str(err.value)
    assert "train/<class>/<image>" in str(err.value) and "val/<class>/<image>" in str(err.value)
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "train" / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match=r"data/val' does not exist.*val/<class>/<image>"):
        build_dataset(config, ".", "val")
    (tmp_path / "data" / "val" / "b").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"classes that .* lacks: \['b'\]"):
        build_dataset(config, ".", "val")


# ---------------------------------------------------------------------------------------- make_loader

class _NoTensors(Dataset):
    """Hides ``tensors`` so that make_loader takes the DataLoader path."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def _collect(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.slow
def test_make_loader_fast_path_equals_dataloader_path():
    dataset = build_dataset(DataConfig(name="digits", image_size=8, channels=3), ".", "train")
    order = BatchOrder(len(dataset), batch_size=10, seed=0, max_steps=6)
    batches = [shard(b, rank=1, world=3) for b in order.batches(epoch=1)]
    fast = _collect(make_loader(dataset, batches))
    via_loader = _collect(make_loader(_NoTensors(dataset), batches))
    via_workers = _collect(make_loader(dataset, iter(batches), num_workers=2))
    assert len(fast) == len(via_loader) == len(via_workers) == 6
    for (fi, fl), (li, ll), (wi, wl), idx in zip(fast, via_loader, via_workers, batches):
        assert fi.shape == (3, 3, 8, 8) and fl.dtype == ll.dtype == wl.dtype == torch.int64
        assert torch.equal(fi, li) and torch.equal(fi, wi)
        assert torch.equal(fl, ll) and torch.equal(fl, wl)
        assert torch.equal(fi, dataset.tensors[0][torch.as_tensor(idx)])


def test_make_loader_on_files_and_errors(tmp_path):
    _make_image_folder(tmp_path)
    dataset = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8), ".", "train")
    batches = [np.array([6, 0, 3], dtype=np.int64), np.array([1], dtype=np.int64)]
    loaded = _collect(make_loader(dataset, batches))
    assert [tuple(images.shape) for images, _ in loaded] == [(3, 3, 8, 8), (1, 3, 8, 8)]
    assert loaded[0][1].tolist() == [dataset[6][1], dataset[0][1], dataset[3][1]]
    assert list(make_loader(dataset, [])) == []
    with pytest.raises(ValueError, match="num_workers = -1"):
        make_loader(dataset, batches, num_workers=-1)


# ----------------------------------------------------------------------------- torchvision data sets

def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: magic, dims; then unsigned bytes)."""
    magic = 2049 if array.ndim == 1 else 2051
    path.write_bytes(struct.pack(">" + "i" * (array.ndim + 1), magic, *array.shape) + array.astype(np.uint8).tobytes())


def test_torchvision_data_set_by_name_from_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count))
    for channels in (1, 3):
        config = DataConfig(name="MNIST", root=str(tmp_path), image_size=16, channels=channels)
        train, val = build_dataset(config, "."), build_dataset(config, ".", "val")
        assert (len(train), len(val)) == (12, 5)
        image, label = train[3]
        assert image.shape == (channels, 16, 16) and isinstance(label, int)
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    with pytest.raises(FileNotFoundError, match=r"FashionMNIST \(train\) not found in .*never downloaded"):
        build_dataset(DataConfig(name="fashionmnist", root=str(tmp_path)), ".")


_FACTORY = """
import torch
from torch.utils.data import TensorDataset


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n, shape=(3, 8, 8), label=1, dtype=torch.float32):
        self.n, self.shape, self.label, self.dtype = n, shape, label, dtype

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full(self.shape, float(i)).to(self.dtype), self.label


def make(n=6, **kwargs):
    return Pairs(n, **kwargs), Pairs(2, **kwargs)


def one():
    return Pairs(3)


def tensors():
    return TensorDataset(torch.zeros(4, 3, 8, 8)), Pairs(1)
"""


def test_class_path_data_set_and_item_checks(tmp_path):
    (tmp_path / "user_data_factory.py").write_text(_FACTORY)
    config = DataConfig(class_path="user_data_factory:make", init_args={"n": 5})
    train = build_dataset(config, tmp_path)
    assert len(train) == 5 and len(build_dataset(config, tmp_path, "val")) == 2
    images, labels = next(make_loader(train, [np.array([4, 0])]))
    assert images.shape == (2, 3, 8, 8) and torch.equal(images[:, 0, 0, 0], torch.tensor([4.0, 0.0]))
    assert labels.tolist() == [1, 1]
    cases = [("one", {}, r"returned Pairs; it must return \(train_dataset, val_dataset\)"),
             ("tensors", {}, r"sample 0 is a tuple, not an \(image, label\) pair"),
             ("make", {"label": 0.5}, r"train data set of 'user_data_factory:make': sample 0's label is 0.5"),
             ("make", {"shape": (8, 8)}, r"sample 0's image is a torch.float32 tensor of shape \(8, 8\)"),
             ("make", {"dtype": torch.uint8}, "torch.uint8 tensor"),
             ("make", {"n": 0}, "is empty"),
             ("make", {"nope": 1}, r"rejects init_args \['nope'\]")]
    for name, init_args, match in cases:
        with pytest.raises(ValueError, match=match):
            build_dataset(DataConfig(class_path=f"user_data_factory:{name}", init_args=init_args), tmp_path)
