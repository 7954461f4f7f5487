"""Small data in the exact on-disk formats of real data sets (CIFAR-10 python pickles), for tests."""

import pickle
import struct
from pathlib import Path

import numpy as np


class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as in the official CIFAR-10 files.

    Loaded with ``encoding="bytes"`` the keys are ``b"data"``, ... (as on the CIFAR web page);
    with ``encoding="latin1"`` (torchvision) they are ``str`` and numpy decodes the raw array data.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


_CIFAR_TRAIN_PER_BATCH = 2
_CIFAR_TEST = 3


def _make_cifar(root: Path, per_batch: int = None, test: int = None) -> dict:
    """Write a tiny CIFAR-10 in the official python format; return its images and labels by split."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {"train": ([], []), "val": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = (test or _CIFAR_TEST) if name == "test_batch" else (per_batch or _CIFAR_TRAIN_PER_BATCH)
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).tolist()
        _write_py2_pickle(folder / name, {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(count)],
        })
        split = "val" if name == "test_batch" else "train"
        written[split][0].append(data)
        written[split][1].extend(labels)
    label_names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
                   b"truck"]
    _write_py2_pickle(folder / "batches.meta",
                      {b"num_cases_per_batch": 10000, b"label_names": label_names, b"num_vis": 3072})
    return {split: (np.concatenate(arrays), labels) for split, (arrays, labels) in written.items()}


