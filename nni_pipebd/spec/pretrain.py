"""Train and cache a teacher when its checkpoint is absent (small data such as digits), under Lightning."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict

import torch

from ..config import Config
from ..data.datasets import build_dataset
from ..library import atomic_save
from .teachers import build_teacher

__all__ = ["prepare_teacher", "train_teacher"]

_logger = logging.getLogger(__name__)


def prepare_teacher(config: Config, log_dir: Path) -> None:
    """Make sure the teacher checkpoint the config names exists; train and cache it if allowed.

    Parameters
    ----------
    config : Config
        The job; ``model.teacher.checkpoint`` with ``train_if_missing`` is trained when absent.
    log_dir : Path
        The run's log folder (e.g. ``OUT/logs``): that training's Lightning logs go to ``log_dir/teacher_<stem>``,
        never beside the checkpoint (which may be in the user's source tree).
    """
    teacher = config.model.teacher
    path = config.resolve_path(teacher.checkpoint)
    if path is None or path.is_file() or not teacher.train_if_missing:
        return
    _logger.info("teacher checkpoint %s is absent: training %s on %s for %d epochs and caching it there",
                 path, teacher.class_path or teacher.arch or "mobilenet_v2", config.data.class_path or
                 config.data.name or "digits", teacher.train_epochs)
    metrics = train_teacher(config, path, log_dir)
    _logger.info("teacher cached at %s (val accuracy %.4f)", path, metrics["val_accuracy"])


def train_teacher(config: Config, path: Path, log_dir: Path) -> Dict[str, float]:
    """Train the configured teacher with cross-entropy on the training split and save its ``state_dict`` to ``path``.

    Training is a :class:`~nni_pipebd.lightning.module.ClassifierModule` (Adam, one-cycle learning rate up to
    3e-3, weight decay 1e-4, ``model.teacher.train_epochs`` epochs in the seeded order of ``distill.seed``) under a
    ``pytorch_lightning.Trainer`` on ``execution.device`` with ``model.teacher.train_precision``, ``train_devices``
    and ``train_strategy``; its logs and last checkpoint go to ``log_dir/teacher_<path's stem>`` (the run's output
    folder, not the checkpoint's: a checkpoint beside the config leaves the user's tree clean).

    Returns
    -------
    dict
        ``val_accuracy``: top-1 accuracy on the validation split after the last epoch.
    """
    from ..lightning import ClassificationData, ClassifierModule, TrainerOptions, fit_classifier

    t, data, seed = config.model.teacher, config.data, config.distill.seed
    options = TrainerOptions.for_device(config.execution.device, devices=t.train_devices,
                                        precision=t.train_precision, strategy=t.train_strategy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_teacher(dataclasses.replace(t, checkpoint=None), config.base_dir)
    loaders = ClassificationData(build_dataset(data, config.base_dir, "train"),
                                 build_dataset(data, config.base_dir, "val"), data.batch_size, seed,
                                 num_workers=data.num_workers)
    module = ClassifierModule(model, optimizer="adam", lr=3e-3, weight_decay=1e-4, schedule="onecycle",
                              total_steps=t.train_epochs * loaders.steps_per_epoch)
    fitted = fit_classifier(module, loaders, options, epochs=t.train_epochs, seed=seed, log_dir=Path(log_dir),
                            name=f"teacher_{path.stem}")
    if fitted.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return {"val_accuracy": float(fitted.val_accuracy)}
