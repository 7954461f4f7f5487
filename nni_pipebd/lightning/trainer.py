"""A seeded, quiet Lightning ``Trainer``: CSV (and TensorBoard) logs, a checkpoint callback, options passed through."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger

from .options import TrainerOptions

__all__ = ["build_trainer", "lightning_session", "quiet_lightning", "QUIET_LOGGERS"]

QUIET_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning")
"""Loggers held at WARNING in our runs ("GPU available: ...", "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES", "Seed set")."""

_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")


def quiet_lightning() -> None:
    """Hold Lightning's loggers at WARNING and ignore its ``PossibleUserWarning``\\ s (and torch's ``LeafSpec``
    deprecation warning about Lightning's code) in this process, from now on.

    :func:`lightning_session` undoes it at its end; spawned data-parallel workers call it when they start.
    """
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))


@contextlib.contextmanager
def lightning_session(seed: Optional[int]) -> Iterator[None]:
    """Run Lightning seeded with ``seed`` (``seed_everything``, loader workers too; ``None``: not seeded), quietly,
    and leave no trace.

    Inside, Lightning is quiet (:func:`quiet_lightning`: no "GPU available" or "LOCAL_RANK" lines, no warnings about
    few loader workers or few batches per logging interval). Afterwards the caller's random states (Python, NumPy,
    torch CPU and CUDA), torch's deterministic-algorithm flags, cuDNN flags, the Lightning seed variables, the log
    levels and the warning filters are as before.
    """
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    env = {key: os.environ.get(key) for key in _ENV}
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    states = (random.getstate(), np.random.get_state())
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        quiet_lightning()
        try:
            if seed is not None:
                pl.seed_everything(seed, workers=True, verbose=False)
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]
            random.setstate(states[0])
            np.random.set_state(states[1])


def _loggers(log_dir: Path, name: str) -> List[Logger]:
    loggers: List[Logger] = [CSVLogger(str(log_dir), name=name)]
    if importlib.util.find_spec("tensorboard") is not None:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(log_dir), name=name, version=loggers[0].version))
    return loggers


def build_trainer(options: TrainerOptions, *, max_epochs: int = 1, log_dir: Union[str, Path, None] = None,
                  name: str = "run", deterministic: Optional[bool] = None, progress: bool = False) -> pl.Trainer:
    """A ``Trainer`` for one of our runs (build and use it inside :func:`lightning_session`).

    Parameters
    ----------
    options : TrainerOptions
        Accelerator, devices, precision and strategy, passed through; ``strategy='auto'`` with ``devices > 1`` is
        ``ddp_spawn`` (Lightning's ``ddp`` re-runs the command line once per device, which would repeat a whole
        CLI command or NNI trial), with synchronised BatchNorm on GPUs.
    max_epochs : int
        Epochs of ``fit``.
    log_dir : str or Path, optional
        Folder of the logs (``log_dir/name/version_N/metrics.csv``, TensorBoard events there too when
        ``tensorboard`` is importable) and of the checkpoint of the last epoch (``.../checkpoints``). ``None``:
        neither logs nor checkpoints (evaluation runs).
    name : str
        Run name inside ``log_dir``.
    deterministic : bool, optional
        ``torch.use_deterministic_algorithms``; default: on for the CPU (identical results for one seed), off on
        GPUs (some CUDA kernels have no deterministic version).
    progress : bool
        Draw Lightning's progress bar.
    """
    strategy = options.strategy
    if strategy == "auto" and options.devices > 1:
        strategy = "ddp_spawn"
    if deterministic is None:
        deterministic = options.accelerator == "cpu"
    logging_on = log_dir is not None
    return pl.Trainer(
        accelerator=options.accelerator, devices=options.devices, precision=options.precision, strategy=strategy,
        max_epochs=max_epochs, deterministic=deterministic, use_distributed_sampler=False,
        sync_batchnorm=options.devices > 1 and options.accelerator == "gpu",
        logger=_loggers(Path(log_dir), name) if logging_on else False,
        callbacks=[ModelCheckpoint(save_top_k=1)] if logging_on else None, enable_checkpointing=logging_on,
        default_root_dir=str(log_dir) if logging_on else None, enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
