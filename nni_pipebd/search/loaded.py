"""A block library opened for search: its job rebuilt, student blocks loaded, data relayed through the teacher."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Config
from ..data.datasets import build_dataset, make_loader
from ..data.order import BatchOrder
from ..job import Job, build_job
from ..library import block_path, load_block, random_teacher_warning, read_library
from .errors import ArchitectureError

__all__ = ["LoadedLibrary", "open_library", "check_sample", "recalibrate_bn", "val_batches", "calib_batches",
           "relay", "library_fingerprint", "resolve_device"]

_logger = logging.getLogger(__name__)


@dataclass
class LoadedLibrary:
    """A finished block library, ready to score or to build networks from.

    Attributes
    ----------
    directory : Path
        The library folder.
    manifest : dict
        ``library.json``.
    config : Config
        The job the library was trained with (relative paths resolved against the manifest's ``base_dir``).
    job : Job
        The rebuilt job; ``job.spec.student[i]`` holds block ``i``'s library weights.
    """

    directory: Path
    manifest: dict
    config: Config
    job: Job

    @property
    def num_blocks(self) -> int:
        return self.job.num_blocks

    @property
    def choices(self) -> Dict[str, List[Any]]:
        """Label -> candidate values over all student blocks (empty for a fixed student)."""
        merged: Dict[str, List[Any]] = {}
        for block in self.job.spec.student:
            merged.update(getattr(block, "choices", {}))
        return merged

    def block_choices(self, index: int) -> Dict[str, List[Any]]:
        """Label -> candidate values of block ``index`` (empty for a fixed block)."""
        return dict(getattr(self.job.spec.student[index], "choices", {}))

    def val_dataset(self) -> Dataset:
        """The validation split of the library's data set."""
        return build_dataset(self.config.data, self.config.base_dir, "val")


def open_library(directory: Union[str, Path]) -> LoadedLibrary:
    """Rebuild the job of a block library and load every student block's weights.

    Parameters
    ----------
    directory : str or Path
        A folder written by ``nni_pipebd.train`` (``library.json`` + ``block_{i}.pt``).

    Raises
    ------
    nni_pipebd.library.LibraryError
        The folder holds no finished library, or a block file is missing or corrupt.
    RuntimeError
        A block file does not fit the rebuilt student block (the config changed since training).
    """
    directory = Path(directory)
    manifest, config = read_library(directory)
    warning = random_teacher_warning(manifest)
    if warning:
        _logger.warning("%s: %s", directory, warning)
    job = build_job(config)
    if job.num_blocks != manifest["num_blocks"]:
        raise RuntimeError(f"{directory}: library.json lists {manifest['num_blocks']} blocks but its config builds "
                           f"{job.num_blocks}; the teacher or its boundaries changed since training — train again")
    for i, block in enumerate(job.spec.student):
        try:
            block.load_state_dict(load_block(directory, i))
        except RuntimeError as err:
            raise RuntimeError(f"{block_path(directory, i)} does not fit student block {i} built from the library's "
                               f"config ({err}); the config or code changed since training — train again") from err
    return LoadedLibrary(directory, manifest, config, job)


def library_fingerprint(directory: Union[str, Path], num_blocks: int) -> Dict[str, str]:
    """SHA-256 (first 16 hex digits) of every block file: cached results are reused only for these weights."""
    digests = {}
    for i in range(num_blocks):
        path = block_path(directory, i)
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return digests


def check_sample(choices: Mapping[str, Sequence[Any]], sample: Mapping[str, Any]) -> Dict[str, Any]:
    """Check that ``sample`` has exactly one valid choice per label of ``choices``; return it as a plain dict (values
    as the space declares them: candidate names, ints, floats).

    Raises
    ------
    ArchitectureError
        Naming unknown labels, missing labels and choices that are not candidates, with the valid ones.
    """
    if not isinstance(sample, Mapping):
        raise ArchitectureError([repr(sample)], sorted(choices), {}, {k: list(v) for k, v in choices.items()})
    unknown = sorted(set(sample) - set(choices))
    missing = sorted(set(choices) - set(sample))
    invalid = {label: sample[label] for label in choices if label in sample and sample[label] not in choices[label]}
    if unknown or missing or invalid:
        raise ArchitectureError(unknown, missing, invalid, {k: list(v) for k, v in choices.items()})
    return {label: _declared(sample[label], choices[label]) for label in choices}


def _declared(value: Any, candidates: Sequence[Any]) -> Any:
    """The candidate equal to ``value`` (e.g. ``4`` for ``4.0`` read from JSON), as the space declares it."""
    return next(c for c in candidates if c == value)


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not valid; choose one of ['auto', 'cpu', 'cuda']")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use cpu or auto")
    return torch.device(device)


def val_batches(dataset: Dataset, batch_size: int, max_batches: Optional[int]) -> List[np.ndarray]:
    """Consecutive index batches of the validation set (the last may be smaller), at most ``max_batches``."""
    starts = range(0, len(dataset), batch_size)
    batches = [np.arange(s, min(s + batch_size, len(dataset))) for s in starts]
    return batches if max_batches is None else batches[:max_batches]


def calib_batches(dataset: Dataset, batch_size: int, seed: int, count: int) -> List[np.ndarray]:
    """``count`` training batches (epoch 0 of a :class:`BatchOrder` seeded with ``seed``) for BN recalibration."""
    order = BatchOrder(len(dataset), min(batch_size, len(dataset)), seed)
    return [order.batch(0, step) for step in range(min(count, order.steps_per_epoch))]


@torch.no_grad()
def relay(teacher: Sequence[nn.Module], dataset: Dataset, batches: Sequence[np.ndarray],
          device: torch.device = torch.device("cpu")) -> Iterator[Tuple[int, List[torch.Tensor], List[torch.Tensor]]]:
    """Teacher relaying over a fixed set of batches: yields ``(i, inputs_i, outputs_i)`` block by block.

    Only two levels of activations are held at a time. ``outputs_i`` of block ``i`` are ``inputs_{i+1}``.
    """
    level = [images.to(device) for images, _ in make_loader(dataset, batches)]
    for i, block in enumerate(teacher):
        block = block.to(device).eval()
        outputs = [block(x) for x in level]
        yield i, level, outputs
        level = outputs


@torch.no_grad()
def recalibrate_bn(module: nn.Module, inputs: Sequence[torch.Tensor]) -> nn.Module:
    """Reset the BatchNorm statistics of ``module`` and re-estimate them on ``inputs``; leaves it in eval mode.

    Statistics are the exact average over the batches (``momentum=None``), computed in train mode under
    ``no_grad``; the original momenta are restored afterwards. With no BatchNorm layer or no input the module
    is only put in eval mode.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and inputs:
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        module.train()
        try:
            for x in inputs:
                module(x)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    return module.eval()

