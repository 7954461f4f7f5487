"""Blockwise compression: train a fixed student block by block, finetune it, and compare it with the teacher."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..config import Config
from ..executors.launch import train
from ..library import atomic_save
from .errors import SearchError
from .finetune import FinetuneSettings, finetune
from .loaded import open_library

__all__ = ["COMPRESSION", "compress", "compression_report"]

_logger = logging.getLogger(__name__)

COMPRESSION = "compression.json"


def compression_report(directory: Union[str, Path], settings: FinetuneSettings = FinetuneSettings(), *,
                       device: str = "cpu") -> Dict[str, Any]:
    """Finetune the fixed student of a library end to end and report its accuracy and size against the teacher.

    Parameters
    ----------
    directory : str or Path
        A library trained with ``model.student.kind: fixed`` (by any executor).
    settings : FinetuneSettings
        End-to-end finetuning after the blockwise training.

    Returns
    -------
    dict
        The :func:`~nni_pipebd.search.finetune.finetune` result (``student`` and ``teacher`` params, MACs,
        latency, val accuracy, ratios) plus ``accuracy_drop`` (teacher - student) and ``compression``
        (teacher params / student params); also written to ``compression.json`` in the library (atomically).

    Raises
    ------
    SearchError
        The library's student is a supernet (``kind: dna``): search an architecture first.
    """
    directory = Path(directory)
    library = open_library(directory)
    if library.choices:
        raise SearchError(f"{directory} holds a supernet library (model.student.kind = "
                          f"{library.config.model.student.kind!r}, {len(library.choices)} layer choices); compression "
                          "needs kind: fixed — or search an architecture and use `nni-pipebd finetune`")
    result = finetune(library, {}, settings, device=device)
    result["accuracy_drop"] = result["teacher"]["val_accuracy"] - result["student"]["val_accuracy"]
    result["compression"] = result["teacher"]["params"] / max(result["student"]["params"], 1)
    atomic_save(result, directory / COMPRESSION)
    _logger.info("compressed student: %d params (%.2fx smaller than the teacher), val accuracy %.4f (teacher %.4f)",
                 result["student"]["params"], result["compression"], result["student"]["val_accuracy"],
                 result["teacher"]["val_accuracy"])
    return result


def compress(config: Config, out_dir: Union[str, Path], settings: FinetuneSettings = FinetuneSettings(), *,
             overwrite: bool = False, device: str = "cpu") -> Optional[Dict[str, Any]]:
    """Train the fixed student of ``config`` blockwise (its configured executor), then :func:`compression_report`.

    Returns ``None`` on torchrun ranks other than 0 (rank 0 reports).

    Raises
    ------
    SearchError
        ``config.model.student.kind`` is not ``fixed``.
    """
    if config.model.student.kind != "fixed":
        raise SearchError(f"compression trains a fixed student; model.student.kind = "
                          f"{config.model.student.kind!r} — set kind: fixed and a path (e.g. path: k3e3)")
    if train(config, out_dir, overwrite=overwrite) is None:
        return None
    return compression_report(out_dir, settings, device=device)
